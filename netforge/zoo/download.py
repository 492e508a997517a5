"""Verified, resumable downloads of zoo files into the user's cache (urllib only).

What Caffe's ``download_model_binary.py`` does (fetch ``caffemodel_url``, compare SHA-1),
plus what its users missed (../shared/reference/users.md, item 8): several mirrors per
file and ``NETFORGE_ZOO_MIRROR`` tried first, resume of a partial file with an HTTP
``Range`` request, SHA-1/SHA-256 and size checked *before* the file takes its final name
(a file that fails is deleted), plain http only for files the manifest has a checksum
for, and one clear error per failure (``NetworkError``, ``ChecksumError``).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from netforge import __version__
from netforge.atomic import target_lock
from netforge.errors import ChecksumError, ConfigError, NetworkError
from netforge.reading import MAX_BYTES
from netforge.zoo.manifest import Manifest, ZooFile, check_safe_name

log = logging.getLogger("netforge")

#: progress(bytes_done, bytes_total_or_None), called as the download advances.
ProgressFn = Callable[[int, "int | None"], None]

MIRROR_ENV = "NETFORGE_ZOO_MIRROR"
HOME_ENV = "NETFORGE_HOME"
CHUNK = 1 << 16
# A dropped connection is retried from where it stopped this many times per URL.
RESUME_ATTEMPTS = 3
#: The most bytes read for a file whose manifest gives no size (a Caffe model folder's
#: readme): protobuf's 2 GiB limit, which no caffemodel, mean or prototxt can pass.
MAX_FILE_BYTES = MAX_BYTES


def cache_dir() -> Path:
    """netforge's cache folder: ``$NETFORGE_HOME``, else the platform's user cache folder.

    Linux and others: ``$XDG_CACHE_HOME/netforge`` or ``~/.cache/netforge``; macOS:
    ``~/Library/Caches/netforge``; Windows: ``%LOCALAPPDATA%\\netforge\\Cache``.
    """
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "netforge" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "netforge"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "netforge"


def model_dir(manifest: Manifest) -> Path:
    """Where a zoo model's files live in the cache: ``<cache>/zoo/<model name>``."""
    return cache_dir() / "zoo" / check_safe_name(manifest.name, "model name", "zoo")


def file_digests(path: Path) -> tuple[str, str, int]:
    """(sha1, sha256, size) of a file, read once."""
    sha1, sha256, size = hashlib.sha1(), hashlib.sha256(), 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha1.update(chunk)
            sha256.update(chunk)
            size += len(chunk)
    return sha1.hexdigest(), sha256.hexdigest(), size


def verify_file(path: Path, entry: ZooFile) -> str | None:
    """None when ``path`` has the manifest's size and checksums; else what is wrong."""
    sha1, sha256, size = file_digests(path)
    if entry.size is not None and size != entry.size:
        return f"size {size} bytes, expected {entry.size}"
    if entry.sha256 is not None and sha256 != entry.sha256:
        return f"SHA-256 {sha256}, expected {entry.sha256}"
    if entry.sha1 is not None and sha1 != entry.sha1:
        return f"SHA-1 {sha1}, expected {entry.sha1}"
    return None


def candidate_urls(entry: ZooFile) -> list[str]:
    """The URLs to try in order: ``$NETFORGE_ZOO_MIRROR/<file name>`` first, then the
    manifest's mirrors; plain http only for a file with a checksum."""
    urls = list(entry.urls)
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        urls.insert(0, f"{mirror.rstrip('/')}/{entry.name}")
    for url in urls:
        scheme = url.split(":", 1)[0].lower()
        if scheme not in ("http", "https") or (scheme == "http" and not entry.has_checksum):
            raise ConfigError(
                f"refusing {url!r} for {entry.name}: only https, or http for a file whose "
                "checksum the manifest carries"
            )
    return urls


def _safe_target(folder: Path, name: str) -> Path:
    check_safe_name(name, "file name", str(folder))
    target = (folder / name).resolve()
    if target.parent != folder.resolve():
        raise ConfigError(f"file name {name!r} would be written outside {folder}")
    return target


class _Failure(Exception):
    """One URL failed; ``resumable`` when the partial file is worth keeping."""

    def __init__(self, message: str, resumable: bool = False) -> None:
        super().__init__(message)
        self.resumable = resumable


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return "timed out (the server is too slow or unreachable)"
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve the host (no network?): {reason.strerror or reason}"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, OSError) and reason.strerror:
        return f"network error: {reason.strerror}"
    return f"network error: {reason}"


