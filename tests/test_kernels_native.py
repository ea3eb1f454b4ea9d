"""The C row kernel (xentkit.kernels.native) against the float64 reference and PyTorch, at the
sizes where its blocks and vector tails matter, and its build: cached, and a clean fallback to
the torch kernel where no compiler works.

The option space at small sizes runs in tests/test_kernels_chunked.py (mode "native").
"""

from __future__ import annotations

import ctypes
import itertools
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import xentkit
from xentkit import reference
from xentkit.kernels import chunked, native

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler here")

# Sizes around the kernel's vector width (16) and block (1024 classes).
CLASSES = (1, 15, 16, 17, 1023, 1024, 1025, 2500)


def reference_rows(logits, target, weight, smooth, p, t, e, z):
    """Float64 row maxima, sums of exponentials, smoothing sums and gradient of
    chunked._fused_rows (no softcap)."""
    x = logits.double()
    row_max = x.amax(-1, keepdim=True)
    shift = torch.where(row_max == float("-inf"), 0.0, row_max)
    sum_exp = (x - shift).exp().sum(-1, keepdim=True)
    w = torch.ones(x.shape[-1], dtype=torch.float64) if weight is None else weight.double()
    smooth_sum = ((x - shift) * w).sum(-1) if smooth else None
    lse = shift + sum_exp.log()
    coef = p.double().unsqueeze(1) + (0 if z is None else z.double().unsqueeze(1) * lse)
    grad = (x - shift).exp() / sum_exp * coef
    grad[torch.arange(x.shape[0]), target] -= t.double()
    if e is not None:
        grad -= e.double().unsqueeze(1) * w
    return row_max.squeeze(1), sum_exp.squeeze(1), smooth_sum, grad


@settings(deadline=None, max_examples=40)
@given(
    m=st.integers(0, 6),
    v=st.sampled_from(CLASSES),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    weighted=st.booleans(),
    smooth=st.booleans(),
    z=st.booleans(),
    out=st.sampled_from(["none", "buffer", "inplace"]),
    scale=st.sampled_from([1.0, 30.0]),
)
def test_rows_match_the_float64_reference(m, v, dtype, weighted, smooth, z, out, scale):
    check_rows(m, v, dtype, weighted, smooth, z, out, scale)


