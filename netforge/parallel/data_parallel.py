"""Data-parallel training: one solver per rank, gradients all-reduced (Caffe's ``NCCL``).

Caffe's scheme (BVLC parallel.cpp), over any ``Communicator``:

- every rank runs a full solver on its own share of the records (``netforge.parallel.world``
  shards the TRAIN data layers), so the effective batch is ``count × batch_size``;
- the weights are broadcast from rank 0 once (``broadcast``; with a resumed snapshot also
  the history, counters and data cursors, ``broadcast_solver_state``), so every rank starts
  alike;
- the gradients are summed over the ranks before the update and divided by the count (the
  solver folds that division into its ``iter_size`` normalisation: no extra pass), and every
  rank applies the same update, so weights and histories stay identical;
- rank 0 alone tests, snapshots and writes metrics (``Solver.is_root``).

The gradients live in one flat buffer: each learnable parameter's diff is a view of it,
laid out in the order the backward pass finishes them. The buffer is cut into buckets of
about ``bucket_bytes``; with the solver's ``layer_wise_reduce`` (Caffe's default) a bucket's
all-reduce starts as soon as the backward pass has gone below the last layer that adds to
it, and runs while the layers beneath compute (Caffe reduces per layer; buckets bound the
number of collectives, whose fixed cost dominates for small layers). With ``iter_size``
above 1 only the last pass starts them, after the gradients are accumulated.

One small all-reduce per iteration carries what the ranks must agree on: the loss (the
solver's ``loss`` becomes the mean over the ranks), the diffs' magnitude bounds (so the
finiteness check skips the same diffs everywhere), and the pending SIGINT/SIGHUP action (so
every rank stops or snapshots after the same iteration). A non-finite gradient on any rank
reaches every rank through the sum, so all of them stop together with one DivergenceError
naming the rank, layer and blob where it first appeared.
"""

from __future__ import annotations

import json
import logging
from typing import Any, NamedTuple

import numpy as np

from netforge.parallel.comm import Communicator, Pending
from netforge.parallel.world import set_world

log = logging.getLogger("netforge")

#: Bytes per all-reduce bucket. The alpha-beta model in docs/scaling.md sets it: large
#: enough that a bucket's fixed latency is a small share of its transfer on the fast links
#: (4 MiB at 100 Gb/s: 0.34 ms against a few µs), small enough that the last bucket (the one
#: not hidden behind backward) stays short.
DEFAULT_BUCKET_BYTES = 4 << 20


class Bucket(NamedTuple):
    """A slice ``start:stop`` of the flat gradient buffer, ready once the backward pass has
    run layer ``ready`` (-1: only after the pass, for diffs no layer's backward reaches)."""

    start: int
    stop: int
    ready: int


