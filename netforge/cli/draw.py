"""``netforge draw``: pycaffe's ``draw_net.py``, a thin shell over netforge.draw."""

from __future__ import annotations

import click


@click.command()
@click.argument("net", type=click.Path(exists=True, dir_okay=False))
@click.argument("output", type=click.Path(dir_okay=False))
@click.option(
    "--rankdir",
    type=click.Choice(["LR", "TB", "RL", "BT"], case_sensitive=False),
    default="LR",
    show_default=True,
    help="Graph direction: LR (left to right), TB (top to bottom), RL, BT.",
)
@click.option(
    "--phase",
    type=click.Choice(["ALL", "TRAIN", "TEST"], case_sensitive=False),
    default="ALL",
    show_default=True,
    help="Draw the layers of one phase only, or all of them.",
)
@click.option(
    "--display_lrm",
    "--display-lrm",
    is_flag=True,
    help="Show the learning rate multipliers of Convolution, Deconvolution and InnerProduct.",
)
def draw(net: str, output: str, rankdir: str, phase: str, display_lrm: bool) -> None:
    """Draw the net prototxt NET to OUTPUT (draw_net.py).

    The format is OUTPUT's extension: .dot or .gv write DOT text (no graphviz needed);
    .png, .svg, .pdf and graphviz's other formats need pydot and graphviz
    (pip install 'netforge[draw]' and the graphviz package). V0/V1 nets are upgraded first.
    """
    from netforge.draw import draw_net_to_file
    from netforge.proto import pb
    from netforge.prototxt import read_net

    chosen = {"ALL": None, "TRAIN": pb.TRAIN, "TEST": pb.TEST}[phase.upper()]
    click.echo(f"Drawing net to {output}")
    draw_net_to_file(read_net(net), output, rankdir.upper(), chosen, display_lrm)
