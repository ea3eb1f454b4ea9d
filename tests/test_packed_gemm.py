"""The weight packed once per pass (xentkit.kernels.packed_gemm): its products equal torch's,
the fused LM head gives the same values and gradients with it as without, and it is made only
where it applies."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import xentkit
from xentkit.kernels import packed_gemm

pytestmark = pytest.mark.skipif(packed_gemm._library() is None, reason="torch without MKL")


@contextlib.contextmanager
def counting_packed_calls() -> Iterator[list[int]]:
    """The row counts of the chunk products made from a packed weight, as they happen."""
    calls: list[int] = []
    original = packed_gemm.PackedWeight.logits

    def counted(self, hidden, *args):
        calls.append(hidden.shape[0])
        return original(self, hidden, *args)

    with mock.patch.object(packed_gemm.PackedWeight, "logits", counted):
        yield calls


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["rows", "strided rows", "columns", "fewer rows"])
@pytest.mark.parametrize("weight_rows", ["contiguous", "strided"])
def test_packed_products_equal_torch_mm(bias, layout, weight_rows):
    torch.manual_seed(0)
    weight = torch.randn(300, 40) if weight_rows == "contiguous" else torch.randn(300, 64)[:, 3:43]
    b = torch.randn(300) if bias else None
    packed = packed_gemm.pack(weight, rows=24, tokens=48)
    hidden = {
        "rows": torch.randn(24, 40),
        "strided rows": torch.randn(24, 50)[:, 5:45],
        "columns": torch.randn(40, 24).T,
        "fewer rows": torch.randn(7, 40),
    }[layout]
    out = torch.full((hidden.shape[0], 300), float("nan"))
    result = packed.logits(hidden, b, out)
    expected = torch.mm(hidden, weight.T) if b is None else torch.addmm(b, hidden, weight.T)
    assert result.data_ptr() == out.data_ptr()
    torch.testing.assert_close(result, expected)


def test_pack_applies_only_to_float32_cpu_weights_of_several_chunks(monkeypatch):
    weight = torch.randn(64, 16)
    assert packed_gemm.pack(weight, rows=8, tokens=9) is not None
    assert packed_gemm.pack(weight, rows=8, tokens=8) is None  # one chunk: nothing to save
    assert packed_gemm.pack(weight.double(), rows=8, tokens=32) is None
    assert packed_gemm.pack(weight.bfloat16(), rows=8, tokens=32) is None
    assert packed_gemm.pack(torch.randn(16, 64).T, rows=8, tokens=32) is None  # column stride
    monkeypatch.setattr(packed_gemm, "MAX_BYTES", 64 * 16 * 4 - 1)
    assert packed_gemm.pack(weight, rows=8, tokens=32) is None  # over the budget
    monkeypatch.setattr(packed_gemm, "MAX_BYTES", 2 << 30)
    packed_gemm.set_enabled(False)
    try:
        assert packed_gemm.pack(weight, rows=8, tokens=32) is None
    finally:
        packed_gemm.set_enabled(True)


def _loss_and_grads(fn, inputs, packing: bool):
    packed_gemm.set_enabled(packing)
    try:
        leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.float().sum() * (k + 1) for k, o in enumerate(outs)).backward()
        return [o.detach() for o in outs] + [t.grad for t in leaves if t is not None]
    finally:
        packed_gemm.set_enabled(True)


@settings(deadline=None, max_examples=25)
@given(
    tokens=st.integers(2, 90),
    chunk=st.integers(1, 40),
    classes=st.integers(1, 70),
    bias=st.booleans(),
    ignored=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    smoothing=st.sampled_from([0.0, 0.1]),
)
def test_fused_head_is_the_same_with_the_packed_weight(
    tokens, chunk, classes, bias, ignored, reduction, smoothing
):
    torch.manual_seed(tokens * 100 + classes)
    hidden, weight = torch.randn(tokens, 12), torch.randn(classes, 12)
    b = torch.randn(classes) if bias else None
    target = torch.randint(0, classes, (tokens,))
    if ignored:
        target[::3] = -100

    def head(h, w, b_):
        return xentkit.linear_cross_entropy(
            h, w, target, bias=b_, reduction=reduction, label_smoothing=smoothing,
            chunk_size=chunk,
        )  # fmt: skip

    with counting_packed_calls() as calls:
        packed = _loss_and_grads(head, (hidden, weight, b), packing=True)
    plain = _loss_and_grads(head, (hidden, weight, b), packing=False)
    for x, y in zip(packed, plain, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    counted = int((target != -100).sum())
    assert bool(calls) == (counted > chunk)


def test_log_probs_use_the_packed_weight():
    torch.manual_seed(0)
    hidden, weight = torch.randn(50, 16), torch.randn(33, 16)
    target = torch.randint(0, 33, (50,))

    def log_probs(h, w):
        return xentkit.linear_log_probs(h, w, target, return_entropy=True, chunk_size=16)

    with counting_packed_calls() as calls:
        packed = _loss_and_grads(log_probs, (hidden, weight), packing=True)
    assert calls == [16, 16, 16, 2] * 2  # the forward's pass and the backward's
    plain = _loss_and_grads(log_probs, (hidden, weight), packing=False)
    for x, y in zip(packed, plain, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
