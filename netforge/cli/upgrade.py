"""``netforge upgrade net|solver IN OUT``: write a legacy Caffe file in the current format."""

from __future__ import annotations

import click

from netforge.errors import ConfigError
from netforge.proto import pb
from netforge.prototxt import read_message, read_text, write_binary, write_text
from netforge.upgrade import check_layer_types, upgrade_net, upgrade_solver


@click.command()
@click.argument("kind", type=click.Choice(["net", "solver"]))
@click.argument("source", type=click.Path(dir_okay=False))
@click.argument("destination", type=click.Path(dir_okay=False))
def upgrade(kind: str, source: str, destination: str) -> None:
    """Upgrade a V0/V1 net or a legacy solver, writing it in the source's encoding: a text
    prototxt as text (upgrade_net_proto_text), a binary net such as a V1 .caffemodel as
    binary with its weights (upgrade_net_proto_binary)."""
    message_cls = pb.NetParameter if kind == "net" else pb.SolverParameter
    message, binary = _read(source, message_cls)
    if kind == "net":
        steps = upgrade_net(message, source)
    else:
        steps = upgrade_solver(message, source)
    (write_binary if binary else write_text)(message, destination)
    if steps:
        click.echo(f"{source}: {'; '.join(steps)}; wrote {destination}")
    else:
        click.echo(f"{source}: already in the latest format; wrote {destination}")
    # The file is written first (the upgrade itself succeeded, as Caffe's tool writes it),
    # then an unknown layer type exits 2, the status `netforge train` gives the same net: a
    # typo must not pass a script's check of the upgrade only to fail at training.
    nets = [message] if kind == "net" else _solver_nets(message)
    for net in nets:
        check_layer_types(net, f"{source} (upgraded to {destination})")


def _read(source: str, message_cls: type) -> tuple[object, bool]:
    """The message in ``source`` and whether it was in the binary (wire) format."""
    try:
        return read_text(source, message_cls), False
    except ConfigError:
        pass  # read again only once this error (and with it the file's bytes) is let go
    # Not a text prototxt: read_message tries the wire format and, when neither parses,
    # raises the text parser's error (its line and field).
    return read_message(source, message_cls), True


def _solver_nets(solver: pb.SolverParameter) -> list[pb.NetParameter]:
    embedded = [solver.net_param] if solver.HasField("net_param") else []
    if solver.HasField("train_net_param"):
        embedded.append(solver.train_net_param)
    return embedded + list(solver.test_net_param)
