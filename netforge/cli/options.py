"""Options shared by several commands, defined once."""

from __future__ import annotations

import click

#: A prototxt is data; its Python layers are code it names. The CLI runs them only when asked
#: (this flag, or NETFORGE_ALLOW_PYTHON_LAYERS=1), because prototxts travel between people.
allow_python_layers = click.option(
    "--allow-python-layers",
    is_flag=True,
    envvar="NETFORGE_ALLOW_PYTHON_LAYERS",
    help='Run the prototxt\'s type: "Python" layers (code it names); off for safety '
    "(also NETFORGE_ALLOW_PYTHON_LAYERS=1).",
)
