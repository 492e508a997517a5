"""``netforge convert imageset|hdf5`` and ``netforge compute-mean``: shells over netforge.data."""

from __future__ import annotations

import sys

import click

from netforge.data import convert as conv
from netforge.data.listfile import read_list


def _report(summary: conv.Summary, written: str) -> None:
    """The closing summary (each skipped image was already logged as a warning)."""
    skipped = f"; skipped {len(summary.skipped)} unreadable image(s)" if summary.skipped else ""
    click.echo(f"wrote {written}{skipped}")


def _run_with_progress(list_file: str, label: str, work) -> conv.Summary:
    total = len(read_list(list_file))
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        return work(bar.update)


def _image_list_options(command):
    """The options both converters share: how the listed images are read and ordered."""
    options = (
        click.argument("root", type=click.Path()),
        click.argument("listfile", type=click.Path()),
        click.option("--gray", is_flag=True, help="Read images as single-channel gray."),
        click.option("--shuffle", is_flag=True, help="Shuffle the list before writing."),
        click.option("--seed", type=int, default=None, help="Seed of --shuffle."),
        click.option("--resize-height", "--resize_height", type=int, default=0, show_default=True),
        click.option("--resize-width", "--resize_width", type=int, default=0, show_default=True),
    )
    # Decorators apply bottom-up and click lists the top one first: apply them in reverse.
    for option in reversed(options):
        command = option(command)
    return command


@click.group()
def convert() -> None:
    """Convert images into the databases and files the data layers read."""


@convert.command("imageset")
@_image_list_options
@click.argument("db", type=click.Path())
@click.option("--backend", default="lmdb", show_default=True, help="Database backend.")
@click.option("--check-size", "--check_size", is_flag=True, help="Fail if images differ in size.")
@click.option("--encoded", is_flag=True, help="Store the compressed image bytes.")
@click.option(
    "--encode-type", "--encode_type", default="", help="Re-encode as this type (implies --encoded)."
)
def imageset(
    root,
    listfile,
    db,
    gray,
    shuffle,
    seed,
    backend,
    resize_height,
    resize_width,
    check_size,
    encoded,
    encode_type,
) -> None:
    """Caffe's convert_imageset: images in ROOT named by LISTFILE into the LMDB DB.

    LISTFILE lines are '<path> <label>' or '<path> <target> <target> ...' (multi-label or
    regression targets, stored in the Datum's 'targets' field).
    """
    summary = _run_with_progress(
        listfile,
        "converting",
        lambda update: conv.convert_imageset(
            root,
            listfile,
            db,
            gray=gray,
            shuffle=shuffle,
            backend=backend,
            resize_height=resize_height,
            resize_width=resize_width,
            check_size=check_size,
            encoded=encoded,
            encode_type=encode_type,
            seed=seed,
            progress=update,
        ),
    )
    resumed = f" (resumed at list entry {summary.resumed_at})" if summary.resumed_at else ""
    _report(summary, f"{summary.written} records to {db}{resumed}")


@convert.command("hdf5")
@_image_list_options
@click.argument("out_dir", type=click.Path())
@click.option(
    "--scale",
    type=float,
    default=1.0,
    show_default=True,
    help="Multiply the stored data (HDF5Data does not transform).",
)
@click.option("--rows-per-file", type=int, default=1000, show_default=True)
@click.option("--data-name", default="data", show_default=True, help="Dataset (top) name.")
@click.option("--label-name", default="label", show_default=True, help="Dataset (top) name.")
def hdf5(
    root,
    listfile,
    out_dir,
    gray,
    shuffle,
    seed,
    resize_height,
    resize_width,
    scale,
    rows_per_file,
    data_name,
    label_name,
) -> None:
    """Images or .npy arrays named by LISTFILE, with their labels or targets, into chunked
    HDF5 files in OUT_DIR plus OUT_DIR/list.txt for an HDF5Data layer's source."""
    summary = _run_with_progress(
        listfile,
        "converting",
        lambda update: conv.convert_hdf5(
            root,
            listfile,
            out_dir,
            gray=gray,
            shuffle=shuffle,
            resize_height=resize_height,
            resize_width=resize_width,
            scale=scale,
            rows_per_file=rows_per_file,
            data_name=data_name,
            label_name=label_name,
            seed=seed,
            progress=update,
        ),
    )
    files = len(summary.outputs) - 1
    _report(
        summary, f"{summary.written} rows to {files} HDF5 file(s) listed in {summary.outputs[-1]}"
    )


@click.command("compute-mean")
@click.argument("db", type=click.Path())
@click.argument("output", type=click.Path(), required=False)
@click.option("--backend", default="lmdb", show_default=True, help="Database backend.")
def compute_mean(db, output, backend) -> None:
    """Caffe's compute_image_mean: the mean image of DB, saved to OUTPUT (.binaryproto),
    and the per-channel means (for mean_value)."""
    from netforge.weights import write_mean

    mean, count = conv.compute_mean(db, backend)
    if output:
        write_mean(output, mean)
    for channel, value in enumerate(mean.reshape(len(mean), -1).mean(axis=1)):
        click.echo(f"mean_value channel [{channel}]: {value:g}")
    click.echo(f"{count} records" + (f"; mean written to {output}" if output else ""))
