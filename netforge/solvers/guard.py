"""What the solver keeps to recover from, and notice, training that goes wrong.

``LastGood``: when a loss or gradient turns non-finite, the weights in the net are those the
failing update produced (up to 1e38), and resuming them diverges again. Neither is the
state just before it good: a diverging run's loss climbs for several iterations first (the
digits net at base_lr 50: 2.3 to 76 by iteration 17, its weights one step from overflow),
and its momentum history holds the diverging velocity. So the solver keeps a copy of the
latest state (weights, history, counters, generator, data cursors) whose forward and
backward were finite *and* whose loss was at most ``LOSS_FACTOR`` times the first
iteration's, and snapshots that instead; it resumes with a lower rate. Copying every
parameter and history buffer each iteration would cost as much memory traffic as an SGD
update, so the copy is taken every ``every`` iterations, chosen to move at most
``BUDGET`` bytes per iteration on average: every iteration for nets whose parameters and
history take up to 64 MiB (LeNet, CIFAR-10 quick), every 8th for CaffeNet (0.5 GiB). On the
CPU the copy goes to an unnamed temporary file, not to memory: it is read back only after a
divergence, and held in the process it would add the size of the weights and history to
its peak memory (CaffeNet's training: 1821 -> 1356 MiB peak growth at batch 32). On a GPU
it stays in device memory, a device-to-device copy.

``LossWatch``: Adam, AdaGrad, RMSProp and AdaDelta at a learning rate of 1e6 run to the end
with a useless net (as in Caffe); a warning says so when the loss stays at chance (ln C for
one SoftmaxWithLoss over C classes) or at or above its starting level for long.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from typing import Any

import numpy as np

from netforge.errors import ShapeError
from netforge.memory import check_bytes

log = logging.getLogger("netforge")

#: Bytes of parameters and history the copy may move per iteration, on average.
BUDGET = 64 << 20
#: A state is kept only while its loss is at most this many times the first iteration's:
#: a loss that has climbed so far means the divergence has begun.
LOSS_FACTOR = 4.0


class LastGood:
    """The solver's state before its latest update that passed the finiteness check."""

    def __init__(self, solver: Any) -> None:
        self.solver = solver
        size = sum(b.count for b in solver.net.learnable_params) * solver.dtype.itemsize
        size *= 1 + solver.history_sets
        self.every = max(1, math.ceil(size / BUDGET))
        self.size = size
        #: the kept copies: device arrays on a GPU, else None with the bytes in ``_file``
        self._arrays: list[Any] | None = None
        self._file: Any = None
        self._pending: tuple | None = None
        #: (iter, current_step, generator state, per net data cursors) of the copy
        self.meta: tuple | None = None
        #: the loss of the kept state, and the first iteration's
        self.loss = math.nan
        self._first_loss: float | None = None
        self.enabled = True

    def begin(self, start_iter: int) -> None:
        """At the top of an iteration, where a snapshot would be taken: note the counters,
        generator and cursors if this iteration's state is to be kept."""
        solver = self.solver
        if not self.enabled or (solver.iter - start_iter) % self.every:
            self._pending = None
            return
        nets = [solver.net, *solver.test_nets]
        self._pending = (
            solver.iter,
            solver.current_step,
            json.dumps(solver.rng.bit_generator.state),
            [net.layer_states() for net in nets],
        )

    def passed(self, loss: float) -> None:
        """After the finiteness check passed, before the update: keep the weights and history
        that the iteration's forward and backward found finite, unless ``loss`` has climbed
        past ``LOSS_FACTOR`` times the first iteration's."""
        if self._first_loss is None:
            self._first_loss = loss
        if self._pending is None:
            return
        if self._first_loss > 0 and loss > LOSS_FACTOR * self._first_loss:
            return
        solver = self.solver
        sources = [b.data for b in solver.net.learnable_params] + list(solver.history)
        try:
            if solver.xp is np:
                self._write(sources)
            else:
                if self._arrays is None:
                    check_bytes(self.size, "keeping the last good state", solver.backend.device_id)
                    self._arrays = [solver.xp.empty_like(a) for a in sources]
                for kept, array in zip(self._arrays, sources, strict=True):
                    kept[...] = array
        except (ShapeError, OSError) as exc:
            log.warning("%s; a divergence snapshot will hold the diverged state", exc)
            self.enabled, self.meta = False, None
            return
        self.meta, self.loss = self._pending, loss

    def _write(self, sources: list[Any]) -> None:
        """Overwrite the temporary file with the bytes of ``sources``, in order."""
        if self._file is None:
            directory = tempfile.gettempdir()
            free = shutil.disk_usage(directory).free
            if free < self.size:
                raise ShapeError(
                    f"keeping the last good state needs {self.size / 2**20:.0f} MiB in "
                    f"{directory}, which has {free / 2**20:.0f} MiB free (set TMPDIR elsewhere)"
                )
            self._file = tempfile.TemporaryFile(prefix="netforge-last-good-")
        self._file.seek(0)
        for array in sources:
            self._file.write(memoryview(np.ascontiguousarray(array)).cast("B"))
        self._file.flush()

    def _read(self, targets: list[Any]) -> None:
        """Fill ``targets`` from the temporary file, in ``_write``'s order."""
        self._file.seek(0)
        for target in targets:
            kept = np.empty_like(target, order="C")
            if self._file.readinto(memoryview(kept).cast("B")) != kept.nbytes:
                raise OSError(f"the last good state's file {self._file.name} was cut short")
            target[...] = kept

    def restore(self) -> bool:
        """Put the kept state back into the solver; False when nothing was kept."""
        if self.meta is None:
            return False
        solver = self.solver
        targets = [b.data for b in solver.net.learnable_params] + list(solver.history)
        if self._arrays is None:
            self._read(targets)
        else:
            for target, kept in zip(targets, self._arrays, strict=True):
                target[...] = kept
        solver.iter, solver.current_step, rng_state, cursors = self.meta
        solver.rng.bit_generator.state = json.loads(rng_state)
        for net, states in zip([solver.net, *solver.test_nets], cursors, strict=True):
            net.set_layer_states(states)
        solver._steps_owed = False
        return True


