"""``linear_log_probs``: per-token log p(target) and entropy from the LM head, fused
(``backend="chunked"``) and exact (``backend="reference"``), against the unfused torch
expression ``log_softmax(F.linear(h, w, b) / T).gather(-1, t)`` and ``-(p * log p).sum(-1)``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_memory_does_not_grow_with_tokens
from hypothesis import given, settings
from hypothesis import strategies as st

import xentkit

TOLERANCES = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
}


def make_inputs(shape, d, v, dtype=torch.float64, bias=True, ignored=(), seed=0):
    """Hidden states ``(*shape, d)``, weight, bias and targets; parameters require grad."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, d, dtype=dtype, generator=gen).requires_grad_()
    weight = (torch.randn(v, d, dtype=dtype, generator=gen) / d**0.5).requires_grad_()
    b = torch.randn(v, dtype=dtype, generator=gen).requires_grad_() if bias else None
    target = torch.randint(v, shape, generator=gen)
    target.view(-1)[list(ignored)] = -100
    return hidden, weight, b, target


def torch_unfused(hidden, weight, target, bias=None, temperature=1.0, ignore_index=-100):
    """The expression the issue names, in plain torch (0 where the target is ignored)."""
    log_probs = torch.log_softmax(F.linear(hidden, weight, bias) / temperature, -1)
    counted = target != ignore_index
    safe = torch.where(counted, target, 0).unsqueeze(-1)
    log_prob = log_probs.gather(-1, safe).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return torch.where(counted, log_prob, 0.0), torch.where(counted, entropy, 0.0)


def fused(hidden, weight, target, bias=None, **kwargs):
    return xentkit.linear_log_probs(
        hidden, weight, target, bias, return_entropy=True, backend="chunked", **kwargs
    )


def exact(hidden, weight, target, bias=None, **kwargs):
    return xentkit.linear_log_probs(
        hidden, weight, target, bias, return_entropy=True, backend="reference", **kwargs
    )


def values_and_grads(fn, hidden, weight, bias, target, seed=1, **kwargs):
    """Both outputs and the gradients of ``sum(a * log_prob + b * entropy)`` for random
    per-token ``a`` and ``b``, with respect to every parameter."""
    params = [p for p in (hidden, weight, bias) if p is not None]
    log_prob, entropy = fn(hidden, weight, target, bias, **kwargs)
    # Drawn in float64 whatever the dtype, so that every dtype gets the same grad_outputs.
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(log_prob.shape, generator=gen, dtype=torch.float64).to(log_prob.dtype)
    b = torch.randn(entropy.shape, generator=gen, dtype=torch.float64).to(entropy.dtype)
    grads = torch.autograd.grad((log_prob, entropy), params, (a, b), allow_unused=True)
    return (log_prob.detach(), entropy.detach()), grads


def assert_same(got, want, dtype=torch.float64):
    tol = TOLERANCES[dtype]
    (values, grads), (want_values, want_grads) = got, want
    for value, want_value in zip(values, want_values, strict=True):
        torch.testing.assert_close(value, want_value, **tol)
    for grad, want_grad in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(grad, want_grad, **tol)


