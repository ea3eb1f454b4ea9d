"""Gradients (and second derivatives where torch has them) by finite differences in float64."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import xentkit


def _f64(*shape, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).requires_grad_()


CASES = {
    "softmax": lambda: (lambda x: xentkit.softmax(x, 1), (_f64(3, 5),)),
    "log_softmax": lambda: (lambda x: xentkit.log_softmax(x, 0), (_f64(4, 2),)),
    "nll_loss": lambda: (
        lambda x, w: xentkit.nll_loss(x, torch.tensor([0, 4, -100, 2]), w),
        (_f64(4, 5), torch.rand(5, dtype=torch.float64).add(0.1).requires_grad_()),
    ),
    "cross_entropy all options": lambda: (
        lambda x, w: xentkit.cross_entropy(
            x,
            torch.tensor([[0, 2], [-100, 1], [3, 3]]),
            w,
            label_smoothing=0.2,
            z_loss=1e-2,
            softcap=3.0,
        ),
        (_f64(3, 4, 2, scale=3), torch.rand(4, dtype=torch.float64).add(0.5).requires_grad_()),
    ),
    "cross_entropy probs": lambda: (
        lambda x, y: xentkit.cross_entropy(x, y, label_smoothing=0.1, reduction="sum"),
        (_f64(3, 6), torch.softmax(torch.randn(3, 6, dtype=torch.float64), 1).requires_grad_()),
    ),
    "binary_cross_entropy": lambda: (
        lambda p, y: xentkit.binary_cross_entropy(p, y, reduction="sum"),
        (
            (torch.rand(7, dtype=torch.float64) * 0.8 + 0.1).requires_grad_(),
            torch.rand(7, dtype=torch.float64).requires_grad_(),
        ),
    ),
    "binary_cross_entropy_with_logits": lambda: (
        lambda x, y, pw: xentkit.binary_cross_entropy_with_logits(x, y, pos_weight=pw),
        (
            _f64(3, 4, scale=4),
            torch.rand(3, 4, dtype=torch.float64).requires_grad_(),
            _f64(4).abs(),
        ),
    ),
    "linear_cross_entropy reference": lambda: (
        lambda h, w, b: xentkit.linear_cross_entropy(
            h, w, torch.tensor([1, 0, -100, 6]), b, backend="reference", z_loss=1e-3
        ),
        (_f64(4, 3), _f64(7, 3), _f64(7)),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_gradcheck(case):
    fn, inputs = CASES[case]()
    assert gradcheck(fn, inputs)


@pytest.mark.parametrize(
    "case", ["softmax", "log_softmax", "cross_entropy all options", "binary_cross_entropy"]
)
def test_double_backward(case):
    fn, inputs = CASES[case]()
    assert gradgradcheck(fn, inputs)
