"""``netforge export onnx``: a deploy net and its weights as an ONNX model (``netforge[onnx]``).

The work is ``netforge.export.onnx_export.export_onnx_file``; this command maps the flags.
"""

from __future__ import annotations

from pathlib import Path

import click

from netforge.export.onnx_graph import DEFAULT_OPSET


@click.group()
def export() -> None:
    """Export a deploy net and its weights for runtimes without Python."""


def _default_output(weights: str) -> str:
    """``NAME.onnx`` in the working directory, NAME from the weights file or zoo name."""
    name = weights[len("zoo:") :] if weights.startswith("zoo:") else Path(weights).name
    for suffix in (".h5", ".caffemodel"):
        name = name.removesuffix(suffix)
    return f"{name}.onnx"


@export.command("onnx")
@click.option("--model", required=True, help="Deploy prototxt (its inputs are Input layers).")
@click.option("--weights", required=True, help="Weights: .caffemodel(.h5) file or zoo:NAME.")
@click.option("--output", default=None, help="ONNX file to write [default: NAME.onnx].")
@click.option("--opset", default=DEFAULT_OPSET, show_default=True, help="ONNX opset (13 or newer).")
@click.option("--dynamic-batch", is_flag=True, help="Make axis 0 of the inputs symbolic (N).")
@click.option(
    "--fold-batchnorm",
    is_flag=True,
    help="Fold BatchNorm and the Scale after it into the preceding Convolution/InnerProduct.",
)
def onnx_command(
    model: str,
    weights: str,
    output: str | None,
    opset: int,
    dynamic_batch: bool,
    fold_batchnorm: bool,
) -> None:
    """Export MODEL with WEIGHTS to ONNX, checked by onnx.checker (Caffe's semantics exactly:
    ceil pooling, AVE divisors, BatchNorm's scale factor, LRN)."""
    from netforge.export.onnx_export import export_onnx_file

    output = output or _default_output(weights)
    exported = export_onnx_file(
        model,
        weights,
        output,
        opset=opset,
        dynamic_batch=dynamic_batch,
        fold_batchnorm=fold_batchnorm,
        progress=lambda stage: click.echo(f"netforge: {stage}", err=True),
    )
    ops = sorted({node.op_type for node in exported.graph.node})
    click.echo(
        f"wrote {output}: opset {opset}, {len(exported.graph.node)} nodes ({', '.join(ops)}); "
        f"inputs {', '.join(i.name for i in exported.graph.input)}, "
        f"outputs {', '.join(o.name for o in exported.graph.output)}"
    )
