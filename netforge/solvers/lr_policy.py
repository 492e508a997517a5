"""Caffe's learning-rate policies (SGDSolver::GetLearningRate).

``it`` is the solver's iteration counter before the update it is computed for. The rate is
a Python float; in a float32 net it meets the arrays as a float32, as Caffe's ``Dtype`` rate.
"""

from __future__ import annotations

import logging
import math

from netforge.errors import ConfigError
from netforge.proto import pb

log = logging.getLogger("netforge")

POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")
_NEEDS_GAMMA = ("step", "exp", "inv", "multistep", "sigmoid")


def check_policy(param: pb.SolverParameter, source: str = "solver") -> None:
    """Raise ConfigError for what Caffe would reject at its first GetLearningRate call.

    Caffe fails only once training reaches the first update; netforge checks when the solver
    is built, so a typo does not cost a test pass first.
    """
    policy = param.lr_policy
    if policy not in POLICIES:
        shown = repr(policy) if param.HasField("lr_policy") else "none (lr_policy has no default)"
        raise ConfigError(
            f"{source}: unknown learning rate policy {shown}; "
            f"set lr_policy to one of {', '.join(POLICIES)}"
        )
    if policy in _NEEDS_GAMMA and param.gamma < 0:
        raise ConfigError(f"{source}: lr_policy {policy!r} needs gamma >= 0, got {param.gamma}")
    if policy in ("step", "sigmoid") and param.stepsize <= 0:
        raise ConfigError(f"{source}: lr_policy {policy!r} needs stepsize > 0")
    if policy == "poly" and param.max_iter <= 0:
        raise ConfigError(f"{source}: lr_policy 'poly' needs max_iter > 0")
    # Each policy's rate is monotonic in the iteration: one that overflows or turns complex
    # before max_iter does so at an end, so a bad power or gamma is refused before training.
    for it in sorted({0, max(param.max_iter - 1, 0)}):
        learning_rate(param, it, len(param.stepvalue), source)


def learning_rate(
    param: pb.SolverParameter, it: int, current_step: int, source: str = "solver"
) -> tuple[float, int]:
    """Return ``(rate, current_step)`` for iteration ``it``; a ConfigError naming ``source``
    when the policy's formula gives no finite real rate there (an overflowing ``power``,
    ``poly`` past ``max_iter``).

    ``current_step`` is Caffe's LR step counter: ``step`` recomputes it as ``it // stepsize``;
    ``multistep`` advances it by at most one per call when ``it`` has reached
    ``stepvalue[current_step]`` (and logs Caffe's "MultiStep Status" line), which is why it
    is saved in the solverstate. The other policies leave it unchanged.
    """
    try:
        rate, current_step = _rate(param, it, current_step)
    except (OverflowError, ZeroDivisionError):
        rate = math.inf
    if isinstance(rate, complex) or not math.isfinite(rate):
        raise ConfigError(
            f"{source}: lr_policy {param.lr_policy!r} gives no finite learning rate at "
            f"iteration {it} (base_lr {param.base_lr}, gamma {param.gamma}, power "
            f"{param.power}); check these fields"
        )
    return float(rate), current_step


def _rate(param: pb.SolverParameter, it: int, current_step: int) -> tuple[float | complex, int]:
    policy = param.lr_policy
    base_lr = param.base_lr
    gamma = param.gamma
    if policy == "fixed":
        rate = base_lr
    elif policy == "step":
        current_step = it // param.stepsize
        rate = base_lr * gamma**current_step
    elif policy == "exp":
        rate = base_lr * gamma**it
    elif policy == "inv":
        rate = base_lr * (1.0 + gamma * it) ** (-param.power)
    elif policy == "multistep":
        if current_step < len(param.stepvalue) and it >= param.stepvalue[current_step]:
            current_step += 1
            log.info("MultiStep Status: Iteration %d, step = %d", it, current_step)
        rate = base_lr * gamma**current_step
    elif policy == "poly":
        rate = base_lr * (1.0 - it / param.max_iter) ** param.power
    elif policy == "sigmoid":
        exponent = -gamma * (it - param.stepsize)
        # Past exp's float64 range the rate is 0, as Caffe's float arithmetic gives.
        rate = base_lr / (1.0 + math.exp(exponent)) if exponent < 700 else 0.0
    else:
        raise ConfigError(f"unknown learning rate policy {policy!r}")
    return rate, current_step