def _open_part(part: Path, append: bool) -> BinaryIO:
    """``part`` opened for writing without following a symbolic link: a link planted at
    ``<name>.part`` would send the bytes outside the cache."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
    try:
        return os.fdopen(os.open(part, flags, 0o644), "ab" if append else "wb")
    except OSError as exc:
        if part.is_symlink():
            raise ConfigError(
                f"{part} is a symbolic link; netforge does not write through links in its "
                "cache: remove it and download again"
            ) from None
        raise ConfigError(f"cannot write {part}: {exc.strerror or exc}") from None


def _fetch_once(
    url: str, part: Path, timeout: float, progress: ProgressFn | None, size: int | None = None
) -> None:
    """Append the rest of ``url`` to ``part`` (resuming with Range when it has bytes),
    stopping at ``size`` bytes (the manifest's, else ``MAX_FILE_BYTES``): a server that
    streams without end, or sends more than the file, never fills the disk."""
    have = part.lstat().st_size if part.exists() and not part.is_symlink() else 0
    if size is not None and have > size:
        have = 0  # more than the whole file: start again
    headers = {"User-Agent": f"netforge/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            # Nothing left to send: the partial file is already whole (verified next).
            return
        raise _Failure(_describe(exc)) from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _Failure(_describe(exc), resumable=True) from exc
    with response:
        status = response.status
        length = response.headers.get("Content-Length")
        # a Content-Length that is not a byte count is ignored, as http.client does
        length = int(length) if length is not None and length.isdigit() else None
        # A server that ignores Range sends the whole file: start again.
        append = bool(have) and status == 206
        done = have if append else 0
        total = done + length if length is not None else None
        if size is not None:
            total = size if total is None else min(total, size)
        handle = _open_part(part, append)
        try:
            with handle:
                if progress:
                    progress(done, total)
                bound = MAX_FILE_BYTES if size is None else size
                while chunk := response.read(min(CHUNK, bound - done)):
                    handle.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
                handle.flush()
                os.fsync(handle.fileno())
        except (OSError, http.client.HTTPException) as exc:
            if isinstance(exc, (TimeoutError, socket.timeout)):
                raise _Failure(_describe(exc), resumable=True) from exc
            raise _Failure(f"connection dropped after {done} bytes", resumable=True) from exc
        if total is not None and done < total:
            raise _Failure(f"connection dropped after {done} of {total} bytes", resumable=True)


def download_file(
    entry: ZooFile,
    folder: str | os.PathLike,
    *,
    timeout: float = 60.0,
    progress: ProgressFn | None = None,
) -> Path:
    """Download ``entry`` into ``folder`` (created if needed) and return its path.

    A file already there with the right checksum is kept (Caffe's "Model already
    exists"). Each URL of ``candidate_urls`` is tried in turn; the bytes go to
    ``<name>.part`` (kept across runs so the next attempt resumes with ``Range``), are
    checked against the manifest's size and checksums, and only then renamed to
    ``<name>``. A file that fails the check is deleted and the next mirror tried.
    Raises ``ChecksumError`` when a mirror served wrong bytes and none served right
    ones, ``NetworkError`` when no mirror could be reached; the folders this call created
    are removed again when they are left empty.
    """
    folder = Path(folder)
    created = [path for path in (folder, *folder.parents) if not path.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return _download(entry, folder, timeout, progress)
    except BaseException:
        # A failed download must not leave an empty model folder in the cache; a resumable
        # .part (or another file) keeps it, and its parents, where they are.
        for path in created:
            try:
                path.rmdir()
            except OSError:
                break
        raise


def _download(entry: ZooFile, folder: Path, timeout: float, progress: ProgressFn | None) -> Path:
    """download_file's work, in a folder that exists, holding the target's lock."""
    target = _safe_target(folder, entry.name)

    def waiting() -> None:
        log.info("another download of %s is running; waiting for it", target.name)

    with target_lock(target, on_wait=waiting):
        return _download_locked(entry, target, timeout, progress)


def _download_locked(
    entry: ZooFile, target: Path, timeout: float, progress: ProgressFn | None
) -> Path:
    folder = target.parent
    part = target.with_name(target.name + ".part")
    if target.exists():
        problem = verify_file(target, entry)
        if problem is None:
            log.info("%s already downloaded and verified: %s", entry.name, target)
            return target
        log.warning("%s in %s is wrong (%s); downloading it again", entry.name, folder, problem)
        target.unlink()
    failures: list[str] = []
    bad_checksum = False
    for url in candidate_urls(entry):
        log.info("downloading %s from %s", entry.name, url)
        for _attempt in range(RESUME_ATTEMPTS):
            try:
                _fetch_once(url, part, timeout, progress, entry.size)
            except _Failure as exc:
                failure = exc
                if exc.resumable and part.exists() and part.stat().st_size:
                    continue
                break
            failure = None
            break
        if failure is not None:
            failures.append(f"{url}: {failure}")
            continue
        problem = verify_file(part, entry)
        if problem is not None:
            part.unlink()
            bad_checksum = True
            failures.append(f"{url}: wrong file ({problem}); deleted")
            continue
        os.replace(part, target)
        log.info("%s verified and saved to %s", entry.name, target)
        return target
    error = ChecksumError if bad_checksum else NetworkError
    raise error(f"could not download {entry.name}:\n  " + "\n  ".join(failures))


def download_model(
    manifest: Manifest,
    folder: str | os.PathLike | None = None,
    *,
    roles: tuple[str, ...] | None = None,
    timeout: float = 60.0,
    progress: Callable[[ZooFile], contextlib.AbstractContextManager] | None = None,
) -> dict[str, Path]:
    """Download a model's files (all, or those of ``roles``) into ``folder`` (default: its
    cache folder); returns {role: path}. ``progress(entry)`` may return a context manager
    yielding a ``ProgressFn`` for that file (the CLI's progress bar)."""
    folder = Path(folder) if folder is not None else model_dir(manifest)
    paths = {}
    for entry in manifest.files:
        if roles is not None and entry.role not in roles:
            continue
        with progress(entry) if progress else contextlib.nullcontext() as report:
            paths[entry.role] = download_file(entry, folder, timeout=timeout, progress=report)
    return paths


@contextlib.contextmanager
def terminal_progress(entry: ZooFile) -> Iterator[ProgressFn | None]:
    """A click progress bar on stderr when stderr is a terminal (nothing otherwise)."""
    if not sys.stderr.isatty():
        yield None
        return
    import click

    bar = click.progressbar(length=entry.size or 0, label=entry.name, file=sys.stderr)
    last = [0]

    def report(done: int, total: int | None) -> None:
        if total and bar.length != total:
            bar.length = total
        bar.update(done - last[0])
        last[0] = done

    with bar:
        yield report
