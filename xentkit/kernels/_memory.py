"""Large CPU buffers mapped with transparent huge pages.

A fresh buffer of tens of MiB or more is a fresh memory mapping whose 4 KiB pages fault in one
by one as a kernel first writes them; on many machines that costs more than the kernel's own
work (a chunk of LM-head logits, the gradient of plain cross entropy). On Linux such a buffer is
mapped with ``MADV_HUGEPAGE`` instead (2 MiB pages, 512 times fewer faults), as torch's own
allocator does when ``THP_MEM_ALLOC_ENABLE=1``; it is freed with its tensor like any other.

Example:
    >>> large_empty((2, 3), torch.float32, torch.device("cpu")).shape  # small: plain torch
    torch.Size([2, 3])
"""

from __future__ import annotations

import math
import mmap

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
