"""Parity of xentkit's functions with torch.nn.functional: values and gradients, every layout
and option, float32 and float64 (and half types against the float64 reference)."""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, index_target, layout_shape, value_and_grads
from hypothesis import given
from hypothesis import strategies as st

import xentkit
from xentkit import reference

DTYPES = [torch.float32, torch.float64]
LAYOUTS = ["C", "NC", "NCd", "NCdd"]
REDUCTIONS = ["none", "mean", "sum"]


def _ce_case(data, target_kind: str):
    layout = data.draw(st.sampled_from(LAYOUTS), "layout")
    n = data.draw(st.integers(1, 5), "n")
    c = data.draw(st.integers(1, 7), "c")
    d = data.draw(st.integers(1, 4), "d")
    dtype = data.draw(st.sampled_from(DTYPES), "dtype")
    seed = data.draw(st.integers(0, 2**16), "seed")
    gen = torch.Generator().manual_seed(seed)
    shape = layout_shape(layout, n, c, d)
    scale = data.draw(st.sampled_from([1.0, 5.0, 30.0]), "scale")
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    cdim = 0 if layout == "C" else 1
    if target_kind == "index":
        ignore_index = data.draw(st.sampled_from([-100, 0, c - 1]), "ignore_index")
        frac = data.draw(st.sampled_from([0.0, 0.3, 1.0]), "ignore_frac")
        target = index_target(shape, ignore_index, frac, gen)
    else:
        ignore_index = -100
        if target_kind == "onehot":
            idx = index_target(shape, ignore_index, 0.0, gen)
            target = F.one_hot(idx, c).movedim(-1, cdim).to(dtype)
        else:
            target = torch.softmax(torch.randn(shape, generator=gen, dtype=dtype), cdim)
    weight = None
    if data.draw(st.booleans(), "weighted"):
        weight = torch.rand(c, generator=gen, dtype=torch.float64).to(dtype) + 0.1
    options = dict(
        weight=weight,
        ignore_index=ignore_index,
        reduction=data.draw(st.sampled_from(REDUCTIONS), "reduction"),
        label_smoothing=data.draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]), "label_smoothing"),
    )
    return x, target, options, dtype


@pytest.mark.parametrize("target_kind", ["index", "onehot", "probs"])
@given(data=st.data())
def test_cross_entropy_matches_torch(target_kind, data):
    x, target, options, _ = _ce_case(data, target_kind)
    got, got_grad = value_and_grads(lambda x: xentkit.cross_entropy(x, target, **options), x)
    want, want_grad = value_and_grads(lambda x: F.cross_entropy(x, target, **options), x)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert_close(got, want)
    assert_close(got_grad[0], want_grad[0])


@given(data=st.data())
def test_nll_loss_matches_torch(data):
    x, target, options, _ = _ce_case(data, "index")
    del options["label_smoothing"]
    logp = torch.log_softmax(x, 0 if x.dim() == 1 else 1)
    got, got_grad = value_and_grads(lambda p: xentkit.nll_loss(p, target, **options), logp)
    want, want_grad = value_and_grads(lambda p: F.nll_loss(p, target, **options), logp)
    assert got.shape == want.shape
    assert_close(got, want)
    assert_close(got_grad[0], want_grad[0])


@given(
    shape=st.lists(st.integers(1, 5), min_size=0, max_size=4),
    dim_seed=st.integers(0, 100),
    dtype=st.sampled_from(DTYPES),
    fn=st.sampled_from(["softmax", "log_softmax"]),
)
def test_softmax_matches_torch(shape, dim_seed, dtype, fn):
    x = torch.randn(shape, dtype=dtype) * 10
    dim = dim_seed % max(x.dim(), 1)
    ours, theirs = getattr(xentkit, fn), getattr(F, fn)
    g = torch.randn(shape, dtype=dtype)
    got, got_grad = value_and_grads(lambda x: ours(x, dim), x, grad_output=g)
    want, want_grad = value_and_grads(lambda x: theirs(x, dim), x, grad_output=g)
    assert_close(got, want)
    assert_close(got_grad[0], want_grad[0])


