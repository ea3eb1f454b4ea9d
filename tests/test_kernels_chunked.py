"""The fused chunked cross-entropy kernel against the float64 reference and against PyTorch.

The option space is covered on the eager kernel (cheap to run); the compiled kernel, which
shares the row function and costs a compilation per dtype and set of options, is held to the
same reference on a few fixed sets of options.
"""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import xentkit
from xentkit import reference
from xentkit.kernels import _memory, chunked, native

DTYPES = (torch.float32, torch.float64, torch.bfloat16)
REDUCTIONS = ("none", "mean", "sum")
# Tolerances (rtol, atol) of a result in `dtype` against the float64 reference: the loss terms
# are accumulated in float32 for every dtype but float64; gradients are rounded to `dtype`.
LOSS_TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1e-5, 1e-6),
}
GRAD_TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1.6e-2, 1e-3),
}
# How far beyond PyTorch's own error (vs float64) a result may be, relative to its magnitude.
FLOOR = {torch.float64: 1e-13, torch.float32: 1e-6, torch.bfloat16: 4e-3}


@contextlib.contextmanager
def kernel_mode(mode: str, chunk_rows: int | None = None, num_classes: int = 1):
    """Run the row passes one way: ``"eager"`` (over chunks of ``chunk_rows``), ``"compiled"``
    (inductor, whatever the input's size) or ``"native"`` (the C kernel where it applies, the
    eager one on the small inputs of these tests elsewhere)."""
    saved = chunked.compile_enabled(), chunked.EAGER_CHUNK_ELEMENTS, chunked.COMPILE_MIN_ELEMENTS
    saved_native = native.enabled()
    chunked.set_compile(mode != "eager")
    native.set_enabled(mode == "native")
    if mode == "compiled":
        chunked.COMPILE_MIN_ELEMENTS = 0
    if chunk_rows is not None:
        chunked.EAGER_CHUNK_ELEMENTS = chunk_rows * num_classes
    try:
        yield
    finally:
        chunked.set_compile(saved[0])
        native.set_enabled(saved_native)
        chunked.EAGER_CHUNK_ELEMENTS, chunked.COMPILE_MIN_ELEMENTS = saved[1:]


def close(actual, expected, tol):
    rtol, atol = tol
    torch.testing.assert_close(
        actual, expected.to(actual.dtype), rtol=rtol, atol=atol, equal_nan=True
    )


def as_accurate_as_torch(ours, theirs, truth, dtype):
    """``ours`` is no further from the float64 ``truth`` than PyTorch's ``theirs`` (twice its
    error, plus a rounding floor of the dtype), with NaN and inf in the same places."""
    ours, theirs, truth = ours.double(), theirs.double(), truth.double()
    finite = torch.isfinite(truth)
    assert torch.equal(torch.isfinite(ours), finite)
    torch.testing.assert_close(ours[~finite], truth[~finite], equal_nan=True)
    if finite.any():
        scale = truth[finite].abs().max() + 1
        err_ours = (ours - truth)[finite].abs().max()
        err_torch = (theirs - truth)[finite].abs().max()
        assert err_ours <= 2 * err_torch + FLOOR[dtype] * scale, (err_ours, err_torch)


