"""The Solver: Caffe's training loop (Solver::Step/Solve/Test) and the shared update steps.

One iteration, exactly as Caffe (inventory §4.1): zero the parameter gradients; test when
``it % test_interval == 0`` (at 0 only with ``test_initialization``); ``iter_size``
forward/backward passes accumulate gradients; smooth and display the loss; compute the rate;
clip by the global L2 norm (measured before the ``iter_size`` division); per parameter
normalise, regularise (L2 or L1 × ``decay_mult``) and turn the gradient into the step
(``compute_update_value``, per solver type); ``w -= step``; ``it += 1``; snapshot.

netforge additions: a snapshot also keeps the random generator and the data cursors, so a
resumed run repeats the uninterrupted one; a non-finite loss or gradient stops training
with a DivergenceError naming the first layer and blob, after snapshotting the last good
state (``allow_nonfinite=True`` keeps Caffe's carrying on); a metrics file of JSON lines.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from netforge.backend import Backend, default_backend, mode_version, move_array, to_numpy
from netforge.errors import ConfigError, DataError, DivergenceError, NetforgeError, ShapeError
from netforge.memory import human
from netforge.parallel.world import world
from netforge.process import default_rng
from netforge.proto import pb
from netforge.solvers import snapshot as snap
from netforge.solvers.blocks import Block, BlockWork, ParamBlocks
from netforge.solvers.guard import LOSS_FACTOR, LastGood, LossWatch
from netforge.solvers.lr_policy import check_policy, learning_rate
from netforge.solvers.scoring import group_entries, score
from netforge.solvers.validate import check_solver_fields
from netforge.train_log import fmt, output_lines

log = logging.getLogger("netforge")

SOLVERS: dict[str, type[Solver]] = {}

#: What an action function may ask for after an iteration (Caffe's SolverAction).
ACTIONS = ("none", "stop", "snapshot")


def register_solver(cls: type[Solver]) -> type[Solver]:
    """Register a Solver subclass under its ``type`` string (Caffe's REGISTER_SOLVER_CLASS)."""
    SOLVERS[cls.type] = cls
    return cls


def read_solver_param(source: str | os.PathLike | pb.SolverParameter) -> pb.SolverParameter:
    """A SolverParameter from a prototxt path (upgraded, with Caffe's default prefix)."""
    if isinstance(source, pb.SolverParameter):
        return source
    from netforge.prototxt import read_solver

    return read_solver(source)


class Solver:
    """Base of the six solver types; pycaffe's ``caffe.SGDSolver(path)`` and friends.

    ``param`` is a solver prototxt path or a SolverParameter. Keyword options: ``backend``
    (default: the pycaffe-style process default), ``weights`` (caffemodel paths or
    ``zoo:NAME``, each possibly a comma list, loaded into the train and test nets after
    the solver's own ``weights``), ``reinit`` (layers whose weights are not copied),
    ``freeze`` (glob patterns: matching layers get ``lr_mult`` 0), ``allow_nonfinite``,
    ``dtype`` of the nets, and ``source`` (the file name used in error messages).
    """

    type: ClassVar[str] = ""
    #: history buffers per learnable parameter (AdaDelta and Adam keep two).
    history_sets: ClassVar[int] = 1
    #: The history set that holds the step after ``compute_update_value`` (SGD, whose step
    #: is its history), or None when the step is left in ``grad``. With a set named, an
    #: update that another iteration of the same ``step`` call follows does not copy the
    #: step into the gradient block: the next backward writes over the diffs anyway
    #: (``Net.mark_param_diffs_stale``). Nothing can read the diffs in between; should
    #: ``step`` end early or a snapshot be requested, the steps are copied into the diffs
    #: first, so "the diff holds the step" holds wherever it can be observed.
    step_history: ClassVar[int | None] = None

    def __init__(
        self,
        param: str | os.PathLike | pb.SolverParameter,
        *,
        backend: Backend | None = None,
        weights: Sequence[str] = (),
        reinit: Sequence[str] = (),
        freeze: Sequence[str] = (),
        allow_nonfinite: bool = False,
        allow_python_layers: bool = True,
        dtype: Any = np.float32,
        source: str | None = None,
    ) -> None:
        if source is None:
            source = "solver" if isinstance(param, pb.SolverParameter) else str(param)
        self.source = source
        self.param = pb.SolverParameter()
        self.param.CopyFrom(read_solver_param(param))
        self.param.weights.extend(weights)
        self.backend = backend or default_backend()
        self.xp = self.backend.xp
        # Built on the process mode: follow set_mode_cpu/gpu from now on (Caffe's global mode).
        self._follows_mode = backend is None
        self._mode_seen = mode_version()
        self.dtype = np.dtype(dtype)
        self.allow_nonfinite = allow_nonfinite
        self.allow_python_layers = allow_python_layers
        self._check_param()
        seed = self.param.random_seed
        #: The one generator of the train and test nets (Caffe's global RNG).
        self.rng = np.random.default_rng(seed) if seed >= 0 else default_rng()
        self.iter = 0
        self.current_step = 0
        self.requested_early_exit = False
        self.copy_reports: list[tuple[str, Any]] = []
        self.callbacks: list[tuple[Callable[[], None] | None, Callable[[], None] | None]] = []
        self.action_function: Callable[[], str] | None = None
        self.metrics: Any = None
        self.progress: Any = None
        self.net = self._build_train_net()
        # As Caffe's Solver::Init: only the root solver of a data-parallel run tests.
        self.test_nets = self._build_test_nets() if world().rank == 0 else []
        self._load_weights(reinit)
        self._freeze(freeze)
        self.history = [
            self.xp.zeros(blob.shape, dtype=self.dtype)
            for _ in range(self.history_sets)
            for blob in self.net.learnable_params
        ]
        self._blocks = ParamBlocks(self.xp, self.dtype)
        self._losses: list[float] = []
        self._smoothed_loss = 0.0
        self._rate = 0.0
        #: The last iteration's loss (the mean over its ``iter_size`` passes).
        self.loss = math.nan
        #: The last update left the gradients in the diffs and the steps in history set
        #: ``step_history``.
        self._steps_owed = False
        #: The ``netforge.parallel.DataParallel`` keeping this solver in step with the other
        #: ranks of a data-parallel run, or None when it trains alone.
        self.parallel: Any = None
        self._last_good = LastGood(self)
        self._loss_watch = LossWatch(self.net, self.param.max_iter)
        log.info("Solver scaffolding done.")

    # -- set-up --------------------------------------------------------------------------
    def _check_param(self) -> None:
        param = self.param
        check_solver_fields(param, self.source)
        if param.regularization_type not in ("L1", "L2"):
            raise ConfigError(
                f"{self.source}: unknown regularization_type {param.regularization_type!r}; "
                "use L2 or L1"
            )
        check_policy(param, self.source)
        self.check_param()
        if param.snapshot > 0 or param.snapshot_after_train:
            # Caffe aborts when the prefix's folder is missing; netforge creates it.
            # The process id keeps the probes of the ranks of a data-parallel run apart.
            probe = Path(
                snap.snapshot_filename(param.snapshot_prefix, 0, f".{os.getpid()}.tempfile")
            )
            try:
                probe.parent.mkdir(parents=True, exist_ok=True)
                probe.touch()
                probe.unlink()
            except OSError:
                raise ConfigError(
                    f"{self.source}: cannot write to snapshot prefix {param.snapshot_prefix!r}; "
                    "make sure that the directory exists and is writable"
                ) from None

    def check_param(self) -> None:
        """Type-specific checks of ``self.param`` (raise ConfigError)."""

    def _net(self, model: Any, phase: int, extra: pb.NetState) -> Any:
        """Build a net with Caffe's state precedence: the phase, then the net's own state,
        then the solver's train_state/test_state."""
        from netforge.net import Net
        from netforge.prototxt import read_net

        net_param = pb.NetParameter()
        if not isinstance(model, pb.NetParameter) and not os.path.exists(model):
            # Caffe reads a solver's net paths from the working directory, not the solver's
            # folder: say so, since running from the wrong folder is the usual cause.
            relative = ""
            if not os.path.isabs(model):
                relative = (
                    f", resolved against the working directory {os.getcwd()}: run from the "
                    "folder it is relative to (for Caffe's own solvers, Caffe's root), or make "
                    "it absolute"
                )
            raise DataError(f"{self.source}: net file {model}: no such file{relative}")
        net_param.CopyFrom(model if isinstance(model, pb.NetParameter) else read_net(model))
        state = pb.NetState(phase=phase)
        state.MergeFrom(net_param.state)
        state.MergeFrom(extra)
        net_param.state.CopyFrom(state)
        return Net(
            net_param,
            state.phase,
            backend=self.backend,
            dtype=self.dtype,
            rng=self.rng,
            allow_python_layers=self.allow_python_layers,
            source=os.fspath(model) if isinstance(model, (str, os.PathLike)) else self.source,
        )

    def _build_train_net(self) -> Any:
        param = self.param
        given = [
            f for f in ("net", "net_param", "train_net", "train_net_param") if param.HasField(f)
        ]
        if len(given) != 1:
            raise ConfigError(
                f"{self.source}: the solver must name exactly one train net with one of net, "
                f"net_param, train_net, train_net_param (found {len(given) or 'none'})"
            )
        source = getattr(param, given[0])
        if given[0].endswith("_param"):
            log.info("Creating training net specified in %s.", given[0])
        else:
            log.info("Creating training net from %s file: %s", given[0], source)
        return self._net(source, pb.TRAIN, param.train_state)

    def _build_test_nets(self) -> list[Any]:
        """Caffe's InitTestNets: test_net_param, then test_net files, then as many copies of
        net/net_param as there are test_iter entries left."""
        param = self.param
        sources: list[tuple[str, Any]] = [("test_net_param", p) for p in param.test_net_param]
        sources += [(f"test_net file: {f}", f) for f in param.test_net]
        generic = [f for f in ("net", "net_param") if param.HasField(f)]
        if len(param.test_iter) < len(sources) or (
            not generic and len(param.test_iter) > len(sources)
        ):
            raise ConfigError(
                f"{self.source}: test_iter must be given once per test net "
                f"({len(sources)} test nets, {len(param.test_iter)} test_iter)"
            )
        if generic:
            sources += [(generic[0], getattr(param, generic[0]))] * (
                len(param.test_iter) - len(sources)
            )
        if param.test_state and len(param.test_state) != len(sources):
            raise ConfigError(
                f"{self.source}: test_state must be absent or given once per test net "
                f"({len(sources)} test nets, {len(param.test_state)} test_state)"
            )
        if sources and param.test_interval <= 0:
            raise ConfigError(f"{self.source}: test nets need test_interval > 0")
        nets = []
        for i, (name, source) in enumerate(sources):
            log.info("Creating test net (#%d) specified by %s", i, name)
            extra = param.test_state[i] if param.test_state else pb.NetState()
            net = self._net(source, pb.TEST, extra)
            net.debug_info = param.debug_info
            nets.append(net)
        return nets

    def _load_weights(self, reinit: Sequence[str]) -> None:
        """Caffe's LoadNetWeights into every net, by layer name, in the order given."""
        from netforge.weights import resolve_weights

        if reinit:
            log.info("Re-initialising layers (weights not copied): %s", ", ".join(reinit))
        for entry in self.param.weights:
            for name in (n.strip() for n in entry.split(",") if n.strip()):
                path = resolve_weights(name)
                log.info("Finetuning from %s", path)
                report = self.net.copy_from(path, exclude=tuple(reinit))
                self.copy_reports.append((str(path), report))
                for net in self.test_nets:
                    net.copy_from(path, exclude=tuple(reinit))

    def _freeze(self, patterns: Sequence[str]) -> None:
        """lr_mult 0 on every param of the layers matching a glob (``Net.freeze``)."""
        frozen = [name for pattern in patterns for name in self.net.freeze(pattern)]
        if patterns and not frozen:
            raise ConfigError(
                f"--freeze {', '.join(patterns)}: no layer with parameters matches "
                f"(layers with parameters: {', '.join(self.net.params)})"
            )
        if frozen:
            log.info("Freezing layers (lr_mult 0): %s", ", ".join(frozen))

    @property
    def is_root(self) -> bool:
        """Whether this solver tests, snapshots and reports: always, except on the ranks
        other than 0 of a data-parallel run (Caffe's ``Caffe::root_solver()``)."""
        return self.parallel is None or self.parallel.rank == 0

    # -- pycaffe surface -----------------------------------------------------------------
    def add_callback(
        self,
        on_start: Any = None,
        on_gradients_ready: Callable[[], None] | None = None,
    ) -> None:
        """Call ``on_start`` before each iteration's passes and ``on_gradients_ready``
        before each update (pycaffe's ``solver.add_callback``). A single object with
        ``on_start`` and ``on_gradients_ready`` attributes (pycaffe's ``NCCL``, Caffe's
        ``Solver::Callback``) registers both."""
        if on_gradients_ready is None and hasattr(on_start, "on_gradients_ready"):
            on_start, on_gradients_ready = on_start.on_start, on_start.on_gradients_ready
        self.callbacks.append((on_start, on_gradients_ready))

    def set_action_function(self, function: Callable[[], str]) -> None:
        """``function()`` returns "none", "stop" or "snapshot"; it is asked after every
        iteration and test batch (Caffe's SetActionFunction, used for SIGINT/SIGHUP)."""
        self.action_function = function

    def _requested_action(self) -> str:
        if self.parallel is not None:
            return self.parallel.take_action()  # the ranks agree on it before the update
        return self.action_function() if self.action_function else "none"

    def solve(self, resume_file: str | os.PathLike | None = None) -> None:
        """Train to ``max_iter`` (Caffe's Solver::Solve), optionally restoring first."""
        log.info("Solving %s", self.net.name)
        log.info("Learning Rate Policy: %s", self.param.lr_policy)
        self.requested_early_exit = False
        if self.is_root:
            snap.clean_leftovers(self.param.snapshot_prefix)
        if resume_file is not None:
            log.info("Restoring previous solver status from %s", resume_file)
            self.restore(resume_file)
        start_iter = self.iter
        self.step(self.param.max_iter - self.iter)
        snapshot_every = self.param.snapshot
        if self.param.snapshot_after_train and (
            not snapshot_every or self.iter % snapshot_every != 0
        ):
            self.snapshot()
        if self.requested_early_exit:
            log.info("Optimization stopped early.")
            return
        display = self.param.display
        if display and self.iter % display == 0:
            loss = self.net.forward_loss()
            self._update_smoothed_loss(loss, start_iter)
            log.info("Iteration %d, loss = %s", self.iter, fmt(self._smoothed_loss))
        test_interval = self.param.test_interval
        if test_interval and self.iter % test_interval == 0 and self.is_root:
            self.test_all()
        log.info("Optimization Done.")

    def step(self, iters: int) -> None:
        """Run ``iters`` iterations (Caffe's Solver::Step); afterwards each parameter's diff
        holds its last step, as in Caffe."""
        self.follow_mode()
        try:
            self._iterate(iters)
        finally:
            self._settle_steps()

    def _iterate(self, iters: int) -> None:
        param, net = self.param, self.net
        start_iter, stop_iter = self.iter, self.iter + iters
        self._losses, self._smoothed_loss = [], 0.0
        timer, iterations_last = time.perf_counter(), self.iter
        while self.iter < stop_iter:
            if not self.allow_nonfinite:
                self._last_good.begin(start_iter)
            # Caffe's ClearParamDiffs, without a pass over the diffs: they hold the last
            # steps, or nothing to keep after a deferred update; backward writes over them.
            self._steps_owed = False
            net.mark_param_diffs_stale()
            if (
                param.test_interval
                and self.iter % param.test_interval == 0
                and (self.iter > 0 or param.test_initialization)
                and self.is_root
            ):
                self.test_all()
                if self.requested_early_exit:
                    break
            if any(on_start for on_start, _ in self.callbacks):
                net.zero_stale_param_diffs()  # what Caffe's callbacks see: zeros
            for on_start, _ in self.callbacks:
                if on_start:
                    on_start()
            display = bool(param.display) and self.iter % param.display == 0
            net.debug_info = display and param.debug_info
            loss = 0.0
            # Overflow and NaN are checked below (naming the layer); numpy's own warnings
            # would only print source lines before that message.
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                for _ in range(param.iter_size):
                    loss += net.forward_backward()
            loss /= param.iter_size
            self.loss = loss
            self._update_smoothed_loss(loss, start_iter)
            if display:
                lapse = time.perf_counter() - timer
                per_s = (self.iter - iterations_last) / (lapse or 1.0)
                log.info(
                    "Iteration %d (%s iter/s, %ss/%d iters), loss = %s",
                    self.iter,
                    fmt(per_s),
                    fmt(lapse),
                    param.display,
                    fmt(self._smoothed_loss),
                )
                timer, iterations_last = time.perf_counter(), self.iter
                train_outputs = self._train_outputs()
                for line in output_lines("Train", train_outputs):
                    log.info("%s", line)
            for _, on_gradients_ready in self.callbacks:
                if on_gradients_ready:
                    on_gradients_ready()
            # After the callbacks: in a data-parallel run they sum the gradients (and the
            # loss) over the ranks, so every rank checks the same values.
            if not self.allow_nonfinite:
                self._check_finite(self.loss)
                self._last_good.passed(self.loss)
            if self.is_root:
                self._loss_watch.add(self.iter, self.loss)
            # An iteration follows in this call, with no snapshot in between: the steps
            # need not be copied into the diffs for it.
            follows = self.iter + 1 < stop_iter and not (
                param.snapshot and (self.iter + 1) % param.snapshot == 0
            )
            with np.errstate(over="ignore", invalid="ignore"):
                self._apply_update(defer=follows)
            if display and self.metrics is not None:
                self.metrics.train(
                    self.iter - 1,
                    self._smoothed_loss,
                    self._rate,
                    group_entries(train_outputs),
                    self._data_wait(),
                )
            if self.progress is not None:
                self.progress.update(self.iter, param.max_iter)
            request = self._requested_action()
            if (param.snapshot and self.iter % param.snapshot == 0) or request == "snapshot":
                self.snapshot()
            if request == "stop":
                self.requested_early_exit = True
                break

    def _update_smoothed_loss(self, loss: float, start_iter: int) -> None:
        """Caffe's UpdateSmoothedLoss: the running mean of the last ``average_loss`` losses."""
        average = self.param.average_loss
        if len(self._losses) < average:
            self._losses.append(loss)
            size = len(self._losses)
            self._smoothed_loss = (self._smoothed_loss * (size - 1) + loss) / size
        else:
            index = (self.iter - start_iter) % average
            self._smoothed_loss += (loss - self._losses[index]) / average
            self._losses[index] = loss

    def _train_outputs(self) -> list[tuple[str, float, float]]:
        weights = self.net.loss_weights
        return [
            (name, float(v), weights.get(name, 0.0))
            for name in self.net.outputs
            for v in to_numpy(self.net.blobs[name].data).ravel()
        ]

    def _data_wait(self) -> float:
        return sum(getattr(layer, "wait_seconds", 0.0) for layer in self.net.layers)

    def _check_finite(self, loss: float) -> None:
        """Stop on a non-finite loss or gradient, before the update spoils the weights.

        One reduction per block, on the update threads, folded into a single host read keeps
        this cheap; when it trips, the net names the first non-finite blob (a finite-but-huge
        sum that overflowed is not a divergence, and training carries on). Diffs whose
        ``Net.param_diff_bounds`` entry lies below half the largest float are finite and
        not read (CaffeNet: 7 ms of gradient reads fewer per iteration).
        """
        if not math.isfinite(float(loss)):
            probe = math.nan
        else:
            total = self._blocks.total
            bounds, limit = self.net.param_diff_bounds, float(np.finfo(self.net.dtype).max) / 2
            unbounded = [b for b in self._param_blocks() if not bounds[b.index] <= limit]
            sums = self._blocks.run(unbounded, lambda block, _: total(block.diff))
            probe = float(sum(sums))
        if math.isfinite(probe):
            return
        parallel = self.parallel
        where = self.net.first_nonfinite() if parallel is None else parallel.first_nonfinite()
        if where is None:
            return
        layer, blob, kind = where[:3]
        on_rank = f" on rank {where[3]}" if parallel is not None else ""
        diverged_at = self.iter
        # Back to the state before the update that led here, whose forward and backward
        # were finite (LastGood); the solver stays there, so a pycaffe user can lower the
        # rate and carry on.
        if self._last_good.restore():
            before = (
                f"loss {fmt(self._last_good.loss)}, with finite values and within "
                f"{LOSS_FACTOR:g}x the first iteration's loss"
            )
        else:
            before = "as it stood: no earlier state was finite"
        path = self.snapshot()
        raise DivergenceError(
            f"training diverged at iteration {diverged_at}: loss = {fmt(loss)}; the first "
            f"non-finite value is in the {kind} of blob {blob!r} (layer {layer!r}){on_rank}; "
            f"the last good state (iteration {self.iter}, {before}) is saved as {path}: resume "
            f"it with a lower base_lr (netforge train --snapshot {path}), set clip_gradients, "
            "or pass --allow-nonfinite to carry on as Caffe does"
        )

    # -- the update ----------------------------------------------------------------------
    def learning_rate(self) -> float:
        """The rate for the current iteration (updates ``current_step`` as Caffe does)."""
        rate, self.current_step = learning_rate(
            self.param, self.iter, self.current_step, self.source
        )
        return rate

    def apply_update(self) -> None:
        """Caffe's SGDSolver::ApplyUpdate: rate, clip, then per parameter normalise,
        regularise and compute the step, ``w -= step``, and ``it += 1``.

        Caffe runs each stage over all parameters before the next; here all stages run on
        one cache-sized block before the next block (``blocks.py``). Every element goes
        through the same operations in the same order, so the results are identical, and
        afterwards each parameter's diff holds its step, as in Caffe."""
        self.follow_mode()
        self._apply_update(defer=False)

    def follow_mode(self) -> None:
        """Caffe's mode semantics for a solver built without an explicit backend: after
        set_mode_gpu (or set_mode_cpu, set_device), the next step or update first moves
        its nets and history to the new device, once. Test nets share the train net's
        weights again at each test, so they follow too."""
        if not self._follows_mode or self._mode_seen == mode_version():
            return
        target = default_backend()  # raises a DeviceError in GPU mode without a GPU
        self._mode_seen = mode_version()
        if target == self.backend:
            return
        self._settle_steps()
        moved: dict = {}
        for net in (self.net, *self.test_nets):
            net.to(target, moved)
        self.history = [move_array(h, target, moved) for h in self.history]
        self.backend, self.xp = target, target.xp
        self._blocks = ParamBlocks(self.xp, self.dtype)

    def share_weights(self, net: Any) -> None:
        """Make ``net`` use this solver's train net parameters for its layers of the same
        name (pycaffe's ``solver.share_weights(net)``; Caffe's ShareTrainedLayersWith)."""
        net.share_with(self.net)

    def _apply_update(self, defer: bool) -> None:
        """``apply_update``; with ``defer``, solvers with a ``step_history`` leave the
        gradients in the diffs and the steps in the history."""
        param, net = self.param, self.net
        rate = self._rate = self.learning_rate()
        if param.display and self.iter % param.display == 0:
            log.info("Iteration %d, lr = %s", self.iter, fmt(rate))
        self._clip_gradients()
        xp = self.xp
        local_rates = [rate * lr_mult for lr_mult in net.params_lr]
        local_decays = [param.weight_decay * mult for mult in net.params_weight_decay]
        # A data-parallel run's diffs hold the sum over its ranks: divide by their count too.
        divisor = param.iter_size * (self.parallel.size if self.parallel else 1)
        normalize = 1.0 / divisor if divisor > 1 else None
        decay_type_l2 = param.regularization_type == "L2"
        # With debug_info the [Update] lines show the weights before the step, so the step
        # is subtracted afterwards; otherwise while the block is still in the cache.
        subtract = not net.debug_info
        held = self.step_history
        defer = defer and subtract and held is not None

        def update(block: Block, scratch: tuple[Any, Any]) -> None:
            grad, data = block.diff, block.data
            if normalize is not None:
                grad *= normalize
            local_decay = local_decays[block.index]
            if local_decay:
                decay = scratch[0]
                if decay_type_l2:
                    xp.multiply(data, local_decay, out=decay)
                else:
                    xp.sign(data, out=decay)
                    decay *= local_decay
                grad += decay
            self.compute_update_value(grad, block.history, scratch, local_rates[block.index])
            step = grad if held is None else block.history[held]
            if subtract:
                data -= step
            if step is not grad and not defer:
                grad[...] = step

        fused = None
        if subtract and decay_type_l2 and self._blocks.contiguous:
            fused = self.fused_update(local_rates, local_decays, normalize or 1.0, defer)
        self._blocks.run(self._param_blocks(), fused or update)
        self.net.reset_param_diff_bounds(math.inf)  # the diffs now hold steps, or gradients
        self._steps_owed = defer
        if not subtract:
            self._update_debug_info()
            for blob in net.learnable_params:
                blob.data -= blob.diff
        self.iter += 1

    def _param_blocks(self) -> list[Block]:
        """The blocks of the learnable parameters and their history."""
        return self._blocks.blocks(self.net.learnable_params, self.history)

    def _settle_steps(self) -> None:
        """Copy the steps an update left in the history into the diffs (``step_history``)."""
        if not self._steps_owed:
            return
        self._steps_owed = False
        held = self.step_history

        def settle(block: Block, _: Any) -> None:
            block.diff[...] = block.history[held]

        self._blocks.run(self._param_blocks(), settle)

    def _clip_gradients(self) -> None:
        clip = self.param.clip_gradients
        if clip < 0:
            return
        xp = self.xp
        sumsq = sum(xp.vdot(b.diff.ravel(), b.diff.ravel()) for b in self.net.learnable_params)
        # Caffe clips the mean over the ranks of a data-parallel run; the diffs hold the sum.
        norm = math.sqrt(float(sumsq)) / (self.parallel.size if self.parallel else 1)
        if norm > clip:
            scale = clip / norm
            log.info(
                "Gradient clipping: scaling down gradients (L2 norm %s > %s) by scale factor %s",
                fmt(norm),
                fmt(clip),
                fmt(scale),
            )
            for blob in self.net.learnable_params:
                blob.diff *= scale

    def _update_debug_info(self) -> None:
        """Caffe's Net::UpdateDebugInfo lines: mean |w| and mean |step| per parameter."""
        for (layer, index), blob in zip(
            self.net.learnable_param_ids, self.net.learnable_params, strict=True
        ):
            data = float(self.xp.abs(blob.data).sum()) / max(blob.count, 1)
            diff = float(self.xp.abs(blob.diff).sum()) / max(blob.count, 1)
            log.info(
                "    [Update] Layer %s, param %d data: %s; diff: %s",
                layer,
                index,
                fmt(data),
                fmt(diff),
            )

    def compute_update_value(
        self, grad: Any, history: tuple[Any, ...], scratch: tuple[Any, Any], local_rate: float
    ) -> None:
        """Turn the regularised gradient ``grad`` into the step, in place (subtracted from
        the weights afterwards), or into history set ``step_history``, leaving ``grad`` as
        scratch. Called per block: ``grad``, the ``history`` buffers (one
        per history set) and the two ``scratch`` arrays are views of equal shape, so the
        code must be element-wise."""
        raise NotImplementedError

    def fused_update(
        self,
        local_rates: Sequence[float],
        local_decays: Sequence[float],
        scale: float,
        defer: bool,
    ) -> BlockWork | None:
        """A whole update of one block (normalise by ``scale``, L2-regularise, compute the
        step, subtract it from the weights, and leave in the diff the step or, with
        ``defer``, anything) done with fewer passes than the element-wise chain; or None, for
        the chain. Offered only on contiguous numpy blocks; the result must be the same
        formula, up to float rounding."""
        return None

    # -- testing -------------------------------------------------------------------------
    def test_all(self) -> None:
        """Test every test net (Caffe's TestAll)."""
        for i in range(len(self.test_nets)):
            if self.requested_early_exit:
                break
            self.test(i)

    def test(self, index: int) -> None:
        """One test pass of test net ``index`` with the train net's current weights."""
        log.info("Iteration %d, Testing net (#%d)", self.iter, index)
        net = self.test_nets[index]
        net.share_weights_from(self.net)
        result = score(net, self.param.test_iter[index], should_stop=self._test_interrupted)
        if result is None:
            log.info("Test interrupted.")
            return
        if self.param.test_compute_loss:
            log.info("Test loss: %s", fmt(result.loss))
        for line in output_lines("Test", result.entries):
            log.info("%s", line)
        if self.metrics is not None:
            loss = result.loss if self.param.test_compute_loss else None
            self.metrics.test(self.iter, index, result.as_dict(), loss)

    def _test_interrupted(self) -> bool:
        """Caffe's check before each test batch: honour every pending request."""
        while (request := self._requested_action()) != "none":
            if request == "snapshot":
                self.snapshot()
            elif request == "stop":
                self.requested_early_exit = True
        return self.requested_early_exit

    # -- snapshots -----------------------------------------------------------------------
    def snapshot(self) -> Path:
        """Write ``<prefix>_iter_<it>.caffemodel[.h5]`` and ``.solverstate[.h5]``; returns the
        solverstate's path. Each file appears whole or not at all. On the ranks other than 0
        of a data-parallel run nothing is written (rank 0 writes the run's snapshot)."""
        self._settle_steps()
        param = self.param
        hdf5 = param.snapshot_format == pb.SolverParameter.HDF5
        suffix = ".h5" if hdf5 else ""
        model = snap.snapshot_filename(param.snapshot_prefix, self.iter, ".caffemodel" + suffix)
        state_path = snap.snapshot_filename(
            param.snapshot_prefix, self.iter, ".solverstate" + suffix
        )
        if not self.is_root:
            return Path(state_path)
        if hdf5:
            log.info("Snapshotting to HDF5 file %s", model)
            self.net.save_hdf5(model, write_diff=param.snapshot_diff)
        else:
            log.info("Snapshotting to binary proto file %s", model)
            try:
                self.net.save(model, write_diff=param.snapshot_diff)
            except MemoryError:
                raise self._snapshot_out_of_memory(model) from None
        kind = "HDF5" if hdf5 else "binary proto"
        log.info("Snapshotting solver state to %s file %s", kind, state_path)
        try:
            snap.write_state(state_path, self.state(model))
        except MemoryError:
            raise self._snapshot_out_of_memory(state_path) from None
        return Path(state_path)

    def _snapshot_out_of_memory(self, path: str) -> ShapeError:
        """A binary snapshot is one protobuf message, built and serialized whole (a few
        copies of the weights or history at its peak); HDF5 writes one blob at a time."""
        nbytes = sum(b.count for b in self.net.learnable_params) * self.dtype.itemsize
        return ShapeError(
            f"{path}: out of memory while serializing the snapshot ({human(nbytes)} of "
            "parameters, and as much again per history buffer); set snapshot_format: HDF5 in "
            "the solver, which writes one blob at a time"
        )

    def state(self, learned_net: str | None = None) -> snap.SolverSnapshot:
        """The solver's resumable state (history, counters, generator, data cursors)."""
        layer_states = list(self.net.layer_states())
        for i, net in enumerate(self.test_nets):
            layer_states += [(f"{snap.TEST_PREFIX}{i}:{n}", s) for n, s in net.layer_states()]
        return snap.SolverSnapshot(
            iter=self.iter,
            current_step=self.current_step,
            learned_net=learned_net,
            history=[to_numpy(h) for h in self.history],
            rng_state=json.dumps(self.rng.bit_generator.state).encode(),
            layer_states=layer_states,
            solver_type=self.type,
        )

    def restore(self, path: str | os.PathLike) -> None:
        """Resume from a ``.solverstate`` or ``.solverstate.h5`` (Caffe's Solver::Restore):
        iteration, LR step, history, the weights of ``learned_net`` and, in netforge's own
        snapshots, the random generator and the data cursors."""
        state = snap.read_state(path)
        if state.solver_type is not None and state.solver_type != self.type:
            raise ConfigError(
                f"{path}: written by a {state.solver_type} solver, but this solver is "
                f'{self.type}; resume with type: "{state.solver_type}", or start the new '
                "solver from the weights alone (--weights with the caffemodel)"
            )
        expected = len(self.history)
        found = len(state.history)
        if found != expected:
            per_param = len(self.net.learnable_params)
            hint = ""
            if per_param and found % per_param == 0 and found // per_param != self.history_sets:
                hint = (
                    f"; it was written by a solver keeping {found // per_param} buffer(s) per "
                    f"parameter, this {self.type} solver keeps {self.history_sets}: the solver "
                    "type differs from the snapshot's"
                )
            raise ConfigError(
                f"{path}: holds {found} history blobs, this {self.type} solver needs "
                f"{expected}{hint}"
            )
        for i, (current, stored) in enumerate(zip(self.history, state.history, strict=True)):
            if current.size != stored.size:
                raise ConfigError(
                    f"{path}: history blob {i} has shape {stored.shape}, the net's parameter "
                    f"needs {current.shape}; the snapshot belongs to a different net"
                )
        # The data cursors first, undone if they or the weights cannot be restored: a
        # corrupt file then leaves the solver as it was.
        nets = [self.net, *self.test_nets]
        before = [net.layer_states() for net in nets]
        try:
            self._restore_layer_states(state.layer_states, path)
            if state.learned_net:
                self.net.copy_from(str(self._learned_net_path(state.learned_net, path)))
        except BaseException:
            for net, states in zip(nets, before, strict=True):
                net.set_layer_states(states)
            raise
        self.iter = state.iter
        self.current_step = state.current_step
        self.history = [
            self.backend.asarray(h.reshape(c.shape), dtype=self.dtype)
            for h, c in zip(state.history, self.history, strict=True)
        ]
        if state.rng_state is not None:
            self.rng.bit_generator.state = json.loads(state.rng_state)
        # A resumed run judges its losses from its own first iteration on.
        self._last_good = LastGood(self)
        self._loss_watch = LossWatch(self.net, self.param.max_iter)
        log.info("%s: restoring history (iteration %d)", self.type, self.iter)

    @staticmethod
    def _learned_net_path(learned_net: str, state_path: str | os.PathLike) -> Path:
        """Caffe resolves ``learned_net`` against the working directory; netforge also finds
        it beside the solverstate, so moved snapshot pairs still resume."""
        recorded = Path(learned_net)
        for candidate in (recorded, Path(state_path).parent / recorded.name):
            if os.path.isfile(candidate):  # False, not an OSError, for a name too long
                return candidate
        raise DataError(
            f"{state_path}: its weights file {learned_net} (learned_net) does not exist, "
            f"neither from the working directory nor beside the solver state; run from the "
            "directory training ran in, or put the .caffemodel beside the .solverstate"
        )

    def _restore_layer_states(
        self, entries: list[tuple[str, bytes]], path: str | os.PathLike
    ) -> None:
        if not entries:
            return
        per_net: list[list[tuple[str, bytes]]] = [[] for _ in range(len(self.test_nets) + 1)]
        for name, blob in entries:
            net_index = 0
            found = snap.TEST_NAME.fullmatch(name)
            if found:  # read_state checked that every "#test" name has this form
                net_index, name = int(found.group(1)) + 1, found.group(2)
            if net_index < len(per_net):
                per_net[net_index].append((name, blob))
        for net, states in zip([self.net, *self.test_nets], per_net, strict=True):
            if not states:
                continue
            try:
                net.set_layer_states(states)
            except NetforgeError as exc:
                raise DataError(f"{path}: {exc}") from None
            except Exception as exc:  # each layer decodes its own state: any type can fail
                raise DataError(
                    f"{path}: the saved data-layer state is corrupt ({type(exc).__name__}: "
                    f"{exc}); resume from another snapshot, or start from its weights with "
                    "--weights"
                ) from None
