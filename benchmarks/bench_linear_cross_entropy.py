"""Suite ``linear``: the LM head and the loss, ``cross_entropy(h @ W.T, target)``, forward +
backward to both ``h`` ``(N, D)`` and ``W`` ``(V, D)``.

Providers (each one call of forward and backward through ``torch.autograd.grad``):

- ``xentkit``: ``xentkit.linear_cross_entropy`` with its default backend (``xentkit:NAME``
  forces one);
- ``torch``: ``F.cross_entropy(F.linear(h, W), target)`` in eager mode, the reference of the
  ratios; it holds the ``N x V`` logits and their gradient;
- ``torch.compile``: the same function compiled (``dynamic=False``);
- ``cce``: Apple's ``cut_cross_entropy.linear_cross_entropy(h, W, target,
  impl="torch_compile")`` when the ``cut-cross-entropy`` package is installed, skipped with a
  note otherwise;
- ``floor``: the three matrix products no implementation can avoid, ``logits = h @ W.T``,
  ``grad_h = g @ W`` and ``grad_W = g.T @ h`` (with ``g`` a given ``N x V`` gradient), each
  into a resident output buffer (:func:`gemm_floor`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import xentkit
from benchmarks.harness import Bench, Shape, Skip, Suite, split_backend


def gemm_floor(
    g: torch.Tensor,
    h: torch.Tensor,
    w: torch.Tensor,
    *heads,
    logits_over_g: bool = False,
    vocab_major: bool = False,
    grads: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Callable[[], tuple]:
    """The matrix products no head + loss can avoid, each into an output buffer already
    resident (allocated and touched here, so no call pays for faulting its pages in): the
    logits ``h @ w.T`` of each head (``heads``: more ``(h, w)`` pairs, e.g. a teacher's) and
    the two gradients ``g @ w`` and ``g.T @ h`` of the first, for a given ``N x V`` ``g``.
    ``logits_over_g`` writes the logits over ``g`` instead, as a fused head writes its gradient
    over its logits: one ``N x V`` buffer instead of two, for shapes near the memory's end.

    ``vocab_major`` lays the logits and their gradient out ``V x N`` instead (``g``'s memory
    read as ``V x N``, ``z``): the products ``w @ h.T``, ``z.T @ w`` and ``z @ h``, the
    same flops, which BLAS may run at another speed. ``grads`` are the ``N x D`` and ``V x D``
    buffers the two gradients go into (another floor's, to share them); new ones otherwise."""
    if vocab_major:  # z: the logits' (and their gradient's) layout
        z = g.view(g.shape[1], g.shape[0])
        pairs = [(y, x.T) for x, y in ((h, w), *heads)] + [(z.T, w), (z, h)]
    else:
        z = g
        pairs = [(x, y.T) for x, y in ((h, w), *heads)] + [(z, w), (z.T, h)]

    def new(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.zeros(a.shape[0], b.shape[1], dtype=a.dtype)

    logits = [z if logits_over_g else new(a, b) for a, b in pairs[:-2]]
    outs = [*logits, *(grads or [new(a, b) for a, b in pairs[-2:]])]
    return lambda: tuple(torch.mm(a, b, out=o) for (a, b), o in zip(pairs, outs, strict=True))


def case_label(shape: Shape) -> str:
    """``N=4096 D=1024 V=32768``."""
    return f"N={shape.n} D={shape.d} V={shape.v}"


def _torch_loss(h: torch.Tensor, w: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, w), target)


def _cce_loss():
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as error:
        raise Skip(
            f"cut-cross-entropy is not importable ({error}); "
            "`pip install --no-deps cut-cross-entropy` adds the CCE row"
        ) from error

    def loss(h: torch.Tensor, w: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(h, w, target, impl="torch_compile")

    return loss


FLOOR_TEXT = "the three matrix products h @ W.T, g @ W and g.T @ h into resident buffers"

# A default dtype whose matrix products run this many times slower than float32's is left out:
# CPUs without native bfloat16 (AVX2, no AVX512-BF16 or AMX) run them up to 100x slower, which
# would turn the linear suite's hour into days. ``--dtypes`` still runs it on request.
SLOW_MATMUL = 4.0


def _matmul_seconds(dtype: torch.dtype, size: int = 512) -> float:
    a = torch.randn(size, size, dtype=dtype)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - start)
    return min(times)


def slow_dtype(dtype: str) -> str | None:
    """Why ``dtype`` is left out of this machine's default run (its matrix products are
    ``SLOW_MATMUL`` times slower than float32's), or None."""
    if dtype == "float32":
        return None
    slowdown = _matmul_seconds(getattr(torch, dtype)) / _matmul_seconds(torch.float32)
    if slowdown <= SLOW_MATMUL:
        return None
    return (
        f"{dtype} left out: its matrix products run {slowdown:.0f}x slower than float32's on "
        f"this CPU (no native {dtype} units); --dtypes {dtype} runs it anyway"
    )


def random_inputs(shape: Shape, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Random hidden states, a classifier scaled like an initialised ``nn.Linear``, targets."""
    h = torch.randn(shape.n, shape.d, dtype=dtype)
    w = (torch.randn(shape.v, shape.d) / shape.d**0.5).to(dtype)
    return h, w, torch.randint(shape.v, (shape.n,))


def build(
    provider: str,
    shape: Shape,
    dtype: torch.dtype,
    compile_backend: str,
    chunk_size: int | None = None,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> Bench:
    """The step of ``provider`` (xentkit's with ``chunk_size`` tokens per chunk, the automatic
    choice when None) on ``inputs``, by default :func:`random_inputs`."""
    name, backend = split_backend(provider)
    h, w, target = inputs or random_inputs(shape, dtype)
    inputs_bytes = h.nbytes + w.nbytes + target.nbytes
    if name == "floor":
        g = torch.randn(shape.n, shape.v, dtype=dtype)
        return Bench(gemm_floor(g, h, w), inputs_bytes + 2 * g.nbytes)
    h.requires_grad_(True)
    w.requires_grad_(True)
    if name == "xentkit":

        def loss_fn(h, w, target):
            return xentkit.linear_cross_entropy(
                h, w, target, backend=backend, chunk_size=chunk_size
            )

    elif name == "torch":
        loss_fn = _torch_loss
    elif name == "torch.compile":
        loss_fn = torch.compile(_torch_loss, dynamic=False, backend=compile_backend)
    elif name == "cce":
        loss_fn = _cce_loss()
    else:
        raise ValueError(f"unknown provider {provider!r} for suite linear")
    return Bench(lambda: torch.autograd.grad(loss_fn(h, w, target), (h, w)), inputs_bytes)


SUITE = Suite(
    name="linear",
    title="Linear cross entropy (LM head + loss), forward + backward",
    function="linear_cross_entropy",
    build=build,
    case_label=case_label,
    providers=("xentkit", "torch", "torch.compile", "cce", "floor"),
    shapes=(Shape(4096, 1024, 32768), Shape(4096, 1024, 128256)),
    quick_shapes=(Shape(64, 32, 256), Shape(37, 24, 1000)),
    dtypes=("float32", "bfloat16"),
    repeats=5,
    floor="floor",
    floor_text=FLOOR_TEXT,
    compiled=frozenset({"torch.compile", "cce"}),
    dtype_check=slow_dtype,
)
