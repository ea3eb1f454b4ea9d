"""Shared test utilities: random inputs of every layout and comparisons against PyTorch."""

from __future__ import annotations

import torch
from torch import Tensor

# Relative tolerance of a comparison with PyTorch, by dtype (float rounding of two exact paths).
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5}
ATOL = {torch.float64: 1e-12, torch.float32: 2e-6}


def layout_shape(layout: str, n: int, c: int, d: int) -> tuple[int, ...]:
    """Input shape of a layout: ``C`` (unbatched), ``NC``, ``NCd`` (sequence), ``NCdd``."""
    return {"C": (c,), "NC": (n, c), "NCd": (n, c, d), "NCdd": (n, c, d, 2)}[layout]


def index_target(shape: tuple[int, ...], ignore_index: int, ignore_frac: float, gen) -> Tensor:
    """Class indices for an input of ``shape`` (classes at dim 1, or 0 when unbatched)."""
    cdim = 0 if len(shape) == 1 else 1
    c = shape[cdim]
    tshape = shape[:cdim] + shape[cdim + 1 :]
    target = torch.randint(0, c, tshape, generator=gen)
    if ignore_frac:
        mask = torch.rand(tshape, generator=gen) < ignore_frac
        target = torch.where(mask, torch.full_like(target, ignore_index), target)
    return target


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype | None = None) -> None:
    dtype = dtype or expected.dtype
    torch.testing.assert_close(
        actual,
        expected,
        rtol=RTOL.get(dtype, 1e-2),
        atol=ATOL.get(dtype, 1e-2),
        equal_nan=True,
    )


def value_and_grads(fn, *tensors: Tensor, grad_output: Tensor | None = None):
    """``fn(*leaves)`` and the gradients of its (weighted) sum with respect to each leaf."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    out = fn(*leaves)
    g = torch.ones_like(out) if grad_output is None else grad_output
    diff = [leaf for leaf in leaves if leaf.requires_grad]
    grads = torch.autograd.grad(out, diff, g, allow_unused=True) if out.requires_grad else []
    return out.detach(), [None if gr is None else gr.detach() for gr in grads]