@pytest.mark.parametrize("ndim", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_softmax_implicit_dim_warns_and_matches(ndim, fn):
    x = torch.randn((3,) * ndim)
    with pytest.warns(UserWarning, match="Implicit dimension"):
        got = getattr(xentkit, fn)(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = getattr(F, fn)(x)
    assert_close(got, want)


@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_softmax_dtype_argument_casts_first(fn):
    x = torch.randn(4, 6).half()
    got = getattr(xentkit, fn)(x, 1, dtype=torch.float64)
    want = getattr(F, fn)(x, 1, dtype=torch.float64)
    assert got.dtype == torch.float64
    assert_close(got, want)


def _bce_case(data, logits: bool):
    shape = tuple(data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=3), "shape"))
    dtype = data.draw(st.sampled_from(DTYPES), "dtype")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), "seed"))
    if logits:
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 8).to(dtype)
    else:
        x = torch.rand(shape, generator=gen, dtype=dtype) * 0.98 + 0.01
    if data.draw(st.booleans(), "hard_targets"):
        y = torch.randint(0, 2, shape, generator=gen).to(dtype)
    else:
        y = torch.rand(shape, generator=gen, dtype=dtype)
    options = {"reduction": data.draw(st.sampled_from(REDUCTIONS), "reduction")}
    weight_shape = data.draw(st.sampled_from([None, shape, shape[-1:]]), "weight_shape")
    if weight_shape is not None:
        options["weight"] = torch.rand(weight_shape, generator=gen, dtype=dtype) + 0.1
    if logits and data.draw(st.booleans(), "pos_weighted"):
        options["pos_weight"] = torch.rand(shape[-1:], generator=gen, dtype=dtype) * 3
    return x, y, options


@given(data=st.data())
def test_binary_cross_entropy_matches_torch(data):
    x, y, options = _bce_case(data, logits=False)
    got, got_grad = value_and_grads(
        lambda x, y: xentkit.binary_cross_entropy(x, y, **options), x, y
    )
    want, want_grad = value_and_grads(lambda x, y: F.binary_cross_entropy(x, y, **options), x, y)
    assert_close(got, want)
    for a, b in zip(got_grad, want_grad, strict=True):
        assert_close(a, b)


@given(data=st.data())
def test_binary_cross_entropy_with_logits_matches_torch(data):
    x, y, options = _bce_case(data, logits=True)
    fn = xentkit.binary_cross_entropy_with_logits
    got, got_grad = value_and_grads(lambda x, y: fn(x, y, **options), x, y)
    want, want_grad = value_and_grads(
        lambda x, y: F.binary_cross_entropy_with_logits(x, y, **options), x, y
    )
    assert_close(got, want)
    for a, b in zip(got_grad, want_grad, strict=True):
        assert_close(a, b)


