"""``netforge train`` and ``netforge test``: Caffe's ``caffe train`` / ``caffe test``.

Thin shells: the flags are mapped as tools/caffe.cpp maps them and the work is the library's
(``netforge.solvers``, ``netforge.solvers.scoring``). Logs go to stderr in glog format, so
Caffe's ``parse_log.py`` reads them; training also writes a JSON-lines metrics file
(``<snapshot_prefix>_metrics.jsonl`` unless ``--metrics`` names one) and, on a terminal, a
progress line.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

import click

from netforge.cli.options import allow_python_layers, one_gpu, one_gpu_backend
from netforge.errors import ConfigError, DivergenceError, NetforgeError

log = logging.getLogger("netforge")

EFFECT = click.Choice(["stop", "snapshot", "none"])


def _stages(stage: str | None) -> list[str]:
    # Caffe's quirk (an empty --stage adds one empty stage) changes nothing: no include rule
    # names the empty stage, so an absent or empty flag adds none.
    return stage.split(",") if stage else []


def _names(text: str | None) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()] if text else []


@click.command()
@click.option("--solver", required=True, help="Solver prototxt.")
@click.option("--weights", default=None, help="Caffemodel(s) to fine-tune from: A[,B]; zoo:NAME.")
@click.option("--snapshot", default=None, help="A .solverstate(.h5) to resume from.")
@click.option(
    "--gpu",
    default=None,
    help="GPU id, ids (0,1: a rank per GPU, NCCL) or 'all' (-1: the CPU); else the solver's.",
)
@click.option("--cpu", is_flag=True, help="Train on the CPU whatever the solver's solver_mode.")
@click.option("--stage", default=None, help="Comma-separated NetState stages of the train net.")
@click.option("--level", default=0, show_default=True, help="NetState level of the train net.")
@click.option("--iterations", type=int, default=None, help="Train to this many iterations.")
@click.option("--sigint-effect", type=EFFECT, default="stop", show_default=True)
@click.option("--sighup-effect", type=EFFECT, default="snapshot", show_default=True)
@click.option("--reinit", default=None, help="Layers not to copy from --weights: L[,L].")
@click.option("--freeze", multiple=True, help="Glob of layers to freeze (lr_mult 0).")
@click.option("--metrics", default=None, help="JSON-lines metrics file.")
@click.option(
    "--tensorboard",
    default=None,
    metavar="DIR",
    help="Also write the metrics as TensorBoard events in DIR (netforge[tensorboard]).",
)
@click.option("--allow-nonfinite", is_flag=True, help="Carry on when the loss diverges.")
@allow_python_layers
def train(
    solver: str,
    weights: str | None,
    snapshot: str | None,
    gpu: str | None,
    cpu: bool,
    stage: str | None,
    level: int,
    iterations: int | None,
    sigint_effect: str,
    sighup_effect: str,
    reinit: str | None,
    freeze: tuple[str, ...],
    metrics: str | None,
    tensorboard: str | None,
    allow_nonfinite: bool,
    allow_python_layers: bool,
) -> None:
    """Train (or resume training) the net of a solver prototxt."""
    from netforge.parallel.comm import launched_size
    from netforge.parallel.launch import (
        prepare_rank,
        rank_communicator,
        run_gpu_ranks,
        start_rank,
        use_device,
    )
    from netforge.solvers import get_solver
    from netforge.solvers.control import SignalActions, train_backend
    from netforge.train_log import MetricsWriter, ProgressLine, setup_logging

    logger = setup_logging()
    # Under a launcher every rank runs these checks alone, and a bad flag or file fails them
    # all: the error waits for the ranks to connect, to be reported once for all of them.
    failure: NetforgeError | None = None
    try:
        param, gpu, gpus = _solver_and_gpus(
            solver, snapshot, weights, gpu, cpu, stage, level, iterations
        )
    except NetforgeError as exc:
        failure, gpus = exc, []
    if failure is None and len(gpus) > 1 and launched_size() == 1:
        # One process per GPU, each running this command on its own GPU, NCCL among them.
        run_gpu_ranks(gpus, _train_gpu_rank, (dict(click.get_current_context().params),))
        return
    comm = rank_communicator()  # MPI under mpiexec, NCCL in a rank of the above, or None
    if comm is not None and comm.rank:
        logger.setLevel(logging.WARNING)  # rank 0 reports for all, as Caffe's root solver
    if failure is None:
        with _rank_errors(comm):  # only what is not a NetforgeError ends the job at once
            try:
                if comm is not None and len(gpus) > 1:
                    gpu = str(gpus[comm.rank % len(gpus)])  # under mpiexec: the r-th GPU
                    use_device(int(gpu))
                backend = train_backend(gpu, param)
            except NetforgeError as exc:
                failure = exc
    _stop_on_failure(comm, failure)
    with _rank_errors(comm):  # a rank failing alone must not leave the others waiting
        if comm is not None:
            prepare_rank(param, comm)  # after the weights: only rank 0 loads them
    root = comm is None or comm.rank == 0
    with SignalActions(sigint_effect, sighup_effect) as actions, _rank_errors(comm):
        the_solver = get_solver(
            param,
            backend=backend,
            reinit=_names(reinit),
            freeze=freeze,
            allow_nonfinite=allow_nonfinite,
            allow_python_layers=allow_python_layers,
            source=solver,
        )
        for path, report in the_solver.copy_reports:
            log.info("Weights from %s:", path)
            for line in report.lines():
                log.info("  %s", line)
        the_solver.set_action_function(actions)
        if root:
            the_solver.metrics = MetricsWriter(metrics or f"{param.snapshot_prefix}_metrics.jsonl")
            if tensorboard:
                from netforge.tensorboard import Tee, TensorBoardWriter

                the_solver.metrics = Tee(the_solver.metrics, TensorBoardWriter(tensorboard))
        if root and sys.stderr.isatty():
            the_solver.progress = ProgressLine(sys.stderr)
            the_solver.progress.attach(logger)
        try:
            if snapshot and root:  # the other ranks get its state by start_rank's broadcast
                log.info("Resuming from %s", snapshot)
                the_solver.restore(snapshot)
            if comm is not None:
                start_rank(the_solver, comm)
            log.info("Starting Optimization")
            the_solver.solve()
        finally:
            if the_solver.metrics is not None:
                the_solver.metrics.close()
            if the_solver.progress is not None:
                the_solver.progress.clear()


def _solver_and_gpus(
    solver: str,
    snapshot: str | None,
    weights: str | None,
    gpu: str | None,
    cpu: bool,
    stage: str | None,
    level: int,
    iterations: int | None,
) -> tuple[Any, str | None, list[int]]:
    """The solver message the flags make of the ``--solver`` file, the ``--gpu`` left
    (None for ``--cpu``) and its GPU ids."""
    from netforge.parallel.launch import gpu_ids
    from netforge.proto import pb
    from netforge.prototxt import read_solver

    if snapshot and weights:
        raise ConfigError(
            "give --snapshot to resume training or --weights to fine-tune, but not both"
        )
    param = read_solver(solver)
    param.train_state.level = level
    param.train_state.stage.extend(_stages(stage))
    if iterations is not None:
        if iterations <= 0:
            raise ConfigError(f"--iterations must be positive, got {iterations}")
        param.max_iter = iterations
    if cpu or gpu == "-1":
        if gpu not in (None, "-1"):
            raise ConfigError(f"--cpu and --gpu {gpu} contradict each other; give one")
        param.solver_mode = pb.SolverParameter.CPU
        gpu = None
    if snapshot or weights:
        param.ClearField("weights")
    if weights:
        param.weights.append(weights)
    return param, gpu, gpu_ids(gpu)


def _stop_on_failure(comm: Any, failure: NetforgeError | None) -> None:
    """Raise ``failure``, the error of the checks before training; in a rank of a
    data-parallel run, rank 0 raises the ranks' joint error (reported once, naming how many
    saw it) and the others exit quietly with its status, whichever ranks failed."""
    from netforge.parallel.launch import agree_on_failure

    if comm is not None:
        failure = agree_on_failure(comm, failure)
        if failure is not None and comm.rank:
            raise click.exceptions.Exit(failure.exit_code)
    if failure is not None:
        raise failure


@contextlib.contextmanager
def _rank_errors(comm: Any) -> Iterator[None]:
    """In a rank of a data-parallel run: an error must not leave the other ranks waiting.

    A divergence is found by every rank together (the gradients are summed first): rank 0
    reports it and the others exit with its status, quietly. Any other error is this rank's
    alone: it is reported with the rank, and the whole job is aborted."""
    try:
        yield
    except DivergenceError as exc:
        if comm is not None and comm.rank:
            raise click.exceptions.Exit(exc.exit_code) from None
        raise
    except (Exception, KeyboardInterrupt) as exc:
        if comm is None or isinstance(exc, click.exceptions.Exit):
            raise
        text = str(exc) if isinstance(exc, NetforgeError) else f"{type(exc).__name__}: {exc}"
        click.echo(f"netforge: error: rank {comm.rank} of {comm.size}: {text}", err=True)
        comm.abort(getattr(exc, "exit_code", 1))


def _train_gpu_rank(params: dict[str, Any]) -> None:
    """One rank of ``train --gpu 0,1,...``, in its own process (see ``run_gpu_ranks``)."""
    from netforge.parallel.launch import assigned_device

    params["gpu"] = str(assigned_device())
    try:
        train.callback(**params)
    except NetforgeError as exc:
        click.echo(f"netforge: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:  # a rank that leaves the report to rank 0
        sys.exit(exc.exit_code)


@click.command()
@click.option("--model", required=True, help="Net prototxt to score (phase TEST).")
@click.option("--weights", required=True, help="Trained caffemodel (or zoo:NAME).")
@click.option("--iterations", default=50, show_default=True, help="Batches to score.")
@one_gpu
@click.option("--stage", default=None, help="Comma-separated NetState stages.")
@click.option("--level", default=0, show_default=True, help="NetState level.")
@allow_python_layers
def test(
    model: str,
    weights: str,
    iterations: int,
    gpu: str | None,
    stage: str | None,
    level: int,
    allow_python_layers: bool,
) -> None:
    """Score a trained model: mean outputs over --iterations batches (Caffe's caffe test)."""
    from netforge.backend import to_numpy
    from netforge.net import Net
    from netforge.proto import pb
    from netforge.solvers.scoring import score
    from netforge.train_log import fmt, setup_logging
    from netforge.weights import resolve_weights

    setup_logging()
    if iterations <= 0:
        raise ConfigError(f"--iterations must be positive, got {iterations}")
    backend = one_gpu_backend(gpu)
    net = Net(
        model,
        phase=pb.TEST,
        stages=_stages(stage),
        level=level,
        backend=backend,
        allow_python_layers=allow_python_layers,
    )
    for name in _names(weights):
        path = resolve_weights(name)
        report = net.copy_from(path)
        log.info("Weights from %s:", path)
        for line in report.lines():
            log.info("  %s", line)
    log.info("Running for %d iterations.", iterations)

    def log_batch(i: int, outputs: dict) -> None:
        for name, value in outputs.items():
            for v in to_numpy(value).ravel():
                log.info("Batch %d, %s = %s", i, name, fmt(v))

    result = score(net, iterations, on_batch=log_batch)
    log.info("Loss: %s", fmt(result.loss))
    for name, mean, weight in result.entries:
        suffix = f" (* {fmt(weight)} = {fmt(weight * mean)} loss)" if weight else ""
        log.info("%s = %s%s", name, fmt(mean), suffix)
