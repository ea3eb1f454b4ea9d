"""Gradient filtering (``filter_eps`` of linear_cross_entropy): the loss is the exact one; the
hidden-state and weight gradients are the products of the filtered logit gradient
(``grad_filter.filtered``, block by block of each chunk's counted tokens), the bias gradient is
exact; ``filter_eps=0`` and a flat softmax change nothing; bad options raise."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import xentkit
from xentkit import reference
from xentkit.kernels import grad_filter


def test_kept_classes_and_filtered():
    g = torch.tensor([[0.5, 1e-5, -0.5], [-0.25, -1e-6, 0.25], [1e-5, -0.9, 0.9]])
    kept = grad_filter.kept_classes(g, 2**-12, block_rows=2)
    assert kept.tolist() == [[True, False, True], [False, True, True]]
    assert grad_filter.kept_classes(g[:0], 1e-3).shape == (0, 3)
    assert grad_filter.chunk_filter(g, 2**-12) is None  # 8 of 9 entries kept: exact
    assert torch.equal(grad_filter.filtered(g, 2**-12), g)
    sparse = torch.zeros(200, 4)
    sparse[:, 0] = 1.0
    sparse[150, 1] = 1e-3
    sparse[10, 2] = 1e-5
    want = sparse.clone()
    want[10, 2] = 0.0
    torch.testing.assert_close(grad_filter.filtered(sparse, 2**-12), want, rtol=0, atol=0)


def _problem(rows, vocab, dim, dtype, bias, seed, scale=4.0):
    """Inputs whose softmax is peaked (large logits), so that filtering drops most classes."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(rows, dim, generator=g) * scale).to(dtype)
    w = torch.randn(vocab, dim, generator=g).to(dtype)
    b = torch.randn(vocab, generator=g).to(dtype) if bias else None
    target = torch.randint(vocab, (rows,), generator=g)
    return h, w, b, target


def expected(h, w, b, target, eps, chunk, **options):
    """Gradients of (hidden, weight, bias) by the specification: the unnormalised logit
    gradient of the reference loss, filtered chunk by chunk over the counted tokens, pushed
    through the head, divided by the mean's denominator."""
    reduction = options["reduction"]
    ignore = options["ignore_index"]
    counted = target != ignore
    logits = torch.nn.functional.linear(h, w, b).to(reference.accumulation_dtype(h.dtype))
    logits.requires_grad_(True)
    loss = reference.cross_entropy(logits, target, **options)
    denominator = torch.ones((), dtype=logits.dtype)
    if reduction == "mean":
        weight = options["weight"]
        denominator = counted.sum() if weight is None else weight[target[counted]].sum()
    (grad,) = torch.autograd.grad(loss * denominator, logits)
    rows = grad[counted]
    kept = torch.cat([grad_filter.filtered(c, eps) for c in torch.split(rows, chunk)])
    gh = grad.new_zeros(h.shape)
    gh[counted] = kept @ w.to(kept.dtype)
    gw = kept.T @ h[counted].to(kept.dtype)
    gb = grad.sum(0)
    return [x / denominator for x in (gh, gw, gb)], loss


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 300),
    vocab=st.integers(2, 400),
    dim=st.integers(1, 12),
    chunk=st.sampled_from([128, 256]),
    reduction=st.sampled_from(["mean", "sum"]),
    z_loss=st.sampled_from([0.0, 1e-3]),
    softcap=st.sampled_from([None, 20.0]),
    weighted=st.booleans(),
    ignored=st.booleans(),
    bias=st.booleans(),
    eps=st.sampled_from([2**-12, 2**-6, 0.1]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_filtered_gradients_follow_the_specification(
    rows, vocab, dim, chunk, reduction, z_loss, softcap, weighted, ignored, bias, eps, dtype, seed
):
    h, w, b, target = _problem(rows, vocab, dim, dtype, bias, seed)
    if ignored:
        target[1::3] = -100
    class_weight = torch.rand(vocab, dtype=dtype) + 0.5 if weighted else None
    options = dict(
        weight=class_weight, ignore_index=-100, reduction=reduction, label_smoothing=0.0,
        z_loss=z_loss, softcap=softcap,
    )  # fmt: skip
    want, want_loss = expected(h, w, b, target, eps, chunk, **options)
    params = [t.requires_grad_() for t in (h, w, b) if t is not None]
    loss = xentkit.linear_cross_entropy(
        h, w, target, b, class_weight=class_weight, reduction=reduction, z_loss=z_loss,
        softcap=softcap, chunk_size=chunk, filter_eps=eps,
    )  # fmt: skip
    got = torch.autograd.grad(loss, params)
    tol = {} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-5}
    torch.testing.assert_close(loss.double(), want_loss.double(), **tol, equal_nan=True)
    for g, x in zip(got, want, strict=False):
        torch.testing.assert_close(g.double(), x.double(), **tol, equal_nan=True)


