"""Reading a whole input file whose path came from a user or from another file.

A path in a prototxt, a solverstate's ``learned_net`` or a list file may name something
that is not a file at all: ``/dev/zero`` or ``/dev/urandom`` never end, and reading them
whole fills memory. A regular file is read whole; anything else (a device, a pipe such as
``/dev/stdin``) is read up to ``MAX_BYTES`` or half the memory available, whichever is less,
past which it is a DataError.
"""

from __future__ import annotations

import os
import stat

from netforge.errors import DataError
from netforge.memory import available_bytes

#: Protobuf's limit on a message, and Caffe's kProtoReadBytesLimit: no input netforge reads
#: whole is larger.
MAX_BYTES = 2**31 - 1
_CHUNK = 1 << 20


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of ``path`` (see the module docstring); OSError as ``open`` raises it."""
    with open(path, "rb") as handle:
        if stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            return handle.read()
        # half: the chunks are joined into one copy at the end
        limit = min(MAX_BYTES, available_bytes() // 2)
        chunks, size = [], 0
        while chunk := handle.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise DataError(
                    f"{path}: not a regular file, and more than {limit:,} bytes came from it "
                    "without an end; name a file"
                )
            chunks.append(chunk)
        return b"".join(chunks)


def read_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of ``path``, read as ``read_bytes`` does; UnicodeDecodeError when it
    is not UTF-8."""
    return read_bytes(path).decode("utf-8")
