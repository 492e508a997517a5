"""``netforge zoo list|info|download`` and ``netforge classify``: thin shells over netforge.zoo
and netforge.Classifier."""

from __future__ import annotations

import os
import time

import click
import numpy as np

from netforge import zoo as nz
from netforge.cli.options import allow_python_layers
from netforge.errors import ConfigError
from netforge.zoo.manifest import Manifest


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None


def _ints(text: str | None) -> tuple[int, ...] | None:
    values = _floats(text)
    return None if values is None else tuple(int(v) for v in values)


@click.group(name="zoo")
def zoo() -> None:
    """Pretrained Caffe models: list them, read their manifests, download them verified."""


@zoo.command("list")
def list_command() -> None:
    """List the zoo's models with their licence."""
    manifests = nz.list_manifests()
    width = max((len(m.name) for m in manifests), default=0)
    for m in manifests:
        click.echo(f"{m.name:<{width}}  {m.title}  [{m.licence}]")


def _describe(m: Manifest) -> list[str]:
    lines = [f"{m.name}: {m.title}", f"  licence: {m.licence}"]
    if m.source:
        lines.append(f"  source: {m.source}")
    for role, path in m.prototxts.items():
        lines.append(f"  prototxt {role}: {path}")
    for f in m.files:
        size = f"{f.size} bytes" if f.size is not None else "size not published"
        lines.append(f"  file {f.role}: {f.name} ({size})")
        for digest in ("sha1", "sha256"):
            if getattr(f, digest):
                lines.append(f"    {digest}: {getattr(f, digest)}")
        lines.extend(f"    url: {u}" for u in f.urls)
    pre = m.preprocessing
    mean = f"file {pre.mean_file}" if pre.mean_file else f"values {pre.mean_values}"
    lines.append(
        f"  preprocessing: resize {pre.resize}, mean {mean}, raw_scale {pre.raw_scale}, "
        f"scale {pre.scale}, channel_swap {pre.channel_swap}, labels {pre.labels}"
    )
    if m.notes:
        lines.append(f"  notes: {m.notes}")
    return lines


@zoo.command("info")
@click.argument("name")
def info_command(name: str) -> None:
    """Show a model's files, checksums, mirrors, prototxts and preprocessing.

    NAME is a zoo name, a manifest .json, or a Caffe model folder with a readme.md.
    """
    for line in _describe(nz.load_manifest(name)):
        click.echo(line)


@zoo.command("download")
@click.argument("name")
@click.option(
    "--dir",
    "folder",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder to download into (default: the user cache, see NETFORGE_HOME).",
)
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds per read.")
def download_command(name: str, folder: str | None, timeout: float) -> None:
    """Download a model's files, verify their checksums, and print where they are.

    A partial download resumes; NETFORGE_ZOO_MIRROR, when set, is tried first.
    """
    manifest = nz.load_manifest(name)
    paths = nz.download_model(manifest, folder, timeout=timeout, progress=nz.terminal_progress)
    for role, path in paths.items():
        click.echo(f"{role}: {path}")


def _classify_inputs(inputs: tuple[str, ...], output: str | None) -> tuple[tuple[str, ...], str]:
    """classify.py's ``INPUT OUTPUT.npy`` form: a last argument that ends in .npy and does
    not exist yet, or holds the (N, classes) scores of an earlier run (no image input has
    two axes), is the output file."""
    last = inputs[-1]
    if output is None and len(inputs) > 1 and last.endswith(".npy"):
        if not os.path.exists(last) or _npy_axes(last) == 2:
            return inputs[:-1], last
    return inputs, output