def test_filtering_drops_something_and_changes_little():
    h, w, _, target = _problem(512, 2000, 16, torch.float64, False, 0)
    h.requires_grad_()
    w.requires_grad_()
    exact = torch.autograd.grad(xentkit.linear_cross_entropy(h, w, target), (h, w))
    loss = xentkit.linear_cross_entropy(h, w, target, filter_eps=2**-12)
    approx = torch.autograd.grad(loss, (h, w))
    logits = (h @ w.T).detach()
    g = torch.softmax(logits, -1) - torch.nn.functional.one_hot(target, 2000)
    assert grad_filter.kept_classes(g, 2**-12).double().mean() < grad_filter.DENSE_FRACTION
    for a, e in zip(approx, exact, strict=True):
        assert not torch.equal(a, e)
        assert (a - e).norm() / e.norm() < 0.05


@pytest.mark.parametrize("eps, scale", [(0.0, 4.0), (2**-12, 0.01)])
def test_nothing_filtered_is_exact(eps, scale):
    """eps 0 keeps every class; a flat softmax (every p near 1 / V > eps) keeps too much to
    gather: both run the exact products."""
    h, w, b, target = _problem(200, 300, 8, torch.float64, True, 1, scale=scale)
    params = [t.requires_grad_() for t in (h, w, b)]
    exact = torch.autograd.grad(xentkit.linear_cross_entropy(h, w, target, b), params)
    loss = xentkit.linear_cross_entropy(h, w, target, b, filter_eps=eps)
    for a, e in zip(torch.autograd.grad(loss, params), exact, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_bfloat16_follows_the_specification():
    h, w, _, target = _problem(256, 500, 16, torch.bfloat16, False, 2)
    h.requires_grad_()
    w.requires_grad_()
    options = dict(weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                   z_loss=0.0, softcap=None)  # fmt: skip
    want, _ = expected(h.detach(), w.detach(), None, target, 2**-8, 128, **options)
    loss = xentkit.linear_cross_entropy(h, w, target, chunk_size=128, filter_eps=2**-8)
    got = torch.autograd.grad(loss, (h, w))
    for g, x in zip(got, want, strict=False):
        assert g.dtype == torch.bfloat16
        assert (g.float() - x.float()).norm() / x.float().norm() < 2e-2


def test_module_and_compile_take_filter_eps():
    h, w, _, target = _problem(300, 700, 8, torch.float32, False, 3)
    h.requires_grad_()
    w.requires_grad_()
    eager = xentkit.nn.LinearCrossEntropyLoss(filter_eps=2**-12)
    want = torch.autograd.grad(eager(h, w, target), (h, w))

    def step(h, w, target):
        return xentkit.linear_cross_entropy(h, w, target, filter_eps=2**-12)

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    got = torch.autograd.grad(compiled(h, w, target), (h, w))
    for g, x in zip(got, want, strict=True):
        torch.testing.assert_close(g, x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"filter_eps": -1.0}, "filter_eps must be a float >= 0"),
        ({"filter_eps": float("nan")}, "filter_eps must be a float >= 0"),
        ({"filter_eps": True}, "filter_eps must be a float >= 0 or None"),
        ({"filter_eps": "2**-12"}, "filter_eps must be a float >= 0 or None"),
        ({"filter_eps": 1e-3, "backend": "reference"}, "chunked backend only"),
        ({"filter_eps": 1e-3, "backend": "triton"}, "chunked backend only"),
        ({"filter_eps": 1e-3, "reduction": "none"}, "reduction='mean' or 'sum'"),
        ({"filter_eps": 1e-3, "label_smoothing": 0.1}, "label_smoothing"),
        ({"filter_eps": 1e-3, "process_group": object()}, "not supported vocab-parallel"),
    ],
)
def test_bad_options_raise(kwargs, match):
    h, w, _, target = _problem(4, 5, 3, torch.float32, False, 4)
    with pytest.raises(ValueError, match=match):
        xentkit.linear_cross_entropy(h, w, target, **kwargs)


def test_class_weight_with_grad_needs_the_reference():
    h, w, _, target = _problem(4, 5, 3, torch.float32, False, 5)
    class_weight = torch.ones(5, requires_grad=True)
    with pytest.raises(ValueError, match="class_weight that requires grad"):
        xentkit.linear_cross_entropy(h, w, target, class_weight=class_weight, filter_eps=1e-3)
