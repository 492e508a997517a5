"""The built-in layers, grouped by family; importing this package registers them all."""

from netforge.builtin_layers import (  # noqa: F401  (imported for their registrations)
    activation,
    common,
    convolution,
    crop,
    data,
    inputs,
    loss,
    lrn,
    normalization,
    pooling,
    python,
    recurrent,
    utility,
)
