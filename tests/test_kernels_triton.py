"""The Triton kernels against the float64 reference and PyTorch, run through Triton's
interpreter on CPU tensors (``TRITON_INTERPRET=1``, set by conftest.py).

The interpreter runs each program as Python over NumPy, so the shapes are small and the tiles
are shrunk to 16 (the ``small_tiles`` fixture) so that rows, vocabularies and hidden sizes
span several tiles, most of them not a multiple of the tile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip(
    "triton", reason="Triton is not installed (an optional dependency: pip install triton)"
)

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import xentkit
from xentkit import functional, reference
from xentkit.kernels import triton as kernels

pytestmark = pytest.mark.triton

REDUCTIONS = ("mean", "sum", "none")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# (rtol, atol) of the loss against the float64 reference of the same (rounded) inputs: every
# dtype but float64 accumulates in float32.
LOSS_TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1e-5, 1e-6),
    torch.float16: (1e-5, 1e-6),
}
# Gradients are rounded to the inputs' dtype (and, in the linear kernel, multiplied in it);
# the atol is relative to the largest expected entry.
GRAD_TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2e-2, 1e-2),
    torch.float16: (2e-3, 2e-3),
}
DEFAULT_CE_BLOCK = kernels.CE_MAX_BLOCK_V
DEFAULT_TILES = dict(kernels.LINEAR_TILES)


@pytest.fixture(scope="module", autouse=True)
def small_tiles():
    """Tiles of 16 (the smallest tl.dot takes) so that small inputs span several of them."""
    kernels.CE_MAX_BLOCK_V = 16
    kernels.LINEAR_TILES = dict.fromkeys(DEFAULT_TILES, (16, 16, 16))
    yield
    kernels.CE_MAX_BLOCK_V = DEFAULT_CE_BLOCK
    kernels.LINEAR_TILES = DEFAULT_TILES


def close(got, want, tol, relative_atol=False):
    rtol, atol = tol
    want = want.to(got.dtype)
    if relative_atol and want.numel():
        atol *= max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True)


def triton_ce(logits, target, weight=None, ignore_index=-100, reduction="mean", eps=0.0, z=0.0,
              softcap=None, inplace=False):  # fmt: skip
    return kernels.cross_entropy(
        logits, target, weight, ignore_index, reduction, eps, z, softcap, inplace
    )


def reference_ce(logits, target, weight=None, ignore_index=-100, reduction="mean", eps=0.0,
                 z=0.0, softcap=None):  # fmt: skip
    """The reference in float64 on the same values (rounded inputs upcast exactly)."""
    w = None if weight is None else weight.double()
    return reference.cross_entropy(logits, target, w, ignore_index, reduction, eps, z, softcap)


def loss_and_grads(fn, inputs, grad_output_seed=1):
    """``fn(*inputs)`` and the gradients of ``sum(g * loss)``, ``g`` random, with respect to
    every input that requires grad."""
    loss = fn(*inputs)
    gen = torch.Generator().manual_seed(grad_output_seed)
    g = torch.randn(loss.shape, generator=gen, dtype=torch.float64).to(loss.dtype)
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, leaves, g)


def as_float64(*tensors):
    return [
        None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors
    ]


def ce_case(gen, m, v, dtype, ignore_frac=0.3, weighted=False, ignore_index=-100):
    logits = (torch.randn(m, v, generator=gen, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, v, (m,), generator=gen)
    target[torch.rand(m, generator=gen) < ignore_frac] = ignore_index
    weight = torch.rand(v, generator=gen, dtype=torch.float64).to(dtype) if weighted else None
    return logits.requires_grad_(), target, weight


# ---------------------------------------------------------------------------------------------
# cross entropy


ce_options = st.fixed_dictionaries(
    {
        "m": st.integers(0, 9),
        "v": st.integers(1, 40),
        "dtype": st.sampled_from(DTYPES),
        "weighted": st.booleans(),
        "ignore_index": st.sampled_from([-100, 0, 3]),
        "reduction": st.sampled_from(REDUCTIONS),
        "eps": st.sampled_from([0.0, 0.1, 1.0]),
        "z": st.sampled_from([0.0, 1e-2]),
        "softcap": st.sampled_from([None, 2.0]),
        "inplace": st.booleans(),
    }
)


@given(ce_options)
def test_cross_entropy_matches_reference(o):
    gen = torch.Generator().manual_seed(o["m"] * 100 + o["v"])
    logits, target, weight = ce_case(
        gen, o["m"], o["v"], o["dtype"], 0.3, o["weighted"], o["ignore_index"]
    )
    options = (weight, o["ignore_index"], o["reduction"], o["eps"], o["z"], o["softcap"])
    (x64,) = as_float64(logits)
    want = loss_and_grads(lambda x: reference_ce(x, target, *options), [x64])

    given_logits = logits.detach().clone().requires_grad_()
    buffer = given_logits.detach()  # the storage the in-place gradient goes to
    got = loss_and_grads(lambda x: triton_ce(x, target, *options, o["inplace"]), [given_logits])
    acc = reference.accumulation_dtype(o["dtype"])
    assert got[0].dtype == acc and got[1][0].dtype == o["dtype"]
    close(got[0], want[0], LOSS_TOL[o["dtype"]])
    close(got[1][0], want[1][0], GRAD_TOL[o["dtype"]], relative_atol=True)
    if o["inplace"] and o["m"]:
        assert got[1][0].data_ptr() == buffer.data_ptr()
    else:
        assert torch.equal(buffer, logits.detach())  # the input is left alone


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("v", [16, 50])
def test_cross_entropy_matches_torch(reduction, dtype, v):
    """V a multiple of the 16-wide block, and not."""
    gen = torch.Generator().manual_seed(v)
    logits, target, weight = ce_case(gen, 7, v, dtype, 0.2, weighted=True)
    kwargs = {"weight": weight, "reduction": reduction, "label_smoothing": 0.1}
    got = loss_and_grads(
        lambda x: xentkit.cross_entropy(x, target, **kwargs, backend="triton"), [logits]
    )
    want = loss_and_grads(lambda x: F.cross_entropy(x, target, **kwargs), [logits])
    tol = LOSS_TOL[dtype]
    close(got[0], want[0], tol)
    close(got[1][0], want[1][0], tol)


def test_cross_entropy_default_block(monkeypatch):
    """The real block size: a whole row of 100 classes in one 128-wide block."""
    monkeypatch.setattr(kernels, "CE_MAX_BLOCK_V", DEFAULT_CE_BLOCK)
    logits, target, _ = ce_case(torch.Generator().manual_seed(0), 6, 100, torch.float32)
    got = loss_and_grads(lambda x: triton_ce(x, target, z=1e-3, softcap=5.0), [logits])
    (x64,) = as_float64(logits)
    want = loss_and_grads(lambda x: reference_ce(x, target, z=1e-3, softcap=5.0), [x64])
    close(got[0], want[0], LOSS_TOL[torch.float32])
    close(got[1][0], want[1][0], GRAD_TOL[torch.float32])


@pytest.mark.parametrize("layout", [(4, 21), (2, 21, 3), (21,)])
def test_cross_entropy_layouts_through_functional(layout):
    """``(N, C)``, ``(N, C, d)`` and unbatched ``(C)`` inputs reach the kernel as rows."""
    logits = torch.randn(*layout, dtype=torch.float64, requires_grad=True)
    shape = layout[:1] + layout[2:] if len(layout) > 1 else ()
    target = torch.randint(0, 21, shape)
    for reduction in REDUCTIONS:
        kwargs = {"reduction": reduction, "label_smoothing": 0.2}
        got = loss_and_grads(
            lambda x, kw=kwargs: xentkit.cross_entropy(x, target, **kw, backend="triton"),
            [logits],
        )
        want = loss_and_grads(lambda x, kw=kwargs: F.cross_entropy(x, target, **kw), [logits])
        assert got[0].shape == want[0].shape
        close(got[0], want[0], LOSS_TOL[torch.float64])
        close(got[1][0], want[1][0], GRAD_TOL[torch.float64])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("m", [0, 5])
def test_cross_entropy_all_ignored_and_empty(reduction, m):
    logits = torch.randn(m, 20, requires_grad=True)
    target = torch.full((m,), -100)
    weight = torch.rand(20)
    got = loss_and_grads(
        lambda x: xentkit.cross_entropy(x, target, weight, reduction=reduction, backend="triton"),
        [logits],
    )
    want = loss_and_grads(
        lambda x: F.cross_entropy(x, target, weight, reduction=reduction), [logits]
    )
    close(got[0], want[0], LOSS_TOL[torch.float32])
    assert not got[1][0].any()
    if reduction == "mean":
        assert got[0].isnan()  # 0 / 0, as in PyTorch


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NumPy on -inf - -inf
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # and on log(0)
def test_cross_entropy_infinite_logits():
    """Masked classes (-inf) as PyTorch; a row of nothing but -inf is NaN when counted and has
    zero gradient when ignored (PyTorch's is NaN there, 0 * NaN through its log-softmax)."""
    logits = torch.randn(4, 37, dtype=torch.float64)
    logits[:, [1, 17, 33]] = float("-inf")
    logits[3] = float("-inf")
    logits.requires_grad_()
    target = torch.tensor([0, 20, 36, -100])
    got = loss_and_grads(lambda x: triton_ce(x, target, reduction="none"), [logits])
    want = loss_and_grads(lambda x: F.cross_entropy(x, target, reduction="none"), [logits])
    close(got[0], want[0], LOSS_TOL[torch.float64])
    close(got[1][0][:3], want[1][0][:3], GRAD_TOL[torch.float64])
    assert not got[1][0][3].any()
    nan_row = triton_ce(logits, torch.tensor([0, 0, 0, 5]), reduction="none")
    assert nan_row[3].isnan() and not nan_row[:3].isnan().any()


def test_cross_entropy_backward_twice_without_inplace():
    logits, target, _ = ce_case(torch.Generator().manual_seed(1), 6, 30, torch.float32)
    loss = triton_ce(logits, target, reduction="none", z=0.1)
    first = torch.autograd.grad(loss.sum(), logits, retain_graph=True)[0]
    second = torch.autograd.grad(loss.sum(), logits)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_cross_entropy_inplace_backward_can_run_twice_with_retain_graph():
    logits, target, _ = ce_case(torch.Generator().manual_seed(2), 6, 30, torch.float32)
    want = torch.autograd.grad(triton_ce(logits, target), logits)[0]
    given_logits = logits.detach().clone().requires_grad_()
    loss = triton_ce(given_logits, target, inplace=True)
    (grad,) = torch.autograd.grad(loss, given_logits, retain_graph=True)
    torch.testing.assert_close(grad, want, rtol=0, atol=0)
    torch.testing.assert_close(given_logits.detach(), want, rtol=0, atol=0)  # overwritten
    (again,) = torch.autograd.grad(loss, given_logits)  # the graph was kept: scaled anew
    torch.testing.assert_close(again, want, rtol=0, atol=0)


def test_cross_entropy_without_grad_leaves_logits_alone():
    logits, target, _ = ce_case(torch.Generator().manual_seed(3), 6, 30, torch.float32)
    before = logits.detach().clone()
    with torch.no_grad():
        loss = triton_ce(logits, target, inplace=True)
    assert loss.grad_fn is None
    assert torch.equal(logits.detach(), before)


def test_cross_entropy_class_weight_has_no_derivative():
    """As PyTorch: the loss is not differentiable in the class weights."""
    logits, target, _ = ce_case(torch.Generator().manual_seed(4), 4, 9, torch.float64)
    weight = torch.rand(9, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="weight"):
        triton_ce(logits, target, weight).backward()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_gradcheck(reduction):
    """Finite differences in float64 (fast mode: along random directions, the interpreter
    being slow), every option on, over two vocabulary blocks."""
    logits = (torch.randn(3, 19, dtype=torch.float64) * 3).requires_grad_()
    target = torch.tensor([0, 18, -100])
    weight = torch.rand(19, dtype=torch.float64) + 0.5

    def fn(x):
        return triton_ce(x, target, weight, -100, reduction, 0.2, 1e-2, 4.0)

    assert torch.autograd.gradcheck(fn, (logits,), fast_mode=True)


# ---------------------------------------------------------------------------------------------
# linear cross entropy


def linear_case(gen, m, v, d, dtype, bias=False, ignore_frac=0.25, weighted=False):
    hidden = torch.randn(m, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) * 2 / d**0.5
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    target = torch.randint(0, v, (m,), generator=gen)
    target[torch.rand(m, generator=gen) < ignore_frac] = -100
    class_weight = torch.rand(v, generator=gen, dtype=torch.float64) if weighted else None
    hidden, weight, b, class_weight = [
        None if t is None else t.to(dtype) for t in (hidden, weight, b, class_weight)
    ]
    return hidden.requires_grad_(), weight.requires_grad_(), b, target, class_weight


def triton_linear(hidden, weight, target, bias=None, class_weight=None, ignore_index=-100,
                  reduction="mean", eps=0.0, z=0.0, softcap=None, **kwargs):  # fmt: skip
    return kernels.linear_cross_entropy(
        hidden, weight, target, bias, class_weight, ignore_index, reduction, eps, z, softcap,
        None, **kwargs,
    )  # fmt: skip


def reference_linear(hidden, weight, target, bias=None, class_weight=None, *options):
    w = None if class_weight is None else class_weight.double()
    return reference.cross_entropy(F.linear(hidden, weight, bias), target, w, *options)


linear_options = st.fixed_dictionaries(
    {
        "m": st.integers(0, 20),
        "v": st.integers(1, 40),
        "d": st.integers(1, 40),
        "dtype": st.sampled_from(DTYPES),
        "bias": st.booleans(),
        "weighted": st.booleans(),
        "reduction": st.sampled_from(REDUCTIONS),
        "eps": st.sampled_from([0.0, 0.2]),
        "z": st.sampled_from([0.0, 1e-2]),
        "softcap": st.sampled_from([None, 2.0]),
    }
)


@given(linear_options)
def test_linear_cross_entropy_matches_reference(o):
    m, v, d, dtype = o["m"], o["v"], o["d"], o["dtype"]
    gen = torch.Generator().manual_seed(m * 10000 + v * 100 + d)
    hidden, weight, bias, target, class_weight = linear_case(
        gen, m, v, d, dtype, o["bias"], weighted=o["weighted"]
    )
    if bias is not None:
        bias.requires_grad_()
    options = (-100, o["reduction"], o["eps"], o["z"], o["softcap"])
    inputs = [hidden, weight, target, bias, class_weight]
    got = loss_and_grads(lambda *a: triton_linear(*a, *options), inputs)
    want = loss_and_grads(
        lambda *a: reference_linear(*a, *options),
        as_float64(*inputs[:2]) + inputs[2:3] + as_float64(*inputs[3:]),
    )
    assert got[0].dtype == reference.accumulation_dtype(dtype)
    close(got[0], want[0], LOSS_TOL[dtype])
    for grad, want_grad, param in zip(got[1], want[1], (hidden, weight, bias), strict=False):
        assert grad.dtype == param.dtype
        close(grad, want_grad, GRAD_TOL[dtype], relative_atol=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_matches_torch(reduction, dtype):
    """Through ``xentkit.linear_cross_entropy``, leading dimensions included, against PyTorch
    on the unfused logits (float32: same inputs; bfloat16: PyTorch in float64 on the same
    bfloat16 values)."""
    gen = torch.Generator().manual_seed(7)
    hidden, weight, bias, target, class_weight = linear_case(gen, 18, 37, 24, dtype, bias=True,
                                                             weighted=True)  # fmt: skip
    hidden = hidden.detach().reshape(3, 6, 24).requires_grad_()
    target = target.reshape(3, 6)
    bias.requires_grad_()
    kwargs = {"reduction": reduction, "label_smoothing": 0.1}

    def fused(h, w, b):
        return xentkit.linear_cross_entropy(
            h, w, target, b, class_weight=class_weight, **kwargs, backend="triton"
        )

    def unfused(h, w, b):
        logits = F.linear(h, w, b).flatten(0, 1)
        cw = class_weight.to(logits.dtype)
        loss = F.cross_entropy(logits, target.flatten(), cw, **kwargs)
        return loss.reshape(target.shape) if reduction == "none" else loss

    got = loss_and_grads(fused, [hidden, weight, bias])
    want = loss_and_grads(unfused, as_float64(hidden, weight, bias))
    assert got[0].shape == want[0].shape and got[0].dtype == dtype
    close(got[0], want[0], (2e-2, 2e-2) if dtype == torch.bfloat16 else LOSS_TOL[dtype])
    for grad, want_grad in zip(got[1], want[1], strict=True):
        close(grad, want_grad, GRAD_TOL[dtype], relative_atol=True)


def test_linear_cross_entropy_default_tiles(monkeypatch):
    """The real tiles (64 rows, 64 classes, 32 features in float32), partly filled."""
    monkeypatch.setattr(kernels, "LINEAR_TILES", DEFAULT_TILES)
    gen = torch.Generator().manual_seed(5)
    inputs = list(linear_case(gen, 70, 90, 40, torch.float32, bias=True))
    inputs[2].requires_grad_()
    inputs = [inputs[0], inputs[1], inputs[3], inputs[2]]
    got = loss_and_grads(lambda *a: triton_linear(*a, z=1e-3), inputs)
    want = loss_and_grads(
        lambda h, w, t, b: reference_linear(h, w, t, b, None, -100, "mean", 0.0, 1e-3, None),
        [*as_float64(*inputs[:2]), inputs[2], *as_float64(inputs[3])],
    )
    close(got[0], want[0], LOSS_TOL[torch.float32])
    for grad, want_grad in zip(got[1], want[1], strict=True):
        close(grad, want_grad, GRAD_TOL[torch.float32], relative_atol=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("m", [0, 6])
def test_linear_cross_entropy_all_ignored_and_empty(reduction, m):
    hidden, weight, bias, target, class_weight = linear_case(
        torch.Generator().manual_seed(m), m, 20, 8, torch.float32, bias=True, ignore_frac=1.0,
        weighted=True,
    )  # fmt: skip
    bias.requires_grad_()
    got = loss_and_grads(
        lambda h, w, b: triton_linear(h, w, target, b, class_weight, reduction=reduction),
        [hidden, weight, bias],
    )
    if reduction == "mean":
        assert got[0].isnan()  # 0 / 0, as in PyTorch
    else:
        assert not got[0].any()
    assert all(not g.any() for g in got[1])


def test_linear_cross_entropy_masked_classes():
    """A bias of -inf masks classes, as with the unfused logits; a whole tile of them too."""
    gen = torch.Generator().manual_seed(6)
    hidden, weight, bias, target, _ = linear_case(gen, 9, 40, 8, torch.float64, bias=True)
    bias[:16] = float("-inf")
    bias[35] = float("-inf")
    target = torch.randint(16, 35, (9,), generator=gen)
    bias.requires_grad_()
    got = loss_and_grads(lambda h, w, b: triton_linear(h, w, target, b), [hidden, weight, bias])
    want = loss_and_grads(lambda h, w, b: F.cross_entropy(F.linear(h, w, b), target),
                          [hidden, weight, bias])  # fmt: skip
    close(got[0], want[0], LOSS_TOL[torch.float64])
    for grad, want_grad in zip(got[1], want[1], strict=True):
        close(grad, want_grad, GRAD_TOL[torch.float64])


@pytest.mark.parametrize(
    "needs", [(True, False, False), (False, True, False), (False, False, True)]
)
def test_linear_cross_entropy_only_requested_gradients(needs):
    gen = torch.Generator().manual_seed(8)
    hidden, weight, bias, target, _ = linear_case(gen, 10, 20, 8, torch.float64, bias=True)
    for param, need in zip((hidden, weight, bias), needs, strict=True):
        param.requires_grad_(need)
    triton_linear(hidden, weight, target, bias).backward()
    want = [p.grad for p in (hidden, weight, bias)]
    for param in (hidden, weight, bias):
        param.grad = None
    reference_linear(hidden, weight, target, bias).backward()
    for param, need, got in zip((hidden, weight, bias), needs, want, strict=True):
        assert (got is not None) == need
        if need:
            torch.testing.assert_close(got, param.grad)


def test_linear_cross_entropy_backward_twice():
    gen = torch.Generator().manual_seed(9)
    hidden, weight, _, target, _ = linear_case(gen, 10, 20, 8, torch.float32)
    loss = triton_linear(hidden, weight, target, reduction="sum", z=0.1)
    first = torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    for got, want in zip(torch.autograd.grad(loss, (hidden, weight)), first, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_linear_cross_entropy_without_grad():
    gen = torch.Generator().manual_seed(10)
    hidden, weight, _, target, _ = linear_case(gen, 10, 20, 8, torch.float32)
    with torch.no_grad():
        loss = triton_linear(hidden, weight, target)
    assert loss.grad_fn is None
    close(loss, reference_linear(hidden.double(), weight.double(), target), LOSS_TOL[torch.float32])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_gradcheck(reduction):
    gen = torch.Generator().manual_seed(11)
    hidden, weight, bias, target, class_weight = linear_case(gen, 3, 19, 5, torch.float64,
                                                             bias=True, weighted=True)  # fmt: skip
    bias.requires_grad_()

    def fn(h, w, b):
        return triton_linear(h, w, target, b, class_weight, -100, reduction, 0.0, 1e-2, 3.0)

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias), fast_mode=True)


def test_gradient_filter_is_exact_to_float32():
    """Peaked logits: most softmax values are far below 2**-28, whole tiles of them. The
    default filter skips those tiles and changes nothing float32 can see; a filter that drops
    real probability mass (0.5) does change the gradient, so tiles are being skipped."""
    gen = torch.Generator().manual_seed(12)
    hidden, weight, _, target, _ = linear_case(gen, 20, 64, 16, torch.float32, ignore_frac=0.0)
    weight = (weight.detach() * 15).requires_grad_()
    target = F.linear(hidden, weight).argmax(1)  # confident and right, as late in training
    logits = F.linear(hidden, weight).double()
    assert (logits.softmax(1) < kernels.FILTER_EPS).float().mean() > 0.5

    def grads(filter_eps):
        loss = triton_linear(hidden, weight, target, reduction="sum", filter_eps=filter_eps)
        return torch.autograd.grad(loss, (hidden, weight))

    unfiltered, filtered, coarse = grads(None), grads(kernels.FILTER_EPS), grads(0.5)
    h64, w64 = as_float64(hidden, weight)
    want = torch.autograd.grad(
        reference_linear(h64, w64, target, None, None, -100, "sum"), (h64, w64)
    )
    for a, b, c, exact in zip(unfiltered, filtered, coarse, want, strict=True):
        close(b, a, (1e-6, 1e-7), relative_atol=True)
        # Logits of size ~50 put float32 rounding of ~50 * 2**-24 into every softmax value.
        close(b, exact, (1e-4, 1e-5), relative_atol=True)
        assert not torch.allclose(c, a, rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# devices and backend choice


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    logits, target, _ = ce_case(torch.Generator().manual_seed(0), 3, 5, torch.float32)
    with pytest.raises(RuntimeError, match=r"CUDA tensors.*TRITON_INTERPRET=1"):
        triton_ce(logits, target)
    with pytest.raises(RuntimeError, match="backend='chunked'"):
        triton_linear(torch.randn(3, 4), torch.randn(5, 4), target)


@pytest.mark.parametrize("installed", [True, False])
def test_cuda_defaults(monkeypatch, installed):
    """Plain cross entropy defaults to Triton on CUDA where it is installed; the linear one to
    the chunked design (whose row pass is Triton's there: see
    test_linear_chunked_triton_rows.py), the fused Triton kernels being a named backend."""
    monkeypatch.setattr(functional, "_triton_installed", lambda: installed)
    cuda = torch.device("cuda")
    ce_default = "triton" if installed else "chunked"
    assert functional.resolve_backend(None, "cross_entropy", cuda) == ce_default
    assert functional.resolve_backend(None, "linear_cross_entropy", cuda) == "chunked"
    for fn in ("cross_entropy", "linear_cross_entropy"):
        assert functional.resolve_backend("chunked", fn, cuda) == "chunked"
        assert functional.resolve_backend("triton", fn, cuda) == "triton"
        assert functional.resolve_backend("triton", fn, torch.device("cpu")) == "triton"


def test_cpu_code_runs_without_triton():
    """Triton is optional: with it made unimportable, the CPU defaults (whatever backend they
    are) run, and xentkit's Triton module is never imported."""
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # as if it were not installed\n"
        "import torch, xentkit\n"
        "x, t = torch.randn(4, 6, requires_grad=True), torch.tensor([0, 5, -100, 2])\n"
        "xentkit.cross_entropy(x, t).backward()\n"
        "xentkit.linear_cross_entropy(torch.randn(4, 3), torch.randn(6, 3), t)\n"
        "assert 'xentkit.kernels.triton' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


# The kernels compiled for an H100 (sm_90) by Triton's real compiler, down to a cubin, without a
# GPU: this catches what the interpreter lets through (globals that are not constexpr, types
# that change across loop iterations, operations a GPU lacks) and checks the tiles' shared
# memory fits. bfloat16 with every option on; a fresh process, since TRITON_INTERPRET is set
# here.
COMPILE_SCRIPT = """
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton, triton.backends, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
if "nvidia" not in triton.backends.backends:
    sys.exit(3)
from xentkit.kernels import triton as kernels

ACC_POINTERS = {"consts_ptr", "ce_ptr", "z_ptr", "lse_ptr", "grad_out_ptr", "grad_h_ptr",
                "grad_w_ptr", "grad_b_ptr"}

def arg_type(name):
    if name == "target_ptr":
        return "*i64"
    if name.endswith("_ptr"):
        return "*fp32" if name in ACC_POINTERS else "*bf16"
    return {"filter_eps": "fp32"}.get(name, "i64" if name.endswith("stride") else "i32")

options = dict(ACC=tl.float32, HAS_WEIGHT=True, HAS_SMOOTHING=True, HAS_Z=True, HAS_SOFTCAP=True)
block_m, block_v, block_d = kernels.LINEAR_TILES[2]
linear = dict(options, HAS_BIAS=True, DOT=tl.bfloat16, PRECISION="tf32", BLOCK_M=block_m,
              BLOCK_V=block_v, BLOCK_D=block_d)
kernels_and_constants = [
    (kernels._cross_entropy_kernel, dict(options, COMPUTE_GRAD=True, BLOCK_V=8192), 16),
    (kernels._linear_forward_kernel, linear, kernels.LINEAR_WARPS),
    (kernels._linear_backward_kernel,
     dict(linear, HAS_SMOOTHING=False, HAS_FILTER=True, GRAD_H=True, GRAD_W=True, GRAD_B=True),
     kernels.LINEAR_WARPS),
]
shared = {}
for fn, constants, warps in kernels_and_constants:
    signature = {n: "constexpr" if n in constants else arg_type(n) for n in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps})
    assert compiled.asm["cubin"]
    shared[fn.__name__] = compiled.metadata.shared
print(json.dumps(shared))
"""


def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True
    )
    if done.returncode == 3:
        pytest.skip("this Triton build has no NVIDIA backend")
    assert done.returncode == 0, done.stderr[-3000:]
    shared = json.loads(done.stdout.splitlines()[-1])
    assert len(shared) == 3
    assert max(shared.values()) <= 227 * 1024  # an H100 block's shared memory
