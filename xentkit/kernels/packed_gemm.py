r"""The LM head's weight packed once per pass for the chunks' logits products (MKL, float32).

Every chunk of the fused LM head computes :math:`Z = H_{\text{chunk}} W^\top` with the same
``(V, D)`` weight. A BLAS matrix product first copies ("packs") its operands into the
cache-blocked layout its inner kernel reads; called once per chunk, it packs all of ``W``
again each time, a memory-bound copy that made the chunks' logits products take 1.03–1.10×
the one whole product on this project's 2-core VM (five shapes, N = 2048 and 8192, D = 512 to
4096, V = 32768 to 256000, 1024-row chunks; a throwaway check, not kept). MKL's packed GEMM
API (``cblas_sgemm_pack`` / ``cblas_sgemm_compute``, exported by the MKL that torch's x86 CPU
builds link into ``libtorch_cpu``) packs ``W`` once; each chunk's product then reads the
packed copy, and the chunks' products take about the time of the whole one (0.995–1.04× in
the same check).

The packed copy costs memory: 1.06–1.37× the float32 weight at the five shapes checked (MKL
pads its panels; ``cblas_sgemm_pack_get_size`` says how much), kept between calls like the
chunk workspace (:func:`xentkit.kernels._memory.cached_empty`), so it is made only where it
pays and fits: float32 on the CPU, at least two chunks in the pass, and at
most :data:`MAX_BYTES` packed. Elsewhere (no MKL, another dtype, one chunk) :func:`pack` returns
None and the caller uses ``torch.mm``. :func:`set_enabled` turns it off.

Example:
    >>> weight = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    >>> hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> packed = pack(weight, rows=2, tokens=4)  # two chunks of two rows
    >>> if packed is not None:  # torch with MKL
    ...     print(packed.logits(hidden, None, torch.empty(2, 3)))
    tensor([[1., 3., 5.],
            [2., 4., 6.]])
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch
from torch import Tensor

from xentkit.kernels import _memory
from xentkit.kernels.native import _pointer

# The most bytes a packed weight may take (it is kept between calls): 2 GiB packs every
# float32 weight up to D = 1024 at V = 256000 or D = 4096 at V = 32768.
MAX_BYTES = 2 << 30

# CBLAS's enumerations (cblas.h / mkl_cblas.h).
_ROW_MAJOR, _NO_TRANS, _TRANS, _PACKED, _B_MATRIX = 101, 111, 112, 151, 162

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Pack the weight where it applies (``True``, the default) or always use ``torch.mm``."""
    global _enabled
    _enabled = enabled


@functools.cache
def _library() -> ctypes.CDLL | None:
    """``libtorch_cpu`` with MKL's packed sgemm, or None where torch has no MKL."""
    if not torch.backends.mkl.is_available():
        return None
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        lib = ctypes.CDLL(path)
        lib.cblas_sgemm_pack_get_size.restype = ctypes.c_size_t
        lib.cblas_sgemm_pack.restype = None
        lib.cblas_sgemm_compute.restype = None
    except (OSError, AttributeError):
        return None
    return lib


class PackedWeight:
    """``weight.T`` packed for products ``hidden @ weight.T`` of up to ``rows`` hidden rows."""

    def __init__(self, lib: ctypes.CDLL, weight: Tensor, rows: int, nbytes: int) -> None:
        self.lib = lib
        self.classes, self.dim = weight.shape
        # The packed copy (float32 elements), kept for the next call's when it is dead.
        self.data = _memory.cached_empty((-(-nbytes // 4),), torch.float32, weight.device)
        lib.cblas_sgemm_pack(
            _ROW_MAJOR, _B_MATRIX, _TRANS, rows, self.classes, self.dim, ctypes.c_float(1.0),
            _pointer(weight), weight.stride(0), _pointer(self.data),
        )  # fmt: skip

    def logits(self, hidden: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
        """``hidden @ weight.T (+ bias)`` written into ``out`` (``(m, V)``, contiguous)."""
        m = hidden.shape[0]
        if hidden.stride(1) != 1 or hidden.stride(0) < self.dim:
            hidden = hidden.contiguous()
        beta = 0.0
        if bias is not None:
            out.copy_(bias.expand_as(out))
            beta = 1.0
        self.lib.cblas_sgemm_compute(
            _ROW_MAJOR, _NO_TRANS, _PACKED, m, self.classes, self.dim, _pointer(hidden),
            hidden.stride(0), _pointer(self.data), self.dim, ctypes.c_float(beta),
            _pointer(out), self.classes,
        )  # fmt: skip
        return out


def pack(weight: Tensor, rows: int, tokens: int) -> PackedWeight | None:
    """``weight`` packed for the products of a pass over ``tokens`` hidden rows in chunks of
    at most ``rows``; None where packing does not apply (not a float32 CPU weight with unit
    column stride, no MKL, one chunk, over :data:`MAX_BYTES`, turned off)."""
    lib = _library() if _enabled else None
    if (
        lib is None
        or tokens <= rows
        or weight.dtype != torch.float32
        or weight.device.type != "cpu"
        or weight.stride(1) != 1
        or max(rows, *weight.shape, weight.stride(0)) >= 2**31
    ):
        return None
    nbytes = lib.cblas_sgemm_pack_get_size(_B_MATRIX, rows, *weight.shape)
    return PackedWeight(lib, weight, rows, nbytes) if nbytes <= MAX_BYTES else None