def check_rows(m, v, dtype, weighted, smooth, z, out, scale):
    """native.fused_rows on random rows against reference_rows."""
    gen = torch.Generator().manual_seed(m * 7919 + v)
    logits = (torch.randn(m, v, generator=gen) * scale).to(dtype)
    target = torch.randint(0, v, (m,), generator=gen)
    weight = torch.rand(v, generator=gen) if weighted else None
    p, t = torch.rand(m, generator=gen), torch.rand(m, generator=gen)
    e = torch.rand(m, generator=gen) * 0.1 if smooth else None
    zc = torch.rand(m, generator=gen) * 0.01 if z else None
    expected = reference_rows(logits, target, weight, smooth, p, t, e, zc)
    given_logits = logits.clone()
    dest = {"none": None, "buffer": torch.empty_like(logits), "inplace": given_logits}[out]
    row_max, sum_exp, smooth_sum = native.fused_rows(
        given_logits, target, weight, smooth, p, t, e, zc, dest
    )
    torch.testing.assert_close(row_max.double(), expected[0])
    torch.testing.assert_close(sum_exp.double(), expected[1], rtol=2e-6, atol=0)
    if smooth:
        torch.testing.assert_close(smooth_sum.double(), expected[2], rtol=1e-5, atol=1e-3)
    else:
        assert smooth_sum is None
    if dest is None:
        assert torch.equal(given_logits, logits)
        return
    # float32: within a few units in the last place; bfloat16: rounded once, like PyTorch
    rtol, atol = (2e-6, 1e-7) if dtype == torch.float32 else (4e-3, 1e-4)
    torch.testing.assert_close(dest.double(), expected[3], rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out", ["none", "inplace"])
def test_blocks_far_over_or_under_the_maximum_so_far(dtype, out):
    """Each block is shifted by the row's maximum so far: rows whose maximum climbs by more
    than the kernel's AHEAD (32) from block to block, falls from it by far more than exp's
    range, starts with blocks all -inf, or is -inf but for one logit in its last block."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(5, 4100, generator=gen)
    logits[0] += torch.arange(4100) // 1024 * 40.0  # every block redone, shifted by its own
    logits[1, 1024:] -= 1000.0  # blocks whose exponentials underflow to 0
    logits[2, :2048] = float("-inf")  # a first finite maximum in the third block
    logits[3, :] = float("-inf")
    logits[3, 4099] = -500.0
    logits[4, 2048:] += 31.0  # just under AHEAD: shifted by the maximum so far
    logits = logits.to(dtype)
    target = torch.tensor([4000, 5, 3000, 4099, 2100])
    p, t = torch.rand(5, generator=gen), torch.rand(5, generator=gen)
    expected = reference_rows(logits, target, None, False, p, t, None, None)
    given = logits.clone()
    row_max, sum_exp, _ = native.fused_rows(
        given, target, None, False, p, t, None, None, given if out == "inplace" else None
    )
    torch.testing.assert_close(row_max.double(), expected[0])
    torch.testing.assert_close(sum_exp.double(), expected[1], rtol=2e-6, atol=0)
    if out == "inplace":
        rtol, atol = (2e-6, 1e-7) if dtype == torch.float32 else (4e-3, 1e-4)
        torch.testing.assert_close(given.double(), expected[3], rtol=rtol, atol=atol)


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="builds without AVX-512 on x86")
def test_the_portable_code_as_built_for_cpus_without_avx512(tmp_path, monkeypatch):
    """The generic-vector steps that AVX-512 builds replace by the CPU's own instructions."""
    monkeypatch.setenv("XENTKIT_CACHE_DIR", str(tmp_path))
    flags = (*native.FLAGS, "-mno-avx512f")
    portable = ctypes.CDLL(str(native._build(native._compiler(), flags)))
    portable.xentkit_rows.restype = None
    monkeypatch.setattr(native, "_library", portable)
    for m, v, dtype, out in itertools.product(
        (3,), (17, 1025, 2500), (torch.float32, torch.bfloat16), ("none", "buffer", "inplace")
    ):
        check_rows(m, v, dtype, v > 1000, v > 1000, True, out, 30.0)
    test_blocks_far_over_or_under_the_maximum_so_far(torch.bfloat16, "inplace")
    test_special_values_as_torch()


def test_special_values_as_torch():
    inf, nan = float("inf"), float("nan")
    logits = torch.randn(5, 2049)
    logits[0, :] = -inf  # a whole row -inf
    logits[1, 1024:] = -inf  # whole blocks -inf
    logits[2, 7] = inf
    logits[3, 2048] = nan  # in the last block's tail
    logits[4, ::3] = -inf
    target = torch.tensor([3, 5, 7, 9, 1])
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(dtype)
        with torch.no_grad():
            ours = xentkit.cross_entropy(x, target, reduction="none")
        theirs = F.cross_entropy(x, target, reduction="none")  # in the logits' dtype, as ours
        torch.testing.assert_close(ours, theirs, equal_nan=True)
        leaf = x.clone().requires_grad_()
        xentkit.cross_entropy(leaf[1:], target[1:]).backward()
        torch_leaf = x.float().clone().requires_grad_()
        F.cross_entropy(torch_leaf[1:], target[1:]).backward()
        torch.testing.assert_close(
            leaf.grad.float(), torch_leaf.grad, equal_nan=True, rtol=1e-2, atol=1e-5
        )


def test_cross_entropy_uses_the_c_kernel_and_matches_torch(monkeypatch):
    calls = []
    rows = native.fused_rows
    monkeypatch.setattr(native, "fused_rows", lambda *a: calls.append(1) or rows(*a))
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 4099, generator=gen) * 4
    target = torch.randint(0, 4099, (300,), generator=gen)
    target[::7] = -100
    weight = torch.rand(4099, generator=gen)
    options = dict(weight=weight, label_smoothing=0.1)
    ours, theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    xentkit.cross_entropy(ours, target, **options).backward()
    F.cross_entropy(theirs, target, **options).backward()
    assert calls
    truth = logits.double().requires_grad_()
    F.cross_entropy(truth, target, weight.double(), label_smoothing=0.1).backward()
    err_ours = (ours.grad.double() - truth.grad).abs().max()
    err_torch = (theirs.grad.double() - truth.grad).abs().max()
    assert err_ours <= 2 * err_torch + 1e-9


def test_inplace_backward_in_bfloat16_rounds_once():
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(64, 3000, generator=gen) * 3).bfloat16()
    target = torch.randint(0, 3000, (64,), generator=gen)
    leaf = logits.clone().requires_grad_()
    xentkit.cross_entropy(leaf, target, inplace_backward=True).backward()
    truth = logits.double().requires_grad_()
    F.cross_entropy(truth, target).backward()
    # every entry is the float64 gradient rounded to bfloat16, give or take one unit
    torch.testing.assert_close(leaf.grad.double(), truth.grad, rtol=2**-8, atol=1e-9)


