"""What ``caffe train`` decides outside the solver: the device and the signal actions.

``train_backend`` follows tools/caffe.cpp: ``--gpu`` wins; without it the GPU is used only
when the solver file explicitly sets ``solver_mode: GPU`` (then ``device_id``, default 0).
``SignalActions`` is Caffe's SignalHandler: SIGINT and SIGHUP become a pending "stop",
"snapshot" or "none" that the solver asks for after each iteration and test batch.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any

from netforge import backend as backends
from netforge.backend import Backend
from netforge.errors import ConfigError, DeviceError
from netforge.proto import pb

log = logging.getLogger("netforge")

EFFECTS = ("stop", "snapshot", "none")


def train_backend(gpu: str | None, param: pb.SolverParameter) -> Backend:
    """The backend ``caffe train`` would use for ``--gpu`` (an id, a comma list or "all")."""
    from_solver = (
        not gpu and param.HasField("solver_mode") and param.solver_mode == pb.SolverParameter.GPU
    )
    if from_solver:
        gpu = str(param.device_id)
    if not gpu:
        log.info("Use CPU.")
        return backends.CPU
    ids = backends.parse_gpu_ids(gpu)
    if len(ids) != 1:
        # Several GPUs train with one process each (netforge.parallel gives each its id).
        raise ConfigError(f"--gpu {gpu}: one process trains on one GPU, here {len(ids)}")
    log.info("Using GPUs %d", ids[0])
    param.device_id = ids[0]
    try:
        return backends.gpu(ids[0])
    except DeviceError as exc:
        if not from_solver:
            raise
        # Caffe's own solver files say solver_mode: GPU; on a CPU-only machine the user
        # needs to know the override, not only that there is no GPU.
        raise DeviceError(
            f"{exc}; the solver sets solver_mode: GPU: train on the CPU with --cpu "
            "(Caffe's -gpu -1), or set solver_mode: CPU in the solver"
        ) from exc


class SignalActions:
    """A context manager installing SIGINT/SIGHUP handlers; calling it returns the pending
    action ("none" when no signal came) and clears it (Caffe's GetRequestedAction)."""

    def __init__(self, sigint_effect: str = "stop", sighup_effect: str = "snapshot") -> None:
        for name, effect in (("sigint", sigint_effect), ("sighup", sighup_effect)):
            if effect not in EFFECTS:
                raise ConfigError(f"--{name}-effect {effect!r}: use one of {', '.join(EFFECTS)}")
        self.effects = {signal.SIGINT: sigint_effect}
        if hasattr(signal, "SIGHUP"):
            self.effects[signal.SIGHUP] = sighup_effect
        self._pending = "none"
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._pending = self.effects[signum]

    def __enter__(self) -> SignalActions:
        for signum in self.effects:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def __call__(self) -> str:
        action, self._pending = self._pending, "none"
        return action
