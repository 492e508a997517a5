"""netforge's error types.

The library raises these and never exits or prints; the CLI maps every ``NetforgeError``
to a one-line message and the exit status in ``exit_code`` (see ``netforge/cli/main.py``).
"""

from __future__ import annotations


class NetforgeError(Exception):
    """Base of every error netforge raises for a user's input or environment."""

    exit_code = 1


class ConfigError(NetforgeError):
    """A prototxt, solver or command-line setting is malformed or inconsistent."""

    exit_code = 2


class ShapeError(NetforgeError):
    """Blob shapes do not fit together (a bottom, a weight, a reshape)."""

    exit_code = 3


class DataError(NetforgeError):
    """A data source (file, database, record, image) is missing or cannot be read."""

    exit_code = 4


class ChecksumError(DataError):
    """A downloaded or stored file does not have the checksum it should."""

    exit_code = 5


class DivergenceError(NetforgeError):
    """Training produced a value that is not finite."""

    exit_code = 6


class DeviceError(NetforgeError):
    """The requested device (GPU) is missing or unusable."""

    exit_code = 7


class NetworkError(NetforgeError):
    """A download failed: HTTP error, timeout, or no network."""

    exit_code = 8


class ParallelError(NetforgeError):
    """A data-parallel run lost a rank, or its ranks disagree (see ``netforge.parallel``)."""

    exit_code = 9