@settings(max_examples=20, deadline=None)
@given(
    shape=st.sampled_from([(0,), (1,), (7,), (12,), (2, 5), (3, 4)]),
    v=st.integers(1, 9),
    d=st.integers(1, 5),
    chunk_size=st.one_of(st.none(), st.integers(1, 13)),
    temperature=st.sampled_from([1.0, 0.7, 2.5]),
    bias=st.booleans(),
    ignored=st.sets(st.integers(0, 11)),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_matches_torch_and_reference(shape, v, d, chunk_size, temperature, bias, ignored, dtype):
    numel = torch.Size(shape).numel()
    ignored = ignored & set(range(numel))
    hidden, weight, b, target = make_inputs(shape, d, v, dtype, bias, ignored)
    kwargs = {"temperature": temperature}
    got = values_and_grads(fused, hidden, weight, b, target, chunk_size=chunk_size, **kwargs)
    assert got[0][0].shape == target.shape and got[0][0].dtype == dtype
    assert_same(got, values_and_grads(torch_unfused, hidden, weight, b, target, **kwargs), dtype)
    assert_same(got, values_and_grads(exact, hidden, weight, b, target, **kwargs), dtype)
    for value in got[0]:
        assert not value.view(-1)[list(ignored)].any()


@pytest.mark.parametrize("slice_bytes", [1, 100])
def test_row_passes_in_slices_of_rows(monkeypatch, slice_bytes):
    """Each chunk's row passes run slice by slice of rows (``row_stats.row_slices``): with
    slices of one row, or of a few rows that do not divide the chunk, nothing changes."""
    from xentkit.kernels import row_stats

    monkeypatch.setattr(row_stats, "SLICE_BYTES", slice_bytes)
    hidden, weight, b, target = make_inputs((11,), 5, 9, ignored={3})
    got = values_and_grads(fused, hidden, weight, b, target, chunk_size=6, temperature=0.7)
    assert_same(got, values_and_grads(exact, hidden, weight, b, target, temperature=0.7))


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 64])
def test_ignored_tokens_get_no_gradient(chunk_size):
    hidden, weight, bias, target = make_inputs((10,), 4, 6, ignored=[0, 3, 4, 9])
    _, (grad_hidden, *_) = values_and_grads(
        fused, hidden, weight, bias, target, chunk_size=chunk_size
    )
    assert not grad_hidden[[0, 3, 4, 9]].any()
    assert grad_hidden[[1, 2, 5]].all()


def test_log_prob_only_and_one_output_used():
    """Without the entropy, and with a gradient through one output only."""
    hidden, weight, bias, target = make_inputs((9,), 4, 6, ignored=[2])
    kwargs = {"temperature": 0.8, "chunk_size": 4}
    log_prob = xentkit.linear_log_probs(hidden, weight, target, bias, backend="chunked", **kwargs)
    want_log_prob, want_entropy = torch_unfused(hidden, weight, target, bias, temperature=0.8)
    torch.testing.assert_close(log_prob, want_log_prob)
    params = (hidden, weight, bias)
    _, entropy = fused(hidden, weight, target, bias, **kwargs)
    for got, want in ((log_prob, want_log_prob), (entropy, want_entropy)):
        got_grads = torch.autograd.grad(got.sum(), params)
        want_grads = torch.autograd.grad(want.sum(), params, retain_graph=True)
        for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(got_grad, want_grad)


@pytest.mark.parametrize("return_entropy", [False, True])
def test_gradcheck(return_entropy):
    hidden, weight, bias, target = make_inputs((2, 3), 3, 5, ignored=[1])

    def fn(h, w, b):
        return xentkit.linear_log_probs(
            h, w, target, b, temperature=1.7, return_entropy=return_entropy, chunk_size=2
        )

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))
    assert torch.autograd.gradgradcheck(
        lambda h, w, b: xentkit.linear_log_probs(
            h, w, target, b, temperature=1.7, return_entropy=return_entropy, backend="reference"
        ),
        (hidden, weight, bias),
    )


def test_bfloat16_against_float64():
    hidden, weight, bias, target = make_inputs((48,), 32, 80, ignored=range(0, 48, 5))
    want = values_and_grads(fused, hidden, weight, bias, target, temperature=0.9)
    low = [t.detach().bfloat16().requires_grad_() for t in (hidden, weight, bias)]
    got = values_and_grads(fused, *low[:2], low[2], target, temperature=0.9, chunk_size=16)
    assert got[0][0].dtype == torch.bfloat16
    for value, want_value in zip(got[0], want[0], strict=True):
        torch.testing.assert_close(value.double(), want_value, atol=5e-2, rtol=2e-2)
    for grad, want_grad in zip(got[1], want[1], strict=True):
        # The gradients sum over tokens or classes: compare against their scale.
        scale = want_grad.abs().max()
        torch.testing.assert_close(grad.double() / scale, want_grad / scale, atol=2e-2, rtol=0)