class LossWatch:
    """Warns once when the mean training loss stays at chance, or at or above the first
    iteration's loss, for ``PATIENCE`` windows of ``window`` iterations in a row after the
    first window."""

    PATIENCE = 3

    def __init__(self, net: Any, max_iter: int) -> None:
        self.window = max(20, min(1000, max_iter // 20))
        self.chance = _chance_loss(net)
        self._sum, self._count = 0.0, 0
        self._first: float | None = None
        self._windows = 0
        self._bad = 0
        self.warned = False

    def add(self, iteration: int, loss: float) -> None:
        """Count one iteration's loss; may log the warning."""
        if self.warned:
            return
        if self._first is None:
            if not math.isfinite(loss):
                return
            self._first, self._windows = loss, 0
        self._sum += loss if math.isfinite(loss) else math.inf
        self._count += 1
        if self._count < self.window:
            return
        mean, self._sum, self._count = self._sum / self.window, 0.0, 0
        self._windows += 1
        if self._windows == 1:
            return  # the first window is allowed to climb before the descent starts
        at_chance = self.chance is not None and abs(mean - self.chance) <= 0.05 * self.chance
        self._bad = self._bad + 1 if mean >= self._first or at_chance else 0
        if self._bad < self.PATIENCE:
            return
        self.warned = True
        span = self.window * self.PATIENCE
        if at_chance:
            what = f"stayed at chance level (ln {round(math.exp(self.chance))} = {self.chance:.4g})"
        else:
            what = f"stayed at or above its first value {self._first:.4g}"
        log.warning(
            "the training loss has %s for the last %d iterations (mean %.4g up to iteration %d): "
            "the net is not learning; lower base_lr (or check the data and labels)",
            what,
            span,
            mean,
            iteration,
        )


def _chance_loss(net: Any) -> float | None:
    """ln C when the net's one weighted loss is a SoftmaxWithLoss over C classes."""
    losses = [
        i
        for i, layer in enumerate(net.layers)
        if any(t in net.loss_weights for t in net.layer_tops[i])
    ]
    if len(losses) != 1 or net.layers[losses[0]].type != "SoftmaxWithLoss":
        return None
    layer, index = net.layers[losses[0]], losses[0]
    scores = net.blobs[net.layer_bottoms[index][0]]
    axis = layer.layer_param.softmax_param.axis % max(len(scores.shape), 1)
    classes = scores.shape[axis] if scores.shape else 0
    return math.log(classes) if classes > 1 else None
