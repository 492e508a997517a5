"""How much memory an allocation may take, checked before it is made.

A prototxt is data: a ``num_output``, ``batch_size``, input dimension or pooling stride near
2^31 must give one error naming the layer and the bytes, never a numpy MemoryError, a swap
storm or a process the kernel kills. ``available_bytes`` is what this process can still get:
the machine's available memory (``MemAvailable`` in /proc/meminfo, or the free pages from
``os.sysconf`` where there is no /proc), capped by the address-space limit (``ulimit -v``)
less what the process already maps.
"""

from __future__ import annotations

import os
import resource
import time

from netforge.errors import ShapeError

#: Sizes below this are never checked: reading /proc/meminfo for every small blob would cost
#: more than the check is worth, and they cannot exhaust a machine.
CHECK_ABOVE = 64 << 20

_cache: tuple[float, int] = (-1.0, 0)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass  # not Linux, or an unusual /proc: fall back to sysconf
    return None


def _sysconf_available() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _address_space_left() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/statm") as statm:
            mapped = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        mapped = 0
    return max(soft - mapped, 0)


def available_bytes() -> int:
    """Bytes this process can still allocate (re-read at most every half second)."""
    global _cache
    now = time.monotonic()
    if now - _cache[0] < 0.5:
        return _cache[1]
    limits = [
        value
        for value in (_meminfo_available() or _sysconf_available(), _address_space_left())
        if value is not None
    ]
    # With nothing to read (an exotic platform), only the check of absurd sizes remains.
    available = min(limits) if limits else 1 << 48
    _cache = (now, available)
    return available


def device_available_bytes(device_id: int) -> int:
    """Bytes free on GPU ``device_id``: the driver's free memory plus the blocks cupy's
    memory pool holds for reuse."""
    import cupy  # only reached for a GPU backend: nothing touches cupy at import time

    with cupy.cuda.Device(device_id):
        free, _ = cupy.cuda.runtime.memGetInfo()
        return free + cupy.get_default_memory_pool().free_bytes()


def human(nbytes: int) -> str:
    """``nbytes`` as "123,456,789 bytes (117.7 MiB)"."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes:,} bytes ({nbytes / (1 << shift):.1f} {unit})"
    return f"{nbytes:,} bytes"


def check_bytes(nbytes: int, what: str, device_id: int = -1) -> None:
    """Raise a ShapeError when ``what`` would need more than the memory available: the
    host's, or GPU ``device_id``'s when it is >= 0."""
    if nbytes <= CHECK_ABOVE:
        return
    if device_id >= 0:
        available, where = device_available_bytes(device_id), f"GPU {device_id} memory"
    else:
        available, where = available_bytes(), "memory"
    if nbytes > available:
        raise ShapeError(
            f"{what} would need {human(nbytes)}, more than the {human(available)} of {where} "
            "available; reduce the batch size or the layer's dimensions"
        )
