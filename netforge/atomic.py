"""Write files so that a crash never leaves a half-written one: temp file, fsync, rename;
and so that two processes never write one target at once: a lock file beside it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from netforge.errors import DataError


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (setting it to read
    it back would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass  # no /proc (not Linux): read it the portable way below
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _readable_temp(target: Path) -> tuple[int, str]:
    """A temporary file beside ``target`` with the mode a plain open() would give it
    (mkstemp's 0600 would make snapshots unreadable to the other users of a machine)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    fd, tmp = _readable_temp(target)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for writers that open files themselves (h5py, lmdb);
    renamed onto ``path`` when the block succeeds, deleted when it fails."""
    target = Path(path)
    fd, tmp = _readable_temp(target)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def target_lock(
    target: str | os.PathLike, on_wait: Callable[[], None] | None = None
) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<target>.lock``: one writer of ``target`` at a time
    across processes. When another holds it, ``on_wait()`` is called and the lock waited
    for; with no ``on_wait``, it is a DataError naming the target. The lock file is removed
    on release; a waiter that then holds a lock on the removed file sees that it is no
    longer the one at that path and takes the new one. A kill -9 releases the lock (the
    kernel closes the file) and leaves the file, which the next writer reuses."""
    lock = f"{os.fspath(target)}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise DataError(f"cannot create the lock file {lock}: {exc.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is None:
                    raise DataError(
                        f"{os.fspath(target)}: another netforge process is writing it (it holds "
                        f"{lock}); wait for it to finish, or stop it and run again"
                    ) from None
                on_wait()
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(lock, follow_symlinks=False)
            except FileNotFoundError:
                current = None
            if current is not None and os.path.samestat(os.fstat(fd), current):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)