class DataParallel:
    """Keeps ``solver``'s replicas on the ranks of ``comm`` in step (Caffe's ``NCCL``).

    Building one lays out the flat gradient buffer and hooks itself into the solver
    (``solver.parallel``); then call ``broadcast()`` (and ``broadcast_solver_state()`` when
    rank 0 alone restored a snapshot) and either ``attach()`` or, as
    pycaffe's ``python/train.py`` does, ``solver.add_callback(this)`` and, with
    ``layer_wise_reduce``, ``solver.net.after_backward(this)``.
    """

    #: pycaffe's Solver::Callback protocol: nothing to do when an iteration starts.
    on_start = None

    def __init__(
        self, solver: Any, comm: Communicator, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES
    ) -> None:
        self.solver = solver
        self.comm = comm
        self.rank, self.size = comm.rank, comm.size
        self.bucket_bytes = bucket_bytes
        set_world(self.rank, self.size)
        self.buckets = self._lay_out()
        self._next = 0  # the first bucket not started in this iteration
        self._pending: list[Pending] = []
        self._pass = 0  # backward passes finished in this iteration
        self._action = "none"
        solver.parallel = self
        self._own_stream()

    def _own_stream(self) -> None:
        """Move this rank's generator to a stream of its own. Caffe seeds rank r with
        random_seed + r: dropout and the like differ per rank. The data sources drew their
        generators already, alike on every rank, so shuffled orders agree and the skip rule
        splits them."""
        if self.rank:
            rng = self.solver.rng
            rng.bit_generator.state = rng.bit_generator.jumped(self.rank).state

    # -- set-up --------------------------------------------------------------------------
    def _lay_out(self) -> list[Bucket]:
        """Make every learnable diff a view of one flat buffer, in the order the backward
        pass completes them, and cut the buffer into buckets."""
        net = self.solver.net
        params = net.learnable_params
        # The lowest layer whose backward adds to each parameter: after it, the diff is final.
        final = [-1] * len(params)
        for i, slots in enumerate(net._param_slots):
            if net.layer_need_backward[i]:
                for slot in slots:
                    final[slot] = i if final[slot] < 0 else min(final[slot], i)
        order = sorted(range(len(params)), key=lambda s: (final[s] < 0, -final[s], s))
        xp = self.solver.xp
        total = sum(params[s].count for s in order)
        self.flat = xp.zeros(total, dtype=self.solver.dtype)
        old = {s: params[s].diff for s in order}
        sharers = [
            (blob, s)
            for layer in net.layers
            for blob in layer.blobs
            if all(blob is not p for p in params)
            for s in order
            if blob.count and xp.may_share_memory(blob.diff, old[s])
        ]
        buckets: list[Bucket] = []
        start = offset = 0
        limit = max(1, self.bucket_bytes // self.flat.itemsize)
        for k, s in enumerate(order):
            blob = params[s]
            view = self.flat[offset : offset + blob.count]
            view[...] = old[s].reshape(-1)
            blob.diff = view.reshape(blob.shape)
            offset += blob.count
            last = k + 1 == len(order)
            crossing = not last and final[order[k + 1]] < 0 <= final[s]
            if offset - start >= limit or last or crossing:
                buckets.append(Bucket(start, offset, final[s]))
                start = offset
        for blob, s in sharers:
            blob.share_diff(params[s])
        return buckets

    def broadcast(self, root: int = 0) -> None:
        """Give every rank ``root``'s weights (Caffe's ``NCCL::Broadcast``)."""
        for blob in self.solver.net.learnable_params:
            self.comm.broadcast(blob.data, root)

    bcast = broadcast  # pycaffe's name

    def broadcast_solver_state(self, root: int = 0) -> None:
        """Give every rank ``root``'s solver state: the iteration, the rate schedule's step,
        the history, the generator (then moved to each rank's own stream) and the train
        net's data cursors. With ``broadcast``, a run resumed by ``root`` alone (``netforge
        train --snapshot``) reads the snapshot once: the other ranks, perhaps on nodes that
        cannot see rank 0's files, get it from there."""
        solver = self.solver
        for history in solver.history:
            self.comm.broadcast(history, root)
        mine = b""
        if self.rank == root:
            layers = [[name, state.hex()] for name, state in solver.net.layer_states()]
            mine = json.dumps(
                {
                    "iter": solver.iter,
                    "current_step": solver.current_step,
                    "rng": solver.rng.bit_generator.state,
                    "layers": layers,
                }
            ).encode()
        state = json.loads(self.comm.allgather_bytes(mine)[root])
        if self.rank != root:
            solver.iter, solver.current_step = state["iter"], state["current_step"]
            solver.rng.bit_generator.state = state["rng"]
            solver.net.set_layer_states(
                (name, bytes.fromhex(text)) for name, text in state["layers"]
            )
            self._own_stream()

    def attach(self) -> DataParallel:
        """Register the callbacks: the reduce before each update, and the layer-wise start
        of the buckets when the solver's ``layer_wise_reduce`` is set."""
        self.solver.add_callback(None, self.on_gradients_ready)
        if self.solver.param.layer_wise_reduce:
            self.solver.net.after_backward(self)
        return self

    # -- each iteration ------------------------------------------------------------------
    def __call__(self, layer: int) -> None:
        """After layer ``layer``'s backward: start the buckets it completed (last pass)."""
        if self._pass == self.solver.param.iter_size - 1:
            buckets = self.buckets
            while self._next < len(buckets) and 0 <= layer <= buckets[self._next].ready:
                self._start()
            for pending in self._pending:
                pending.done()  # lets MPI move the transfers along
        if layer == 0:
            self._pass += 1

    def _start(self) -> None:
        bucket = self.buckets[self._next]
        self._pending.append(self.comm.start_allreduce(self.flat[bucket.start : bucket.stop]))
        self._next += 1

    def on_gradients_ready(self) -> None:
        """Finish the all-reduce of the gradients, and agree on the loss, the diff bounds
        and the pending action (the solver calls this before its update)."""
        solver, net = self.solver, self.solver.net
        while self._next < len(self.buckets):
            self._start()
        local = solver.action_function() if solver.action_function else "none"
        # Summed codes: above ``size`` some rank asked to stop, from 1 one asked to snapshot.
        code = {"none": 0, "snapshot": 1, "stop": self.size + 1}[local]
        agreed = np.array([solver.loss, code, *net.param_diff_bounds])
        small = solver.backend.asarray(agreed, dtype=np.float64)
        self._pending.append(self.comm.start_allreduce(small))
        for pending in self._pending:
            pending.wait()
        self._pending, self._next, self._pass = [], 0, 0
        summed = small.tolist()  # one host read, also from a GPU
        solver.loss = summed[0] / self.size
        codes = summed[1]
        self._action = "stop" if codes > self.size else "snapshot" if codes >= 1 else "none"
        net.param_diff_bounds = summed[2:]

    def take_action(self) -> str:
        """The action every rank agreed on in this iteration, once ("none" afterwards)."""
        action, self._action = self._action, "none"
        return action

    def first_nonfinite(self) -> tuple[str, str, str, int] | None:
        """Where a non-finite value first appeared: (layer, blob, "data"|"diff", rank).

        A collective: every rank reports its own net's first non-finite blob; a forward
        value names the rank it came from, otherwise the summed diffs are alike everywhere
        and rank 0's report stands."""
        local = self.solver.net.first_nonfinite()
        reports = [json.loads(b) for b in self.comm.allgather_bytes(json.dumps(local).encode())]
        found = [(r, report) for r, report in enumerate(reports) if report]
        for rank, report in found:
            if report[2] == "data":
                return (*report, rank)
        return (*found[0][1], found[0][0]) if found else None