def test_binary_cross_entropy_at_exact_zero_and_one_matches_torch():
    """log is floored at -100 and the gradient at torch's 1e-12, so p in {0, 1} stays finite."""
    p = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    got, got_grad = value_and_grads(lambda p: xentkit.binary_cross_entropy(p, y, None), p)
    want, want_grad = value_and_grads(lambda p: F.binary_cross_entropy(p, y, None), p)
    assert_close(got, want)
    # torch's floor is the float32 value of 1e-12, hence the looser relative tolerance
    torch.testing.assert_close(got_grad[0], want_grad[0], rtol=1e-8, atol=0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", ["cross_entropy", "nll_loss"])
def test_empty_and_all_ignored_batches_match_torch(loss, reduction):
    for x, t in [
        (torch.randn(0, 4), torch.zeros(0, dtype=torch.long)),
        (torch.randn(3, 4), torch.full((3,), -100)),
        (torch.randn(2, 4, 0), torch.zeros(2, 0, dtype=torch.long)),
    ]:
        got = getattr(xentkit, loss)(x, t, reduction=reduction)
        want = getattr(F, loss)(x, t, reduction=reduction)
        assert got.shape == want.shape
        assert_close(got, want)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_extreme_logits_match_torch(label_smoothing, reduction):
    x = torch.tensor(
        [
            [1e4, -1e4, 0.0, 3.0],
            [-1e4, -1e4, -1e4, -1e4],
            [float("-inf"), 2.0, 1.0, 0.0],
            [float("-inf"), float("-inf"), 5.0, float("-inf")],
            [float("-inf")] * 4,
            [float("-inf")] * 4,
            [float("inf"), 2.0, 1.0, 0.0],  # +inf: inf - inf is NaN, as in torch
        ]
    )
    t = torch.tensor([0, 3, 1, 2, 1, -100, 1])
    kwargs = dict(reduction=reduction, label_smoothing=label_smoothing)
    for tt in (t, t.clone().fill_(2)):
        got, got_grad = value_and_grads(partial(xentkit.cross_entropy, target=tt, **kwargs), x)
        want, want_grad = value_and_grads(partial(F.cross_entropy, target=tt, **kwargs), x)
        assert_close(got, want)
        assert_close(got_grad[0], want_grad[0])
    for fn in ("softmax", "log_softmax"):
        assert_close(getattr(xentkit, fn)(x, 1), getattr(F, fn)(x, 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("target_kind", ["index", "probs"])
def test_half_precision_at_least_as_accurate_as_torch(dtype, target_kind):
    gen = torch.Generator().manual_seed(1)
    x64 = torch.randn(64, 50, 3, generator=gen, dtype=torch.float64) * 4
    if target_kind == "index":
        t = torch.randint(0, 50, (64, 3), generator=gen)
        t[::7] = -100
        t_half, options = t, dict(label_smoothing=0.1)
    else:
        t = torch.softmax(torch.randn(64, 50, 3, generator=gen, dtype=torch.float64), 1)
        t_half, options = t.to(dtype), {}
    x = x64.to(dtype)
    truth, truth_grad = value_and_grads(
        lambda x: F.cross_entropy(
            x, t_half.to(torch.float64) if t.is_floating_point() else t, **options
        ),
        x.to(torch.float64),
    )
    got, got_grad = value_and_grads(lambda x: xentkit.cross_entropy(x, t_half, **options), x)
    want, want_grad = value_and_grads(lambda x: F.cross_entropy(x, t_half, **options), x)
    assert got.dtype == want.dtype == dtype
    ulp = torch.finfo(dtype).eps * truth.abs()
    assert (got.double() - truth).abs() <= (want.double() - truth).abs() + ulp
    err_ours = (got_grad[0].double() - truth_grad[0]).abs().max()
    err_torch = (want_grad[0].double() - truth_grad[0]).abs().max()
    assert err_ours <= err_torch + torch.finfo(dtype).eps * truth_grad[0].abs().max()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_z_loss_and_softcap_follow_their_formulas(reduction):
    x = torch.randn(6, 9, dtype=torch.float64) * 20
    t = torch.tensor([0, 3, -100, 8, 2, 2])
    w = torch.rand(9, dtype=torch.float64) + 0.5
    got = xentkit.cross_entropy(x, t, w, reduction=reduction, z_loss=1e-3, softcap=15.0)
    capped = 15.0 * torch.tanh(x / 15.0)
    ce = F.cross_entropy(capped, t, w, reduction=reduction)
    z = torch.where(t != -100, 1e-3 * torch.logsumexp(capped, 1) ** 2, 0.0)
    z = {"none": z, "sum": z.sum(), "mean": z.sum() / (t != -100).sum()}[reduction]
    assert_close(got, ce + z)


@pytest.mark.parametrize("size_average", [None, True, False])
@pytest.mark.parametrize("reduce", [None, True, False])
def test_legacy_size_average_and_reduce(size_average, reduce):
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    legacy = dict(size_average=size_average, reduce=reduce)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ours, theirs, args in [
            (xentkit.cross_entropy, F.cross_entropy, (x, t)),
            (xentkit.nll_loss, F.nll_loss, (x, t)),
            (xentkit.binary_cross_entropy, F.binary_cross_entropy, (x.sigmoid(), x.sigmoid())),
            (xentkit.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, (x, x)),
        ]:
            assert_close(ours(*args, **legacy), theirs(*args, **legacy))


def test_positional_arguments_as_torch():
    x, t, w = torch.randn(4, 5), torch.tensor([0, 1, 2, -1]), torch.rand(5)
    assert_close(
        xentkit.cross_entropy(x, t, w, None, -1, None, "sum", 0.1),
        F.cross_entropy(x, t, w, None, -1, None, "sum", 0.1),
    )
    assert_close(
        xentkit.nll_loss(x, t, w, None, -1, None, "sum"), F.nll_loss(x, t, w, None, -1, None, "sum")
    )
    p = torch.rand(4, 5)
    assert_close(
        xentkit.binary_cross_entropy_with_logits(x, p, w, None, None, "sum", w),
        F.binary_cross_entropy_with_logits(x, p, w, None, None, "sum", w),
    )


def test_uint8_targets_and_unbatched_size_one_target():
    x = torch.randn(3, 5)
    t = torch.tensor([0, 4, 2], dtype=torch.uint8)
    assert_close(xentkit.cross_entropy(x, t), F.cross_entropy(x, t))
    assert_close(xentkit.cross_entropy(x[0], t[:1]), F.cross_entropy(x[0], t[:1]))


def test_non_contiguous_input():
    x = torch.randn(5, 4).T  # (4, 5) non-contiguous
    t = torch.tensor([0, 4, 2, 1])
    got, got_grad = value_and_grads(lambda x: xentkit.cross_entropy(x, t), x)
    want, want_grad = value_and_grads(lambda x: F.cross_entropy(x, t), x)
    assert_close(got, want)
    assert_close(got_grad[0], want_grad[0])


def test_linear_cross_entropy_reference_matches_unfused_torch():
    h = torch.randn(2, 3, 8, dtype=torch.float64)
    w = torch.randn(11, 8, dtype=torch.float64)
    b = torch.randn(11, dtype=torch.float64)
    t = torch.randint(0, 11, (2, 3))
    t[0, 1] = -100
    for reduction in REDUCTIONS:

        def ours(h, w, b, reduction=reduction):
            return xentkit.linear_cross_entropy(
                h, w, t, b, reduction=reduction, label_smoothing=0.1, backend="reference"
            )

        def theirs(h, w, b, reduction=reduction):
            loss = F.cross_entropy(
                F.linear(h, w, b).flatten(0, -2),
                t.flatten(),
                reduction=reduction,
                label_smoothing=0.1,
            )
            return loss.reshape(t.shape) if reduction == "none" else loss

        got, got_grads = value_and_grads(ours, h, w, b)
        want, want_grads = value_and_grads(theirs, h, w, b)
        assert_close(got, want)
        for a, bb in zip(got_grads, want_grads, strict=True):
            assert_close(a, bb)


def test_reference_holds_no_call_to_the_functions_it_stands_for():
    source = Path(reference.__file__).read_text()
    for name in ("F.cross_entropy", "F.nll_loss", "F.binary_cross_entropy", "torch.logsumexp"):
        assert name not in source


def test_probability_targets_promote_dtypes_like_torch():
    x, y = torch.randn(3, 5), torch.rand(3, 5)
    for target, weight in [(y.double(), None), (y, torch.ones(5).double()), (y.half(), None)]:
        got = xentkit.cross_entropy(x, target, weight)
        want = F.cross_entropy(x, target, weight)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_zero_classes_all_ignored_matches_torch():
    x, t = torch.zeros(2, 0, requires_grad=True), torch.tensor([-100, -100])
    assert_close(xentkit.cross_entropy(x, t), F.cross_entropy(x, t))
    assert_close(xentkit.nll_loss(x, t, reduction="sum"), F.nll_loss(x, t, reduction="sum"))
