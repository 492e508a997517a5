"""Caffe's gflags spellings on every command, turned into click's before click parses.

Caffe's tools and the scripts written for them use gflags, where a flag takes one or two
dashes, words joined by underscores, ``-flag=value`` or ``-flag value``, and booleans as
``-flag``, ``-flag=true|false`` or ``-noflag``: ``caffe train -solver s.prototxt -gpu 0``,
``convert_imageset -resize_height=40 -shuffle -backend=lmdb``. ``caffe_argv`` rewrites those
tokens into the spelling of the command's own click options (``--solver``,
``--resize-height=40``, ``--shuffle``), knowing which options take a value so that a value
that starts with a dash (``-gpu -1``) is left alone. A gflag that names no option of the
command is handed to click in its double-dash spelling, so click's error names the whole flag
and the nearest option (as typed, ``-solverr`` would read as the short options ``-s -o ...``);
the command's own short options (``-o FILE``, ``-h``) pass through unchanged.
"""

from __future__ import annotations

import re

import click

_GFLAG = re.compile(r"--?([A-Za-z][A-Za-z0-9_-]*)(?:=(.*))?", re.DOTALL)
_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


def _long_options(command: click.Command, ctx: click.Context) -> dict[str, click.Option]:
    """Each long option name of ``command`` (without dashes, underscores as dashes)."""
    table = {}
    for param in command.get_params(ctx):
        if isinstance(param, click.Option):
            for opt in (*param.opts, *param.secondary_opts):
                if opt.startswith("--"):
                    table[opt[2:].replace("_", "-")] = param
    return table


def _short_options(command: click.Command, ctx: click.Context) -> set[str]:
    """The single-dash option names of ``command`` (``-o``, ``-h``)."""
    return {
        opt
        for param in command.get_params(ctx)
        if isinstance(param, click.Option)
        for opt in (*param.opts, *param.secondary_opts)
        if not opt.startswith("--")
    }


def _rewrite(
    token: str, options: dict[str, click.Option], shorts: set[str]
) -> tuple[list[str], bool]:
    """The click tokens for one gflags token, and whether the next token is its value."""
    match = _GFLAG.fullmatch(token)
    if match is None or token[:2] in shorts:
        return [token], False
    name, value = match.group(1).replace("_", "-"), match.group(2)
    option = options.get(name)
    if option is None and name.startswith("no") and value is None:
        negated = options.get(name[2:].lstrip("-"))
        if negated is not None and negated.is_flag and not negated.multiple:
            return _set_flag(negated, False), False
    if option is None:
        if token.startswith("--") or len(match.group(1)) == 1:
            return [token], False
        return [f"--{name}" + ("" if value is None else f"={value}")], False
    if option.is_flag and not option.multiple and not option.count:
        positive = f"--{name}" not in option.secondary_opts
        if value is None:
            return _set_flag(option, positive, name), False
        if value.lower() in _TRUE | _FALSE:
            return _set_flag(option, (value.lower() in _TRUE) == positive), False
        return [token], False
    spelled = f"--{name}" if f"--{name}" in option.opts else _primary(option)
    if value is None:
        return [spelled], True
    return [f"{spelled}={value}"], False


def _primary(option: click.Option) -> str:
    return next(opt for opt in option.opts if opt.startswith("--"))


def _set_flag(option: click.Option, value: bool, name: str | None = None) -> list[str]:
    """Tokens that set a boolean flag to ``value``: its own (or negative) spelling, or none
    when the value asked for is the flag's default and it has no negative spelling."""
    if value:
        if name is not None and f"--{name}" in option.opts:
            return [f"--{name}"]
        return [_primary(option)]
    negative = [opt for opt in option.secondary_opts if opt.startswith("--")]
    if negative:
        return [negative[0]]
    # gflags' -noflag sets the flag false: for a click flag without a --no- form that is its
    # default (every such flag in netforge defaults to off), so nothing needs saying.
    return []


def caffe_argv(command: click.Command, args: list[str], ctx: click.Context) -> list[str]:
    """``args`` for ``command`` with Caffe's gflags spellings in click's; for a group, its
    own options are rewritten and the rest goes to the subcommand the first word names."""
    options, shorts = _long_options(command, ctx), _short_options(command, ctx)
    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            return out + args[i:]
        if not token.startswith("-") or token == "-":
            if isinstance(command, click.Group):
                sub = command.get_command(ctx, token)
                if sub is not None:
                    return out + [token] + caffe_argv(sub, args[i + 1 :], ctx)
            # A command that takes no options after its first argument (netforge pycaffe
            # SCRIPT ARGS...) hands the rest to someone else: leave it as typed.
            settings = command.context_settings
            if not settings.get("allow_interspersed_args", command.allow_interspersed_args):
                return out + args[i:]
            out.append(token)
            i += 1
            continue
        tokens, takes_value = _rewrite(token, options, shorts)
        out.extend(tokens)
        if takes_value and i + 1 < len(args):
            out.append(args[i + 1])
            i += 1
        i += 1
    return out
