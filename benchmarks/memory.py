"""Resident memory of this process, read from Linux's ``/proc``, for the benchmarks.

The kernel keeps the high-water mark of the resident set (``VmHWM`` in ``/proc/self/status``)
and resets it to the current resident size when ``5`` is written to ``/proc/self/clear_refs``.
So the extra memory a call needs over what already exists (its inputs) is the high-water mark
after the call minus the resident size just before it, with the mark reset in between:
:func:`measure_peak` does exactly that.

Freed memory that the C allocator keeps for reuse would hide part of a call's needs (its pages
are already resident), so :func:`release_free_memory` hands it back to the kernel first.

Off Linux every reading is ``None`` and the benchmarks report no memory numbers.

Example:
    >>> from benchmarks import memory
    >>> with memory.measure_peak() as peak:
    ...     block = bytearray(64 * 2**20)
    >>> peak.extra is None or peak.extra >= 64 * 2**20
    True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_MEMINFO = Path("/proc/meminfo")


def _kib_field(path: Path, field: str) -> int | None:
    """A ``field:  N kB`` line of a ``/proc`` file, in bytes; None when absent."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def rss() -> int | None:
    """Resident set size of this process now, in bytes."""
    return _kib_field(_STATUS, "VmRSS")


def peak_rss() -> int | None:
    """High-water mark of the resident set since start or the last :func:`reset_peak`."""
    return _kib_field(_STATUS, "VmHWM")


def address_space() -> int | None:
    """Virtual address space of this process (``VmSize``), what ``RLIMIT_AS`` caps."""
    return _kib_field(_STATUS, "VmSize")


def available_memory() -> int | None:
    """Memory the kernel estimates it can give a new workload without swapping."""
    return _kib_field(_MEMINFO, "MemAvailable")


def total_memory() -> int | None:
    """Physical memory of the machine."""
    return _kib_field(_MEMINFO, "MemTotal")


def reset_peak() -> bool:
    """Resets the high-water mark to the current resident size; False where unsupported."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def release_free_memory() -> None:
    """Collects garbage and returns the C allocator's free pages to the kernel (glibc)."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    malloc_trim = getattr(ctypes.CDLL(libc_name), "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)


def limit_address_space(limit: int) -> None:
    """Caps this process's address space at ``limit`` bytes, so an allocation beyond it fails
    with an error (which the benchmarks report as OOM) instead of waking the kernel's OOM
    killer, which might pick another process of the machine."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


@dataclass
class Peak:
    """Extra resident bytes at the peak of a measured block (None off Linux)."""

    extra: int | None = None


@contextmanager
def measure_peak() -> Iterator[Peak]:
    """Measures the peak resident memory a block adds over what is resident when it starts."""
    peak = Peak()
    release_free_memory()
    start = rss() if reset_peak() else None
    yield peak
    end = peak_rss()
    if start is not None and end is not None:
        peak.extra = max(0, end - start)
