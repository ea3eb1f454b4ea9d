"""Suite ``ce``: plain cross entropy with index targets, forward + backward, on ``(N, V)`` logits.

Providers (each one call of forward and backward through ``torch.autograd.grad``):

- ``xentkit``: ``xentkit.cross_entropy`` with its default backend (``xentkit:NAME`` forces one);
- ``xentkit-inplace``: the same with ``inplace_backward=True`` (the gradient overwrites the
  logits, so its peak should be near zero);
- ``xentkit-inductor`` and ``xentkit-inplace-inductor``: the same two with the C row kernel
  turned off (:mod:`xentkit.kernels.native`), i.e. the row passes compiled by inductor, which
  evaluates each exponential twice;
- ``torch``: ``torch.nn.functional.cross_entropy`` in eager mode, the reference of the ratios;
- ``torch.compile``: the same function compiled (``dynamic=False``; compilation is in the first
  call's time);
- ``floor``: one ``clone()`` of the logits, the least any loss that writes an ``N x V`` gradient
  into fresh memory can do (read once, write once, the new pages faulted in);
- ``floor-copy``: one ``copy_`` of the logits into a buffer already resident (its pages
  touched before the timing): the memory floor of a kernel that writes its gradient over
  memory it already holds, as ``inplace_backward=True`` does;
- ``pass-max`` and ``pass-exp``: where a fused kernel's time goes, one pass over the logits
  each: their row maxima (``amax``: a read, no arithmetic to speak of) and their rows' sums of
  exponentials in float32 (compiled like xentkit's inductor row kernel: a read and one ``exp``
  per element). The inductor row kernel takes one max pass, one exp pass for the sums and a
  second one for the gradient (which it writes); the C kernel one pass from memory (a block's
  maximum and exponentials while it is in L1), then one scaling pass over the row in cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import xentkit
from benchmarks.harness import Bench, Shape, Suite, split_backend
from xentkit.kernels import native


def case_label(shape: Shape) -> str:
    """``N=4096 V=32768``: the hidden size plays no part in plain cross entropy."""
    return f"N={shape.n} V={shape.v}"


def _exp_sums(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().exp().sum(-1)


def build(provider: str, shape: Shape, dtype: torch.dtype, compile_backend: str) -> Bench:
    """Random logits and targets, and the step of ``provider`` on them."""
    name, backend = split_backend(provider)
    logits = torch.randn(shape.n, shape.v, dtype=dtype)
    target = torch.randint(shape.v, (shape.n,))
    inputs_bytes = logits.nbytes + target.nbytes
    if name == "floor":
        return Bench(logits.clone, inputs_bytes)
    if name == "floor-copy":
        resident = logits.clone()  # every page touched before the timed calls
        return Bench(lambda: resident.copy_(logits), inputs_bytes + resident.nbytes)
    if name == "pass-max":
        return Bench(lambda: logits.amax(-1), inputs_bytes)
    if name == "pass-exp":
        sums = torch.compile(_exp_sums, dynamic=False, backend=compile_backend)
        return Bench(lambda: sums(logits), inputs_bytes)
    logits.requires_grad_(True)
    if name in ("xentkit", "xentkit-inplace", "xentkit-inductor", "xentkit-inplace-inductor"):
        inplace = "inplace" in name
        c_kernel = not name.endswith("inductor")

        def loss() -> torch.Tensor:
            saved = native.enabled()
            native.set_enabled(c_kernel)
            try:
                return xentkit.cross_entropy(
                    logits, target, backend=backend, inplace_backward=inplace
                )
            finally:
                native.set_enabled(saved)

    elif name == "torch":

        def loss() -> torch.Tensor:
            return F.cross_entropy(logits, target)

    elif name == "torch.compile":
        compiled = torch.compile(F.cross_entropy, dynamic=False, backend=compile_backend)

        def loss() -> torch.Tensor:
            return compiled(logits, target)

    else:
        raise ValueError(f"unknown provider {provider!r} for suite ce")
    return Bench(lambda: torch.autograd.grad(loss(), logits), inputs_bytes)


PROVIDERS = (
    "xentkit", "xentkit-inplace", "xentkit-inductor", "xentkit-inplace-inductor", "torch",
    "torch.compile", "floor", "floor-copy", "pass-max", "pass-exp",
)  # fmt: skip

SUITE = Suite(
    name="ce",
    title="Cross entropy, forward + backward, index targets",
    function="cross_entropy",
    build=build,
    case_label=case_label,
    providers=PROVIDERS,
    shapes=(Shape(4096, 1024, 32768), Shape(4096, 1024, 128256)),
    # Sizes that no power-of-two chunk divides, so the harness runs the kernels' tails too.
    quick_shapes=(Shape(64, 16, 256), Shape(37, 16, 1000)),
    dtypes=("float32", "bfloat16"),
    repeats=10,
    floor="floor",
    floor_text="one clone() of the logits (floor-copy: one copy_ into a resident buffer)",
    compiled=frozenset({"torch.compile", "pass-exp"}),
)
