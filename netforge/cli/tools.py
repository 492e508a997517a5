"""``netforge extract-features``, ``netforge parse-log`` and ``netforge plot``: Caffe's
``extract_features`` tool and ``tools/extra``'s log scripts, as thin shells over
``netforge.features`` and ``netforge.logs``."""

from __future__ import annotations

import sys

import click

from netforge.cli.options import allow_python_layers
from netforge.errors import ConfigError


def _names(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


@click.command("extract-features")
@click.argument("weights")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("blobs")
@click.argument("outputs")
@click.argument("num_batches", type=int)
@click.argument("db_type", default="lmdb", type=click.Choice(["lmdb", "leveldb", "hdf5"]))
@click.argument("mode", default="CPU", type=click.Choice(["CPU", "GPU"], case_sensitive=False))
@click.argument("device_id", default=0, type=int)
@allow_python_layers
def extract_features(
    weights: str,
    model: str,
    blobs: str,
    outputs: str,
    num_batches: int,
    db_type: str,
    mode: str,
    device_id: int,
    allow_python_layers: bool,
) -> None:
    """Caffe's extract_features: run MODEL (phase TEST) with WEIGHTS for NUM_BATCHES
    mini-batches and store each sample of each of BLOBS (comma-separated) in the output at
    the same place in OUTPUTS (comma-separated).

    DB_TYPE lmdb or leveldb writes Caffe's records (a Datum of float_data under the key
    %010d of the sample's index); hdf5 writes one .h5 file per blob with a dataset named
    after the blob. MODE is CPU or GPU, DEVICE_ID the GPU. WEIGHTS may be zoo:NAME.
    """
    from netforge import backend as backends
    from netforge.features import extract_features as run
    from netforge.features import plan_outputs
    from netforge.net import Net
    from netforge.proto import pb
    from netforge.train_log import setup_logging
    from netforge.weights import resolve_weights

    setup_logging()
    backend = backends.gpu(device_id) if mode.upper() == "GPU" else backends.CPU
    net = Net(model, phase=pb.TEST, backend=backend, allow_python_layers=allow_python_layers)
    net.copy_from(resolve_weights(weights))
    blob_names, paths = _names(blobs), _names(outputs)
    plan_outputs(net, blob_names, paths, num_batches, db_type)  # errors before the bar shows
    with click.progressbar(length=num_batches, label="extracting", file=sys.stderr) as bar:
        written = run(net, blob_names, paths, num_batches, db_type, progress=bar.update)
    for output in written:
        shape = net.blobs[output.blob].shape[1:]
        dims = "x".join(map(str, shape)) or "1"
        click.echo(
            f"{output.blob}: {output.records} records of {dims} floats to "
            f"{output.path} ({output.kind})"
        )


@click.command("parse-log")
@click.argument("log_file", type=click.Path(dir_okay=False))
@click.argument("output_dir", type=click.Path(file_okay=False))
@click.option("--delimiter", default=",", show_default=True, help="CSV column delimiter.")
@click.option("--verbose", is_flag=True, help="Also say which tables were empty.")
def parse_log(log_file: str, output_dir: str, delimiter: str, verbose: bool) -> None:
    """Caffe's tools/extra/parse_log.py: LOG_FILE's train and test tables as the CSV files
    OUTPUT_DIR/<log name>.train and .test (columns NumIters, Seconds, LearningRate, then
    one per net output).

    LOG_FILE is a Caffe-format log (netforge's or Caffe's stderr) or netforge's JSON-lines
    metrics file.
    """
    from pathlib import Path

    from netforge.logs import save_csv_files

    if not Path(output_dir).is_dir():
        raise ConfigError(f"{output_dir}: no such folder for the CSV files")
    written = save_csv_files(log_file, output_dir, delimiter)
    for path, rows in written:
        click.echo(f"wrote {path} ({rows} rows)")
    if verbose:
        done = {path.suffix for path, _ in written}
        for suffix in sorted({".train", ".test"} - done):
            click.echo(f"not writing {Path(output_dir) / (Path(log_file).name + suffix)}: no rows")


@click.command("plot")
@click.argument("chart_type", type=int)
@click.argument("output", type=click.Path(dir_okay=False))
@click.argument("logs", nargs=-1, required=True, type=click.Path(dir_okay=False))
def plot(chart_type: int, output: str, logs: tuple[str, ...]) -> None:
    """Caffe's plot_training_log.py: chart CHART_TYPE of one or more LOGS into OUTPUT
    (.png, .svg...; needs matplotlib: pip install 'netforge[plot]').

    \b
    Chart types:
      0: Test accuracy vs. Iters        4: Train learning rate vs. Iters
      1: Test accuracy vs. Seconds      5: Train learning rate vs. Seconds
      2: Test loss vs. Iters            6: Train loss vs. Iters
      3: Test loss vs. Seconds          7: Train loss vs. Seconds

    Each log is a Caffe-format log or a netforge JSON-lines metrics file.
    """
    from netforge.plot import describe, plot_chart

    plot_chart(chart_type, output, logs)
    click.echo(f"wrote {output}: {describe(chart_type)} of {len(logs)} log(s)")