def _npy_axes(path: str) -> int | None:
    """The number of axes of the array in an .npy file (None when it is not one)."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False).ndim
    except (OSError, ValueError):
        return None


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--weights", "--pretrained_model", required=True, help="A .caffemodel(.h5), or zoo:NAME."
)
@click.option(
    "--model", "--model_def", default=None, help="Deploy prototxt (default: the zoo model's)."
)
@click.option(
    "--output", "-o", default=None, help="Save the (N, classes) probabilities here (.npy)."
)
@click.option(
    "--center_only",
    "--center-only",
    is_flag=True,
    help="Classify the centre crop alone instead of averaging the ten crops (corners, centre "
    "and their mirrors).",
)
@click.option("--top-k", type=int, default=5, show_default=True)
@click.option("--labels", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option(
    "--mean_file",
    "--mean-file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="A (C, H, W) or (C,) mean, .npy or .binaryproto (resized to the net's input).",
)
@click.option(
    "--mean-values", default=None, help="Per-channel mean in the net's order, e.g. 104,117,123."
)
@click.option(
    "--raw_scale",
    "--raw-scale",
    type=float,
    default=None,
    help="Multiplies [0,1] pixels (default 255).",
)
@click.option(
    "--input_scale", "--input-scale", type=float, default=None, help="Multiplies after the mean."
)
@click.option(
    "--images_dim",
    "--images-dim",
    default=None,
    help="H,W to resize to before cropping (default: the net's input).",
)
@click.option(
    "--channel_swap",
    "--channel-swap",
    default=None,
    help="Order of RGB channels for the net (default 2,1,0; '' for none).",
)
@click.option("--ext", default="jpg", show_default=True, help="Image extension read from folders.")
@click.option("--gpu", is_flag=True, help="Run on the GPU (the one --device names).")
@click.option("--device", type=int, default=0, show_default=True, help="GPU id for --gpu.")
@allow_python_layers
def classify(
    inputs: tuple[str, ...],
    weights: str,
    model: str | None,
    output: str | None,
    center_only: bool,
    top_k: int,
    labels: str | None,
    mean_file: str | None,
    mean_values: str | None,
    raw_scale: float | None,
    input_scale: float | None,
    images_dim: str | None,
    channel_swap: str | None,
    ext: str,
    gpu: bool,
    device: int,
    allow_python_layers: bool,
) -> None:
    """Classify images and print each one's top-k classes (pycaffe's classify.py).

    Each INPUT is an image, a folder (its *.EXT images) or an .npy array of (N, H, W, K)
    images in [0, 1]. As classify.py, the ten crops of each image are averaged unless
    --center_only; --output (or a last argument OUTPUT.npy, new or an earlier run's) saves the
    probabilities. With --weights zoo:NAME the manifest gives the deploy prototxt,
    preprocessing, mean and labels; options given here override them.
    """
    from netforge.backend import CPU
    from netforge.backend import gpu as gpu_backend
    from netforge.zoo.classify import load_inputs, resolve_setup, save_scores, top_predictions

    inputs, output = _classify_inputs(inputs, output)
    ids = [item for item in inputs if item.isdigit() and not os.path.exists(item)]
    if gpu and ids:
        # Caffe's tools take -gpu N; classify.py's --gpu is a switch, so N landed here.
        raise ConfigError(
            f"{ids[0]!r} is not an input: classify's --gpu is a switch (as classify.py's); "
            f"give the GPU id with --device {ids[0]}"
        )
    setup = resolve_setup(
        weights,
        model,
        labels=labels,
        mean_file=mean_file,
        mean_values=_floats(mean_values),
        raw_scale=raw_scale,
        scale=input_scale,
        resize=_ints(images_dim),
        channel_swap=() if channel_swap == "" else _ints(channel_swap),
    )
    classifier = setup.classifier(
        allow_python_layers=allow_python_layers,
        backend=gpu_backend(device) if gpu else CPU,
    )
    # A net of one input channel (the digits model) classifies grey images.
    color = classifier.blobs[classifier.inputs[0]].shape[1] != 1
    names, images = [], []
    for item in inputs:
        item_names, item_images = load_inputs(item, ext, color)
        names.extend(item_names)
        images.extend(item_images)
    # classify.py's progress lines, on stderr so that standard output stays the table.
    crops = "the centre crop" if center_only else "ten crops each"
    click.echo(f"Classifying {len(images)} inputs ({crops}).", err=True)
    started = time.perf_counter()
    scores = classifier.predict(images, oversample=not center_only)
    click.echo(f"Done in {time.perf_counter() - started:.2f} s.", err=True)
    if output is not None:
        output = save_scores(output, scores)
    for name, predictions in zip(names, top_predictions(scores, setup.labels, top_k)):
        click.echo(name)
        for p in predictions:
            click.echo(f"  {p.score:.4f}  {p.label}")
    if output is not None:
        click.echo(f"Saved {scores.shape[0]}x{scores.shape[1]} probabilities to {output}")
