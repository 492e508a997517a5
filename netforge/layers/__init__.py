"""The built-in layers, grouped by family; importing this package registers them all."""

from netforge.layers import (  # noqa: F401  (imported for their registrations)
    activation,
    common,
    data,
    inputs,
    loss,
    normalization,
    python,
    recurrent,
    utility,
    vision,
)