def make_case(gen, m, v, dtype, ignore_frac=0.3, weighted=False, ignore_index=-100):
    logits = (torch.randn(m, v, generator=gen, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, v, (m,), generator=gen)
    target[torch.rand(m, generator=gen) < ignore_frac] = ignore_index
    weight = torch.rand(v, generator=gen, dtype=torch.float64).to(dtype) if weighted else None
    return logits, target, weight


def reference_loss_and_grad(logits, target, weight, ignore_index, eps, z_loss, softcap, a, b):
    """ce, z and the gradient of sum(a * ce + b * z) by autograd through the reference, in
    float64."""
    x = logits.double().requires_grad_()
    w = None if weight is None else weight.double()
    terms = reference.cross_entropy_terms(x, target, w, ignore_index, eps, z_loss, softcap)
    objective = (torch.as_tensor(a, dtype=torch.float64) * terms.ce).sum()
    objective = objective + (torch.as_tensor(b, dtype=torch.float64) * terms.z).sum()
    (grad,) = torch.autograd.grad(objective, x)
    return terms.ce.detach(), terms.z.detach(), grad


def value_and_grad(fn, logits, grad_output_seed=1):
    """``fn(leaf)`` and the gradient of ``sum(fn(leaf) * g)`` for a random ``g``."""
    leaf = logits.detach().clone().requires_grad_()
    out = fn(leaf)
    g = torch.rand(out.shape, generator=torch.Generator().manual_seed(grad_output_seed))
    (grad,) = torch.autograd.grad(out, leaf, g.to(out.dtype))
    return out.detach(), grad


def kernel_ce(weight, ignore_index, reduction, eps=0.0, z_loss=0.0, softcap=None, inplace=False):
    """The kernel as functional.cross_entropy calls it, the result cast to the input's dtype."""

    def fn(x):
        options = (weight, ignore_index, reduction, eps, z_loss, softcap, inplace)
        return chunked.cross_entropy(x, target_of[0], *options).to(x.dtype)

    return fn


target_of = [None]  # the target of kernel_ce's calls (fn takes the logits only)


options = st.fixed_dictionaries(
    {
        "m": st.integers(0, 9),
        "v": st.integers(1, 11),
        "dtype": st.sampled_from(DTYPES),
        "weighted": st.booleans(),
        "ignore_index": st.sampled_from([-100, 0, 2]),
        "eps": st.sampled_from([0.0, 0.1, 1.0]),
        "z_loss": st.sampled_from([0.0, 1e-2]),
        "softcap": st.sampled_from([None, 2.0]),
        "scales": st.sampled_from(["scalar", "rows", "tensor"]),
        "out": st.sampled_from(["new", "buffer", "inplace"]),
        "chunk_rows": st.sampled_from([1, 2, 3, 64]),
    }
)


@pytest.mark.parametrize("mode", ["eager", "native"])
@given(options)
def test_loss_and_grad_matches_reference(mode, o):
    gen = torch.Generator().manual_seed(o["m"] * 100 + o["v"])
    m, v, dtype = o["m"], o["v"], o["dtype"]
    logits, target, weight = make_case(gen, m, v, dtype, 0.3, o["weighted"], o["ignore_index"])
    if o["scales"] == "rows":
        a, b = torch.rand(m, generator=gen), torch.rand(m, generator=gen)
    elif o["scales"] == "tensor":
        a, b = torch.tensor(0.25), torch.tensor(3.0)
    else:
        a, b = 0.5, 2.0
    args = (target, weight, o["ignore_index"], o["eps"], o["z_loss"], o["softcap"])
    expected = reference_loss_and_grad(logits, *args, a, b)

    given_logits = logits.clone()
    out = {"new": None, "buffer": torch.empty_like(logits), "inplace": given_logits}[o["out"]]
    with kernel_mode(mode, o["chunk_rows"], v):
        ce, z, grad = chunked.loss_and_grad(given_logits, *args, a, b, out=out)
    acc = reference.accumulation_dtype(dtype)
    assert ce.dtype == z.dtype == acc and grad.dtype == dtype and grad.shape == (m, v)
    close(ce, expected[0], LOSS_TOL[dtype])
    close(z, expected[1], LOSS_TOL[dtype])
    close(grad, expected[2], GRAD_TOL[dtype])
    if out is not None:
        assert grad.data_ptr() == out.data_ptr()
    else:
        assert torch.equal(given_logits, logits)  # the input is left alone


@pytest.mark.parametrize("mode", ["eager", "native"])
@pytest.mark.parametrize("out", ["none", "inplace"])
def test_loss_and_grad_without_scale_computes_no_gradient(mode, out):
    logits, target, _ = make_case(torch.Generator().manual_seed(0), 5, 7, torch.float32)
    given = logits.clone()
    with kernel_mode(mode):
        ce, _, grad = chunked.loss_and_grad(
            given, target, None, -100, 0.0, 0.0, None, None, out=given if out == "inplace" else None
        )
    assert grad is None and torch.equal(given, logits)
    close(ce, reference.cross_entropy_terms(logits.double(), target).ce, LOSS_TOL[torch.float32])


@pytest.mark.parametrize("mode", ["eager", "native"])
@given(
    st.fixed_dictionaries(
        {
            "m": st.integers(0, 9),
            "v": st.integers(1, 9),
            "dtype": st.sampled_from(DTYPES),
            "weighted": st.booleans(),
            "ignore_index": st.sampled_from([-100, 1]),
            "ignore_frac": st.sampled_from([0.0, 0.3, 1.0]),
            "eps": st.sampled_from([0.0, 0.2]),
            "reduction": st.sampled_from(REDUCTIONS),
            "inplace": st.booleans(),
            "chunk_rows": st.sampled_from([1, 2, 4, 64]),
        }
    )
)
def test_cross_entropy_as_accurate_as_torch(mode, o):
    gen = torch.Generator().manual_seed(o["m"] * 100 + o["v"])
    m, v, dtype, ignore_index = o["m"], o["v"], o["dtype"], o["ignore_index"]
    logits, target, weight = make_case(
        gen, m, v, dtype, o["ignore_frac"], o["weighted"], ignore_index
    )
    target_of[0] = target
    options = dict(ignore_index=ignore_index, reduction=o["reduction"], label_smoothing=o["eps"])

    def torch_fn(x):
        w = None if weight is None else weight.to(x.dtype)
        return F.cross_entropy(x, target, w, **options)

    truth = value_and_grad(torch_fn, logits.double())
    theirs = value_and_grad(torch_fn, logits)
    with kernel_mode(mode, o["chunk_rows"], v):
        fn = kernel_ce(weight, ignore_index, o["reduction"], o["eps"], inplace=o["inplace"])
        ours = value_and_grad(fn, logits)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype
    as_accurate_as_torch(ours[0], theirs[0], truth[0], dtype)
    as_accurate_as_torch(ours[1], theirs[1], truth[1], dtype)


@pytest.mark.parametrize("mode", ["eager", "native"])
@given(
    st.fixed_dictionaries(
        {
            "m": st.integers(1, 7),
            "dtype": st.sampled_from(DTYPES),
            "weighted": st.booleans(),
            "eps": st.sampled_from([0.0, 0.1]),
            "z_loss": st.sampled_from([0.0, 1e-3, 0.5]),
            "softcap": st.sampled_from([None, 1.5, 30.0]),
            "reduction": st.sampled_from(REDUCTIONS),
        }
    )
)
def test_z_loss_and_softcap_match_reference(mode, o):
    m, dtype = o["m"], o["dtype"]
    logits, target, weight = make_case(torch.Generator().manual_seed(m), m, 6, dtype, 0.3, True)
    weight = weight if o["weighted"] else None
    target_of[0] = target
    opts = (o["eps"], o["z_loss"], o["softcap"])

    def reference_fn(x):
        w = None if weight is None else weight.double()
        return reference.cross_entropy(x, target, w, -100, o["reduction"], *opts)

    expected = value_and_grad(reference_fn, logits.double())
    with kernel_mode(mode):
        ours = value_and_grad(kernel_ce(weight, -100, o["reduction"], *opts), logits)
    # Both are in the logits' dtype (as xentkit.cross_entropy returns them).
    close(ours[0], expected[0], GRAD_TOL[dtype])
    close(ours[1], expected[1], GRAD_TOL[dtype])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_eager(reduction):
    gen = torch.Generator().manual_seed(1)
    logits, target, weight = make_case(gen, 5, 4, torch.float64, 0.3, True)
    logits.requires_grad_()

    def fn(x):
        return chunked.cross_entropy(x, target, weight, -100, reduction, 0.1, 0.01, 3.0)

    with kernel_mode("eager"):
        assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("mode", ["eager", "native"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored_and_empty_as_torch(mode, reduction):
    cases = [(torch.randn(4, 5), torch.full((4,), -100))]
    cases += [(torch.randn(0, 5), torch.empty(0, dtype=torch.long))]
    cases += [(torch.randn(2, 0), torch.full((2,), -100))]  # no classes at all
    for rows, target in cases:
        target_of[0] = target
        with kernel_mode(mode):
            ours = value_and_grad(kernel_ce(None, -100, reduction), rows)
        theirs = value_and_grad(
            lambda x, t=target: F.cross_entropy(x, t, reduction=reduction), rows
        )
        torch.testing.assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("mode", ["eager", "native"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_minus_inf_logits_as_torch(mode, eps):
    inf = float("inf")
    logits = torch.tensor([[1.0, -inf, 2.0, 0.5], [-inf, 3.0, -inf, 1.0], [0.0, 1.0, -inf, 2.0]])
    target = torch.tensor([0, 1, 2])  # the last target's logit is -inf: an infinite loss
    target_of[0] = target
    for reduction in REDUCTIONS:
        with kernel_mode(mode):
            ours = value_and_grad(kernel_ce(None, -100, reduction, eps), logits)
        theirs = value_and_grad(
            lambda x, r=reduction: F.cross_entropy(x, target, reduction=r, label_smoothing=eps),
            logits,
        )
        torch.testing.assert_close(ours, theirs, equal_nan=True)


def test_no_gradient_computed_without_requires_grad(monkeypatch):
    logits, target, _ = make_case(torch.Generator().manual_seed(0), 6, 5, torch.float32)
    buffers = []
    run_rows = chunked._run_rows

    def spy(rows_fn, logits, out, *args):
        buffers.append(out)
        return run_rows(rows_fn, logits, out, *args)

    monkeypatch.setattr(chunked, "_run_rows", spy)
    with kernel_mode("eager"):
        loss = chunked.cross_entropy(logits, target, None, -100, "mean", 0.0, 0.0, None)
        with torch.no_grad():
            chunked.cross_entropy(logits.requires_grad_(), target, None, -100, "sum", 0, 0, None)
    assert buffers == [None, None] and loss.grad_fn is None
    close(loss, reference.cross_entropy(logits.double(), target), LOSS_TOL[torch.float32])


@pytest.mark.parametrize("mode", ["eager", "native"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_inplace_backward_overwrites_logits_with_the_gradient(mode, reduction):
    logits, target, weight = make_case(torch.Generator().manual_seed(3), 7, 6, torch.float32)
    target_of[0] = target
    with kernel_mode(mode):
        expected = value_and_grad(kernel_ce(weight, -100, reduction, 0.1, 1e-3, 5.0), logits)
        leaf = logits.clone().requires_grad_()
        loss = chunked.cross_entropy(leaf, target, weight, -100, reduction, 0.1, 1e-3, 5.0, True)
        g = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1))
        loss.backward(g)
    torch.testing.assert_close(loss.detach(), expected[0])
    torch.testing.assert_close(leaf.grad, expected[1])
    torch.testing.assert_close(leaf.detach(), expected[1])  # the logits hold the gradient


def test_backward_twice_with_retain_graph():
    logits, target, _ = make_case(torch.Generator().manual_seed(4), 6, 5, torch.float32)
    leaf = logits.requires_grad_()
    with kernel_mode("eager"):
        loss = chunked.cross_entropy(leaf, target, None, -100, "none", 0.0, 0.0, None)
    g = torch.rand(6)
    (first,) = torch.autograd.grad(loss, leaf, g, retain_graph=True)
    (second,) = torch.autograd.grad(loss, leaf, g)
    torch.testing.assert_close(first, second)


def test_differentiating_twice_raises_a_clear_error():
    logits, target, _ = make_case(torch.Generator().manual_seed(4), 6, 5, torch.float64)
    leaf = logits.requires_grad_()
    with kernel_mode("eager"):
        loss = chunked.cross_entropy(leaf, target, None, -100, "sum", 0.0, 0.0, None)
    with pytest.raises(RuntimeError, match=r"no second derivative.*backend='reference'"):
        torch.autograd.grad(loss, leaf, create_graph=True)


def test_weight_requiring_grad_runs_the_reference():
    gen = torch.Generator().manual_seed(4)
    logits, target, weight = make_case(gen, 6, 5, torch.float64, 0.3, weighted=True)
    inputs = (logits.requires_grad_(), (weight + 0.1).requires_grad_())

    def fn(x, w):
        options = dict(label_smoothing=0.1, z_loss=1e-2, softcap=3.0, backend="chunked")
        return xentkit.cross_entropy(x, target, w, **options)

    with kernel_mode("eager"):
        assert torch.autograd.gradcheck(fn, inputs)


def test_huge_page_gradient_buffer(monkeypatch):
    """A large gradient buffer (here: any) is mapped memory that lives as long as the tensor."""
    monkeypatch.setattr(_memory, "HUGE_PAGE_MIN_BYTES", 0)
    logits, target, _ = make_case(torch.Generator().manual_seed(5), 6, 5, torch.float32)
    target_of[0] = target
    with kernel_mode("eager"):
        ours = value_and_grad(kernel_ce(None, -100, "mean"), logits)
    gc.collect()
    theirs = value_and_grad(lambda x: F.cross_entropy(x, target), logits)
    torch.testing.assert_close(ours, theirs)


def test_falls_back_to_eager_when_compiling_fails(monkeypatch):
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    logits, target, _ = make_case(torch.Generator().manual_seed(5), 6, 5, torch.float32)
    monkeypatch.setattr(chunked, "_compiled", {chunked._fused_rows: broken})
    with kernel_mode("compiled"), pytest.warns(RuntimeWarning, match="using the eager kernel"):
        ce, _, grad = chunked.loss_and_grad(logits, target, None, -100, 0.0, 0.0, None, 1.0)
        assert not chunked.compile_enabled()
    expected = reference_loss_and_grad(logits, target, None, -100, 0.0, 0.0, None, 1.0, 1.0)
    close(ce, expected[0], LOSS_TOL[torch.float32])
    close(grad, expected[2], GRAD_TOL[torch.float32])


def test_a_failed_in_place_compilation_keeps_the_compiled_kernel_for_other_calls(monkeypatch):
    def broken(*args):
        raise RuntimeError("inductor cannot alias")

    logits, target, _ = make_case(torch.Generator().manual_seed(6), 6, 5, torch.float32)
    expected = reference_loss_and_grad(logits, target, None, -100, 0.0, 0.0, None, 1.0, 1.0)
    monkeypatch.setattr(chunked, "_compiled", {chunked._fused_rows: broken})
    monkeypatch.setattr(chunked, "_inplace_compile_failed", False)
    with kernel_mode("compiled"), pytest.warns(RuntimeWarning, match="over the logits"):
        ce, _, grad = chunked.loss_and_grad(
            logits, target, None, -100, 0.0, 0.0, None, 1.0, out=logits
        )
        assert chunked.compile_enabled() and chunked._inplace_compile_failed
    close(ce, expected[0], LOSS_TOL[torch.float32])
    close(grad, expected[2], GRAD_TOL[torch.float32])


# The compiled kernel: one compilation per dtype and set of options, reused for every shape.

COMPILED_CASES = {
    "plain": dict(weighted=False, eps=0.0, z_loss=0.0, softcap=None),
    "all options": dict(weighted=True, eps=0.1, z_loss=1e-3, softcap=4.0),
}


def compiled_or_skip():
    if not chunked.compile_enabled():
        pytest.skip("torch.compile's C++ backend is unavailable here")


@pytest.mark.parametrize(
    ("case", "dtype", "out"),
    [
        ("plain", torch.float32, "new"),
        ("plain", torch.float32, "inplace"),
        ("plain", torch.bfloat16, "new"),
        ("all options", torch.float32, "new"),
    ],
)
def test_compiled_matches_reference_without_recompiling(case, dtype, out):
    o = COMPILED_CASES[case]
    gen = torch.Generator().manual_seed(6)
    graphs = []
    for m, v in ((37, 50), (8, 50), (21, 13)):
        logits, target, weight = make_case(gen, m, v, dtype, 0.3, o["weighted"])
        args = (target, weight, -100, o["eps"], o["z_loss"], o["softcap"])
        expected = reference_loss_and_grad(logits, *args, 0.5, 2.0)
        given_logits = logits.clone()
        with kernel_mode("compiled"):
            dest = given_logits if out == "inplace" else None
            ce, z, grad = chunked.loss_and_grad(given_logits, *args, 0.5, 2.0, out=dest)
            compiled_or_skip()
        close(ce, expected[0], LOSS_TOL[dtype])
        close(z, expected[1], LOSS_TOL[dtype])
        close(grad, expected[2], GRAD_TOL[dtype])
        if out == "inplace":
            assert grad.data_ptr() == given_logits.data_ptr()
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[2] == graphs[0], "a new batch size or class count recompiled"


def test_compiled_without_gradient():
    logits, target, _ = make_case(torch.Generator().manual_seed(7), 9, 17, torch.float32)
    with kernel_mode("compiled"):
        ce, _, grad = chunked.loss_and_grad(logits, target, None, -100, 0.0, 0.0, None, None)
        compiled_or_skip()
    assert grad is None
    close(ce, reference.cross_entropy_terms(logits.double(), target).ce, LOSS_TOL[torch.float32])


@pytest.mark.parametrize("inplace", [False, True])
def test_torch_compile_of_a_caller(inplace):
    """A compiled function calling the kernel traces through it in one graph."""
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(24, 8, generator=gen, requires_grad=True)
    head = torch.randn(50, 8, generator=gen, requires_grad=True)
    target = torch.randint(0, 50, (24,), generator=gen)
    target[:3] = -100

    def step(hidden, head, target):
        logits = hidden @ head.T
        return chunked.cross_entropy(logits, target, None, -100, "mean", 0.0, 0.0, None, inplace)

    expected = F.cross_entropy(hidden @ head.T, target)
    expected_grads = torch.autograd.grad(expected, (hidden, head))
    with kernel_mode("compiled"):
        loss = torch.compile(step, fullgraph=True)(hidden, head, target)
        grads = torch.autograd.grad(loss, (hidden, head))
        compiled_or_skip()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grads, expected_grads)
