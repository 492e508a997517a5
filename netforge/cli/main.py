"""``netforge`` entry point: the command group and the one place errors become exit codes.

Subcommands live in their own modules and are imported only when used (or listed by
``--help``), so ``netforge train`` does not pay for the zoo or the converters.
"""

from __future__ import annotations

import importlib
import sys

import click

from netforge import __version__
from netforge.cli.flags import caffe_argv
from netforge.errors import NetforgeError

# command name -> "module:attribute" of its click command
COMMANDS = {
    "train": "netforge.cli.train:train",
    "test": "netforge.cli.train:test",
    "time": "netforge.cli.time:time_command",
    "convert": "netforge.cli.data:convert",
    "compute-mean": "netforge.cli.data:compute_mean",
    "zoo": "netforge.cli.zoo:zoo",
    "classify": "netforge.cli.zoo:classify",
    "draw": "netforge.cli.draw:draw",
    "upgrade": "netforge.cli.upgrade:upgrade",
    "device-query": "netforge.cli.device:device_query",
    "pycaffe": "netforge.cli.pycaffe:pycaffe",
    "extract-features": "netforge.cli.tools:extract_features",
    "parse-log": "netforge.cli.tools:parse_log",
    "plot": "netforge.cli.tools:plot",
    "export": "netforge.cli.export:export",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attribute = target.split(":")
        return getattr(importlib.import_module(module), attribute)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        """The subcommand, with its arguments in click's spelling: Caffe's single-dash and
        underscore flags (``-solver s.prototxt``, ``-resize_height=40``) are accepted."""
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None:
            rest = caffe_argv(command, rest, ctx)
        return name, command, rest


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="netforge")
def cli() -> None:
    """Caffe, reborn in pure Python: train and run Caffe prototxt nets with no code."""


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; library errors become one line on stderr and a non-zero status."""
    try:
        cli.main(args=argv, prog_name="netforge", standalone_mode=False)
    except NetforgeError as exc:
        click.echo(f"netforge: error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("netforge: aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("netforge: interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