def test_autocast_runs_the_head_in_bfloat16_and_returns_float32():
    hidden, weight, bias, target = make_inputs((6,), 8, 10, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_prob, entropy = fused(hidden, weight, target, bias)
    assert log_prob.dtype == entropy.dtype == torch.float32
    low = [t.detach().bfloat16() for t in (hidden, weight, bias)]
    want = fused(low[0], low[1], target, low[2])
    torch.testing.assert_close(log_prob, want[0].float(), atol=1e-2, rtol=1e-2)
    (log_prob + entropy).sum().backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32


def test_masked_classes_with_infinite_bias():
    """A masked class (-inf logit) has p = 0 and adds 0 log 0 = 0 to the entropy, not NaN."""
    hidden, weight, bias, target = make_inputs((9,), 4, 8)
    with torch.no_grad():
        bias[[1, 5]] = float("-inf")
    target[(target == 1) | (target == 5)] = 0
    got = values_and_grads(fused, hidden, weight, bias, target, chunk_size=4)
    assert_same(got, values_and_grads(exact, hidden, weight, bias, target))
    assert all(t.isfinite().all() for t in (*got[0], *got[1][:2]))


def test_torch_compile_fullgraph_dynamic_does_not_recompile():
    head = torch.nn.Linear(8, 11)

    def step(hidden, target):
        log_prob, entropy = xentkit.linear_log_probs(
            torch.tanh(hidden), head.weight, target, head.bias, temperature=0.7,
            return_entropy=True, chunk_size=3,
        )  # fmt: skip
        return log_prob, entropy

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for n, patch in ((6, {}), (9, {"error_on_recompile": True})):
        hidden = torch.randn(n, 8, requires_grad=True)
        target = torch.randint(11, (n,))
        target[1] = -100
        with torch._dynamo.config.patch(**patch):
            got = compiled(hidden, target)
            got_grads = torch.autograd.grad(got, (hidden, head.weight, head.bias), got)
        want = step(hidden, target)
        want_grads = torch.autograd.grad(want, (hidden, head.weight, head.bias), want)
        for g, w in zip((*got, *got_grads), (*want, *want_grads), strict=True):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"temperature": 0.0}, ValueError, "temperature must be a positive finite float"),
        ({"temperature": -1.0}, ValueError, "temperature must be a positive finite float"),
        ({"temperature": float("nan")}, ValueError, "temperature must be a positive"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
        ({"backend": "cuda"}, ValueError, "backend must be one of"),
        ({"process_group": object()}, RuntimeError, "torch.distributed is not initialised"),
    ],
)
def test_bad_options(kwargs, error, match):
    hidden, weight, bias, target = make_inputs((5,), 3, 4)
    with pytest.raises(error, match=match):
        xentkit.linear_log_probs(hidden, weight, target, bias, **kwargs)


def test_bad_inputs():
    hidden, weight, _, target = make_inputs((5,), 3, 4)
    with pytest.raises(ValueError, match="must share D"):
        xentkit.linear_log_probs(hidden, weight.T, target)
    with pytest.raises(ValueError, match="Expected target of shape"):
        xentkit.linear_log_probs(hidden, weight, target[:4])
    with pytest.raises(IndexError, match="Target 4 is out of bounds"):
        xentkit.linear_log_probs(hidden, weight, torch.tensor([0, 1, 4, 2, 3]))
    with pytest.raises(RuntimeError, match="weight dtype Float must match input dtype Double"):
        xentkit.linear_log_probs(hidden, weight.float(), target)


def test_memory_does_not_grow_with_tokens():
    assert_memory_does_not_grow_with_tokens(
        "    log_prob, entropy = xentkit.linear_log_probs(\n"
        "        hidden, weight, target, return_entropy=True, backend=backend, chunk_size=256\n"
        "    )\n"
        "    (log_prob.sum() + entropy.sum()).backward()"
    )


def test_benchmark_rows_compute_the_same_gradients():
    from benchmarks import bench_log_probs
    from benchmarks.harness import Shape

    grads = {}
    for provider in ("xentkit", "torch"):
        torch.manual_seed(0)
        grads[provider] = bench_log_probs.build(provider, Shape(9, 4, 16), torch.float64, "").step()
    for got, want in zip(grads["xentkit"], grads["torch"], strict=True):
        torch.testing.assert_close(got, want)
