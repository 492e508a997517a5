"""``netforge pycaffe SCRIPT [ARGS...]``: run an unmodified pycaffe script on netforge."""

from __future__ import annotations

import traceback

import click

from netforge.errors import NetforgeError
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
    try:
        run_script(script, args)
    except NetforgeError:
        raise  # one line, as every command reports them
    except Exception as exc:
        # As `python SCRIPT` shows it: the traceback from the script's own frames down.
        # A SyntaxError in the script itself has no frame of it: python shows no traceback.
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != script:
            tb = tb.tb_next
        if tb is None and isinstance(exc, SyntaxError) and exc.filename == script:
            shown = "".join(traceback.format_exception_only(type(exc), exc))
        else:
            shown = "".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__))
        click.echo(shown.rstrip("\n"), err=True)
        raise SystemExit(1) from None  # python's status for an uncaught exception