@pytest.mark.parametrize("threads", [1, 2])
def test_any_thread_count(threads):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        logits, target = torch.randn(33, 1500), torch.randint(0, 1500, (33,))
        grad = torch.empty_like(logits)
        ones = torch.ones(33)
        native.fused_rows(logits, target, None, False, ones, ones, None, None, grad)
    finally:
        torch.set_num_threads(saved)
    expected = torch.softmax(logits.double(), -1)
    expected[torch.arange(33), target] -= 1
    torch.testing.assert_close(grad.double(), expected, rtol=2e-6, atol=1e-7)


def test_the_build_is_cached_per_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("XENTKIT_CACHE_DIR", str(tmp_path))
    compiler = native._compiler()
    first = native._build(compiler)
    assert first.parent == tmp_path and first.exists()
    stamp = first.stat().st_mtime_ns
    assert native._build(compiler) == first and first.stat().st_mtime_ns == stamp


def test_without_a_compiler_it_warns_once_and_uses_the_torch_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("XENTKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(native, "_library", None)
    with pytest.warns(RuntimeWarning, match="XENTKIT_NO_NATIVE=1"):
        assert native.library() is None
    assert native.library() is None  # no second try, no second warning
    logits, target = torch.randn(4, 300), torch.randint(0, 300, (4,))
    loss = xentkit.cross_entropy(logits, target)
    torch.testing.assert_close(loss.double(), reference.cross_entropy(logits.double(), target))


def test_turned_off_runs_the_torch_kernel(monkeypatch):
    monkeypatch.setattr(native, "fused_rows", None)  # would fail if called
    native.set_enabled(False)
    try:
        logits, target = torch.randn(4, 300), torch.randint(0, 300, (4,))
        loss = xentkit.cross_entropy(logits, target)
    finally:
        native.set_enabled(True)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target))


def test_compiled_caller_runs_it_fullgraph():
    logits, target = torch.randn(16, 2000), torch.randint(0, 2000, (16,))

    @torch.compile(fullgraph=True)
    def step(x):
        return xentkit.cross_entropy(x, target, label_smoothing=0.1)

    leaf = logits.clone().requires_grad_()
    step(leaf).backward()
    torch_leaf = logits.clone().requires_grad_()
    F.cross_entropy(torch_leaf, target, label_smoothing=0.1).backward()
    torch.testing.assert_close(leaf.grad, torch_leaf.grad)
    assert chunked.compile_enabled()


@pytest.mark.parametrize("width", [2, 16, 40])  # a tail only, one whole vector, both
def test_exponentials_are_accurate_over_the_whole_range(width):
    """softmax of rows [0, d, d, ...] for d from -85 to 0: each exp(d) within a few ulp."""
    d = torch.linspace(-85.0, 0.0, 20001)
    logits = torch.cat([torch.zeros(len(d), 1), d.unsqueeze(1).expand(-1, width - 1)], 1)
    rows, target = len(d), torch.zeros(len(d), dtype=torch.long)
    grad = torch.empty_like(logits)
    ones, zeros = torch.ones(rows), torch.zeros(rows)
    _, sum_exp, _ = native.fused_rows(logits, target, None, False, ones, zeros, None, None, grad)
    exact = torch.exp(d.double())
    # the sums add up to 40 float32 terms; the ratio g_1 / g_0 = exp(d) / exp(0) isolates the
    # exponential (and the two roundings of the gradient's scaling)
    torch.testing.assert_close(sum_exp.double(), 1 + (width - 1) * exact, rtol=1e-6, atol=0)
    ratio = grad[:, 1].double() / grad[:, 0].double()
    torch.testing.assert_close(ratio, exact, rtol=3e-7, atol=0)


def test_a_failed_compilation_leaves_it_on(monkeypatch):
    """Compiling the torch kernel failed for a call the C kernel does not take (a softcap):
    that call and later ones like it run eagerly, the calls it takes stay on the C kernel."""

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(chunked, "_compiled", {chunked._fused_rows: broken})
    monkeypatch.setattr(chunked, "COMPILE_MIN_ELEMENTS", 0)
    logits, target = torch.randn(8, 300), torch.randint(0, 300, (8,))
    try:
        with pytest.warns(RuntimeWarning, match="using the eager kernel for every call"):
            capped = xentkit.cross_entropy(logits, target, softcap=5.0)
        assert not chunked.compile_enabled()
        calls = []
        fused_rows = native.fused_rows
        monkeypatch.setattr(native, "fused_rows", lambda *a: calls.append(1) or fused_rows(*a))
        loss = xentkit.cross_entropy(logits, target)
    finally:
        chunked.set_compile(True)
    assert calls == [1]
    torch.testing.assert_close(loss, F.cross_entropy(logits, target))
    capped_logits = 5.0 * torch.tanh(logits / 5.0)
    torch.testing.assert_close(capped, F.cross_entropy(capped_logits, target))
