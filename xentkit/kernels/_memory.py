"""Large CPU buffers mapped with transparent huge pages.

A fresh buffer of tens of MiB or more is a fresh memory mapping whose 4 KiB pages fault in one
by one as a kernel first writes them; on many machines that costs more than the kernel's own
work (a chunk of LM-head logits, the gradient of plain cross entropy). On Linux such a buffer is
mapped with ``MADV_HUGEPAGE`` instead (2 MiB pages, 512 times fewer faults), as torch's own
allocator does when ``THP_MEM_ALLOC_ENABLE=1``; it is freed with its tensor like any other.

The chunk buffer of the fused LM head is needed again by the next step, so on the CPU it is a
*workspace*: one mapping kept between calls and lent to one call at a time (:func:`workspace`),
as CUDA's caching allocator keeps its blocks; faulting in and compacting a fresh one cost the
head more than its row pass. The weight gradient it returns is fresh memory each step, and its
4 KiB pages faulting in cost up to 7% of the head's time on this project's VM; so it comes
from :func:`cached_empty`, whose mappings stay (resident) after their tensors die and serve the
next gradient of the same size, as CUDA's caching allocator reuses a freed block; so does the
weight's packed copy (:mod:`xentkit.kernels.packed_gemm`).
:func:`empty_cache` (``xentkit.empty_cache()``) returns both.

Example:
    >>> large_empty((2, 3), torch.float32, torch.device("cpu")).shape  # small: plain torch
    torch.Size([2, 3])
    >>> with workspace((4, 8), torch.float32, torch.device("cpu")) as buffer:
    ...     buffer.shape
    torch.Size([4, 8])
"""

from __future__ import annotations

import contextlib
import math
import mmap
import threading
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor

# Buffers at least this large are mapped with huge pages where the OS allows it.
HUGE_PAGE_MIN_BYTES = 32 << 20


def _mapped(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """A huge-page mapping of ``shape`` (zero-filled), or None where it does not apply."""
    nbytes = math.prod(shape) * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes < HUGE_PAGE_MIN_BYTES:
        return None
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(memory, dtype=dtype).view(shape)


def large_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised contiguous tensor, huge-page mapped when large and on the CPU."""
    mapped = _mapped(tuple(shape), dtype, device)
    return torch.empty(shape, dtype=dtype, device=device) if mapped is None else mapped


class _Workspace:
    """The CPU workspace: at most one byte buffer, lent to one caller at a time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bytes: Tensor | None = None
        self.lent = False

    def take(self, nbytes: int) -> Tensor | None:
        """At least ``nbytes`` bytes, or None while the buffer is lent to another call."""
        with self.lock:
            if self.lent:
                return None
            self.lent = True
            if self.bytes is None or self.bytes.numel() < nbytes:
                self.bytes = None  # freed before its larger successor is mapped
                self.bytes = large_empty((nbytes,), torch.uint8, torch.device("cpu"))
            return self.bytes

    def give_back(self) -> None:
        with self.lock:
            self.lent = False

    def clear(self) -> None:
        with self.lock:
            self.bytes = None


_WORKSPACE = _Workspace()


@contextlib.contextmanager
def workspace(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Iterator[Tensor]:
    """An uninitialised contiguous ``shape`` tensor for the ``with`` block: on the CPU a view of
    the workspace, kept for the next call (a fresh :func:`large_empty` while another call holds
    it); elsewhere a plain allocation (CUDA's allocator caches it)."""
    nbytes = math.prod(shape) * dtype.itemsize
    held = _WORKSPACE.take(nbytes) if torch.device(device).type == "cpu" else None
    if held is None:
        yield large_empty(shape, dtype, device)
        return
    try:
        yield held[:nbytes].view(dtype).view(shape)
    finally:
        _WORKSPACE.give_back()


class _Cache:
    """Mappings of tensors :func:`cached_empty` returned, each with a weak reference to the
    memoryview the tensor's storage holds: dead once every tensor and view of it is gone."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: list[tuple[mmap.mmap, weakref.ref]] = []

    def view(self, nbytes: int) -> memoryview:
        """A memoryview of ``nbytes`` bytes no live tensor uses: a cached mapping of that size
        when one is free, else a new one (free mappings of other sizes are then dropped)."""
        with self.lock:
            for k, (memory, used) in enumerate(self.entries):
                if len(memory) == nbytes and used() is None:
                    view = memoryview(memory)
                    self.entries[k] = (memory, weakref.ref(view))
                    return view
            self._drop_free()
            memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            view = memoryview(memory)
            self.entries.append((memory, weakref.ref(view)))
            return view

    def clear(self) -> None:
        with self.lock:
            self._drop_free()

    def _drop_free(self) -> None:
        """Forget the mappings no tensor uses (the lock held)."""
        self.entries = [entry for entry in self.entries if entry[1]() is not None]


_CACHE = _Cache()


def cached_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised contiguous tensor that a caller may keep: on the CPU, when large, in a
    mapping that outlives it (torch's storage holds a memoryview of it, whose weak reference
    tells when the storage is gone) and is reused, pages resident, by the next request of the
    same size once the tensor and all its views are dead."""
    nbytes = math.prod(shape) * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes < HUGE_PAGE_MIN_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.frombuffer(_CACHE.view(nbytes), dtype=dtype).view(shape)


def empty_cache() -> None:
    """Free what the fused LM-head kernels keep between calls on the CPU: the workspace (one
    chunk of logits, :data:`xentkit.kernels.linear_chunked.CHUNK_BYTES` by default) and the
    mappings of weight gradients and packed weights no tensor uses any more; the next call maps
    new ones.

    Example:
        >>> empty_cache()
    """
    _WORKSPACE.clear()
    _CACHE.clear()
