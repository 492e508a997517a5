"""``netforge pycaffe SCRIPT [ARGS...]``: run an unmodified pycaffe script on netforge."""

from __future__ import annotations

import click

from netforge.pycaffe_alias import run_script


@click.command(
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.argument("script", type=click.Path(exists=True, dir_okay=False))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def pycaffe(script: str, args: tuple[str, ...]) -> None:
    """Run a pycaffe SCRIPT with ARGS, its `import caffe` (and caffe.io, caffe.proto...)
    resolving to netforge, as `python SCRIPT ARGS` would with Caffe installed. Only this
    command installs the alias: importing netforge never shadows a real Caffe."""
    run_script(script, args)
