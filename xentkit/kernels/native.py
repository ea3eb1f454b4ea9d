"""The row passes of fused cross entropy as a C kernel, built on first use with the machine's C
compiler: one exponential per logit, where the compiled torch kernel takes two.

The row kernel of :func:`xentkit.kernels.chunked._fused_rows` computes each row's maximum
:math:`s`, its sum of exponentials :math:`S = \\sum_j e^{x_j - s}` and the gradient
:math:`e^{x_j - s}(P + Z\\,\\mathrm{lse}) / S - T[j = t] - E w_j`. Written in torch ops
(inductor), it evaluates each exponential twice, once for :math:`S` and once for the
gradient, and on a CPU those exponentials, not the memory, set its speed. ``_rows.c`` walks a
row in blocks that stay in the L1 cache: a block's maximum :math:`b`, then
:math:`e^{x_j - b}` stored in the gradient's place and summed; once the row's maximum is
known, each stored value is scaled by its block's :math:`e^{b - s}` and the row's coefficient.
It reads each row from memory once and writes it once, like a copy.

The kernel covers float32 and bfloat16 logits with index targets, class weights, label
smoothing and z-loss (no softcap), and ``out`` may be the logits themselves. The shared
library is built once per machine into ``$XENTKIT_CACHE_DIR`` (default
``~/.cache/xentkit``), named by a hash of the source, the compiler and the CPU's flags; where
no compiler works, :func:`library` returns None and the callers use the torch kernel.
``XENTKIT_NO_NATIVE=1`` or :func:`set_enabled` turns it off.

Example:
    >>> logits = torch.tensor([[1.0, 0.5, 2.0], [0.5, 3.0, 1.0]])
    >>> ones = torch.ones(2)
    >>> grad = torch.empty_like(logits)
    >>> if library() is not None:
    ...     row_max, sum_exp, _ = fused_rows(logits, torch.tensor([2, 1]), None, False,
    ...                                      ones / 2, ones / 2, None, None, grad)
    ...     print(row_max, sum_exp, grad, sep="\\n")
    tensor([2., 3.])
    tensor([1.5910, 1.2174])
    tensor([[ 0.1156,  0.0701, -0.1857],
            [ 0.0337, -0.0893,  0.0556]])
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("_rows.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")

_enabled = os.environ.get("XENTKIT_NO_NATIVE", "") in ("", "0")
# The loaded library, False once building it has failed in this process, None before trying.
_library: ctypes.CDLL | bool | None = None


def set_enabled(enabled: bool) -> None:
    """Use the C kernel where it applies (``True``, the default unless ``XENTKIT_NO_NATIVE=1``)
    or always the torch kernel (``False``)."""
    global _enabled
    _enabled = enabled


def enabled() -> bool:
    """Whether the C kernel runs where it applies (see :func:`set_enabled`)."""
    return _enabled


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), so a library built for one CPU never loads on another."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        return os.uname().machine


def _compiler() -> str:
    """``$CC``, else ``cc`` or ``gcc`` on the PATH."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise FileNotFoundError("no C compiler: neither cc nor gcc on the PATH, and CC unset")
    return compiler


def _build(compiler: str, flags: tuple[str, ...] = FLAGS) -> Path:
    """The shared library's path, compiled there first unless a build of this very source,
    compiler, flags and CPU is cached."""
    cache = Path(os.environ.get("XENTKIT_CACHE_DIR", Path.home() / ".cache" / "xentkit"))
    key = hashlib.sha256(
        SOURCE.read_bytes() + " ".join((compiler, *flags, _cpu_flags())).encode()
    ).hexdigest()[:20]
    path = cache / f"rows-{key}.so"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes building at once never load a
    # half-written file.
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        built = Path(tmp) / path.name
        subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", str(built), "-lm"],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(built, path)
    return path


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on the first call; None when turned off or when no C compiler
    builds it (a RuntimeWarning says why, once)."""
    global _library
    if not _enabled or _library is False:
        return None
    if _library is None:
        try:
            _library = ctypes.CDLL(str(_build(_compiler())))
        except (OSError, subprocess.SubprocessError) as error:
            _library = False
            detail = getattr(error, "stderr", None) or error
            warnings.warn(
                f"xentkit: building the C cross-entropy kernel failed ({str(detail)[:300]}); "
                "using the torch kernel. Set XENTKIT_NO_NATIVE=1 to skip the try.",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        _library.xentkit_rows.restype = None
    return _library


def applies(logits: Tensor, out: Tensor | None, softcap: Tensor | None) -> bool:
    """Whether :func:`fused_rows` covers this call: float32 or bfloat16 CPU logits,
    contiguous, ``out`` None or like them, no softcap (whether the kernel is on and built is
    :func:`library`'s answer)."""
    return (
        softcap is None
        and logits.device.type == "cpu"
        and logits.dtype in (torch.float32, torch.bfloat16)
        and logits.is_contiguous()
        and (out is None or (out.dtype == logits.dtype and out.is_contiguous()))
    )


def _pointer(tensor: Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if tensor is None else tensor.data_ptr())


def fused_rows(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    smooth: bool,
    p_coef: Tensor | None,
    t_coef: Tensor | None,
    e_coef: Tensor | None,
    z_coef: Tensor | None,
    out: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`xentkit.kernels.chunked._fused_rows` without a softcap, by the C kernel (which
    must be available: :func:`library`): returns the row maxima, the sums of exponentials and
    (``smooth``) the smoothing sums, all float32, and writes the gradient into ``out`` when
    given (``p_coef``/``t_coef`` then given; ``e_coef``/``z_coef`` None for zero terms)."""
    lib = library()
    m, num_classes = logits.shape
    row_max = logits.new_empty(m, dtype=torch.float32)
    sum_exp = torch.empty_like(row_max)
    smooth_sum = torch.empty_like(row_max) if smooth else None

    def per_row(coef: Tensor | None) -> Tensor | None:
        return None if coef is None else coef.to(torch.float32).expand(m).contiguous()

    coefs = [per_row(c) for c in (p_coef, t_coef, e_coef, z_coef)]
    weight = None if weight is None else weight.to(torch.float32).contiguous()
    target = target.contiguous()
    lib.xentkit_rows(
        _pointer(logits),
        _pointer(out),
        ctypes.c_int(logits.dtype == torch.bfloat16),
        ctypes.c_int64(m),
        ctypes.c_int64(num_classes),
        _pointer(target),
        _pointer(weight),
        ctypes.c_int(smooth),
        *(_pointer(c) for c in coefs),
        _pointer(row_max),
        _pointer(sum_exp),
        _pointer(smooth_sum),
        ctypes.c_int(torch.get_num_threads()),
    )
    return row_max, sum_exp, smooth_sum
