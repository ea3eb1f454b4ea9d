"""``linear_distillation_loss``: TRL's generalized JSD between a student's and a teacher's LM
heads (plus an optional hard cross entropy), fused (``backend="chunked"``) and exact
(``backend="reference"``), against the unfused torch expression TRL writes
(``F.linear`` + ``log_softmax`` + ``F.kl_div(..., log_target=True)``)."""

from __future__ import annotations

import importlib.util
import itertools
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import RecordOps, assert_memory_does_not_grow_with_tokens
from hypothesis import given, settings
from hypothesis import strategies as st

import xentkit
from xentkit import reference

TOLERANCES = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-9},
    torch.float32: {"atol": 2e-5, "rtol": 2e-4},
}
BETAS = [0.0, 1.0, 0.5, 0.3]


def make_inputs(shape, d, v, dtype=torch.float64, bias=True, ignored=(), seed=0, d_teacher=None):
    """Student ``(hidden, weight, bias)``, teacher ``(hidden, weight, bias)`` (hidden size
    ``d_teacher``, default ``d + 1``: a teacher's D differs from the student's) and targets;
    the student's tensors require grad."""
    gen = torch.Generator().manual_seed(seed)
    d_teacher = d + 1 if d_teacher is None else d_teacher

    def head(dim, grad):
        hidden = torch.randn(*shape, dim, dtype=dtype, generator=gen)
        weight = torch.randn(v, dim, dtype=dtype, generator=gen) / max(dim, 1) ** 0.5
        b = torch.randn(v, dtype=dtype, generator=gen) if bias else None
        return tuple(None if t is None else t.requires_grad_(grad) for t in (hidden, weight, b))

    student, teacher = head(d, True), head(d_teacher, False)
    target = torch.randint(v, shape, generator=gen)
    target.view(-1)[list(ignored)] = -100
    return student, teacher, target


def torch_unfused(student, teacher, target, beta=0.0, temperature=1.0, hard_weight=0.0,
                  ignore_index=-100, reduction="mean"):  # fmt: skip
    """TRL's ``GKDTrainer.generalized_jsd_loss`` on the heads' logits, per token, plus the hard
    ``F.cross_entropy`` of the raw student logits; masked and reduced as the spec says."""
    student_logits = F.linear(student[0], student[1], student[2])
    teacher_logits = F.linear(teacher[0], teacher[1], teacher[2]).detach()
    s = F.log_softmax(student_logits / temperature, -1)
    t = F.log_softmax(teacher_logits / temperature, -1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype)
        mixture = torch.logsumexp(torch.stack([s + torch.log(1 - b), t + torch.log(b)]), 0)
        kl_teacher = F.kl_div(mixture, t, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture, s, reduction="none", log_target=True)
        jsd = beta * kl_teacher + (1 - beta) * kl_student
    soft = jsd.sum(-1)
    if target is None:
        counted = torch.ones(soft.shape, dtype=torch.bool)
        loss = soft
    else:
        counted = target != ignore_index
        hard = F.cross_entropy(
            student_logits.flatten(0, -2), target.flatten(), ignore_index=ignore_index,
            reduction="none",
        ).reshape(target.shape)  # fmt: skip
        loss = (1 - hard_weight) * soft + hard_weight * hard
        loss = torch.where(counted, loss, 0.0)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / counted.sum()


def xentkit_loss(student, teacher, target, backend="chunked", **kwargs):
    return xentkit.linear_distillation_loss(
        student[0], student[1], teacher[0], teacher[1], target, student_bias=student[2],
        teacher_bias=teacher[2], backend=backend, **kwargs,
    )  # fmt: skip


def exact(student, teacher, target, **kwargs):
    return xentkit_loss(student, teacher, target, backend="reference", **kwargs)


def value_and_grads(fn, student, teacher, target, seed=1, **kwargs):
    """The loss and the gradients of ``sum(g * loss)`` (random ``g`` of the loss's shape) with
    respect to the student's tensors."""
    params = [p for p in student if p is not None]
    loss = fn(student, teacher, target, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(loss.shape, generator=gen, dtype=torch.float64).to(loss.dtype)
    grads = torch.autograd.grad(loss, params, g)
    return loss.detach(), grads


def assert_same(got, want, dtype=torch.float64, **tol):
    tol = tol or TOLERANCES[dtype]
    torch.testing.assert_close(got[0], want[0], equal_nan=True, **tol)
    for grad, want_grad in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(grad, want_grad, **tol)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    ("temperature", "hard_weight", "bias"), [(1.0, 0.0, True), (2.0, 0.0, False), (0.7, 0.4, True)]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_torch_and_reference(beta, reduction, temperature, hard_weight, bias, dtype):
    student, teacher, target = make_inputs((3, 5), 6, 11, dtype, bias, ignored=[0, 4, 7])
    kwargs = {"beta": beta, "temperature": temperature, "hard_weight": hard_weight}
    kwargs["reduction"] = reduction
    got = value_and_grads(xentkit_loss, student, teacher, target, chunk_size=2, **kwargs)
    assert got[0].dtype == dtype
    assert got[0].shape == (target.shape if reduction == "none" else ())
    assert_same(got, value_and_grads(torch_unfused, student, teacher, target, **kwargs), dtype)
    assert_same(got, value_and_grads(exact, student, teacher, target, **kwargs), dtype)
    if reduction == "none":
        assert not got[0].view(-1)[[0, 4, 7]].any()


@pytest.mark.triton
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(("temperature", "hard_weight"), [(1.0, 0.0), (0.7, 0.4)])
def test_triton_rows_match_the_reference(beta, reduction, temperature, hard_weight):
    """backend="triton": the same chunks, each chunk's row passes one Triton kernel (here
    through the interpreter, TRITON_INTERPRET=1 from conftest.py)."""
    pytest.importorskip("triton")
    student, teacher, target = make_inputs((3, 5), 6, 11, torch.float64, True, ignored=[0, 4])
    kwargs = {"beta": beta, "temperature": temperature, "hard_weight": hard_weight}
    kwargs["reduction"] = reduction
    got = value_and_grads(
        xentkit_loss, student, teacher, target, backend="triton", chunk_size=4, **kwargs
    )
    assert_same(got, value_and_grads(exact, student, teacher, target, **kwargs))
    if hard_weight == 0:  # every token counts
        got = value_and_grads(xentkit_loss, student, teacher, None, backend="triton", **kwargs)
        assert_same(got, value_and_grads(exact, student, teacher, None, **kwargs))


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_without_target_every_token_counts(beta, reduction):
    student, teacher, _ = make_inputs((2, 4), 5, 9, bias=False)
    kwargs = {"beta": beta, "temperature": 1.3, "reduction": reduction}
    got = value_and_grads(xentkit_loss, student, teacher, None, chunk_size=3, **kwargs)
    assert_same(got, value_and_grads(torch_unfused, student, teacher, None, **kwargs))
    assert_same(got, value_and_grads(exact, student, teacher, None, **kwargs))


@pytest.mark.parametrize("beta", BETAS)
def test_logit_gradient_formulas(beta):
    """The closed forms the kernel writes (forward KL: p - q; reverse KL: p (r - D); JSD:
    (1 - beta) p (u - K)) hold to autograd of the float64 reference, through 1 / T."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(6, 7, dtype=torch.float64, generator=gen).requires_grad_()
    zt = torch.randn(6, 7, dtype=torch.float64, generator=gen)
    temperature = 1.7
    loss = reference.distillation_terms(z, zt, None, beta, temperature).loss
    (want,) = torch.autograd.grad(loss.sum(), z)
    log_p = torch.log_softmax(z.detach() / temperature, -1)
    log_q = torch.log_softmax(zt / temperature, -1)
    p, q = log_p.exp(), log_q.exp()
    if beta == 0:
        grad = p - q
    elif beta == 1:
        r = log_p - log_q
        grad = p * (r - (p * r).sum(-1, keepdim=True))
    else:
        log_m = torch.log(beta * q + (1 - beta) * p)
        u = log_p - log_m
        grad = (1 - beta) * p * (u - (p * u).sum(-1, keepdim=True))
    torch.testing.assert_close(grad / temperature, want, atol=1e-12, rtol=1e-10)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.sampled_from([(0,), (1,), (7,), (2, 5), (3, 4)]),
    v=st.integers(1, 9),
    d=st.integers(1, 5),
    d_teacher=st.integers(1, 5),
    chunk_size=st.one_of(st.none(), st.integers(1, 13)),
    beta=st.sampled_from([0.0, 1.0, 0.5, 0.1, 0.9]),
    temperature=st.sampled_from([1.0, 0.6, 3.0]),
    hard_weight=st.sampled_from([0.0, 0.25, 1.0]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    bias=st.booleans(),
    ignored=st.sets(st.integers(0, 11)),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_hypothesis_matches_reference(
    shape, v, d, d_teacher, chunk_size, beta, temperature, hard_weight, reduction, bias,
    ignored, dtype,
):  # fmt: skip
    numel = torch.Size(shape).numel()
    ignored = ignored & set(range(numel))
    student, teacher, target = make_inputs(shape, d, v, dtype, bias, ignored, d_teacher=d_teacher)
    kwargs = {"beta": beta, "temperature": temperature, "hard_weight": hard_weight}
    kwargs["reduction"] = reduction
    got = value_and_grads(xentkit_loss, student, teacher, target, chunk_size=chunk_size, **kwargs)
    want = value_and_grads(exact, student, teacher, target, **kwargs)
    assert_same(got, want, dtype)
    if reduction == "mean" and len(ignored) == numel:  # 0 / 0, as torch's cross_entropy
        assert got[0].isnan()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("hard_weight", [0.0, 0.4])
def test_loss_backward_makes_no_pass_over_the_gradients(dtype, reduction, hard_weight):
    """``loss.backward()`` (grad_output 1) returns the forward's gradients of the reduced loss as
    they are: no multiplication over the V x D weight gradient; any other grad_output scales
    them."""
    student, teacher, target = make_inputs((6,), 3, 5, dtype, ignored=[1])
    kwargs = {"beta": 0.5, "temperature": 2.0, "hard_weight": hard_weight, "reduction": reduction}
    params = student
    for grad_output in (1.0, 2.5):
        loss = xentkit_loss(student, teacher, target, **kwargs)
        with RecordOps() as recorded:
            grads = torch.autograd.grad(loss, params, torch.tensor(grad_output, dtype=loss.dtype))
        assert recorded.multiplied((5, 3)) == (grad_output != 1)
        want = torch_unfused(student, teacher, target, **kwargs) * grad_output
        for got, expected in zip(grads, torch.autograd.grad(want, params), strict=True):
            torch.testing.assert_close(got, expected, **TOLERANCES[dtype])


def test_all_ignored():
    """A mean over no counted token is NaN (as F.cross_entropy's); the gradients are 0."""
    student, teacher, target = make_inputs((4,), 3, 5, ignored=range(4))
    for reduction, value in (("mean", math.nan), ("sum", 0.0)):
        loss, grads = value_and_grads(xentkit_loss, student, teacher, target, reduction=reduction)
        torch.testing.assert_close(loss, torch.tensor(value, dtype=loss.dtype), equal_nan=True)
        assert not any(g.any() for g in grads)
    want = F.cross_entropy(torch.randn(4, 5), target)
    assert want.isnan()


def test_teacher_gets_no_gradient():
    student, teacher, target = make_inputs((6,), 4, 7, ignored=[2])
    teacher = tuple(t.detach().requires_grad_() for t in teacher)
    for backend in ("chunked", "reference"):
        for reduction in ("mean", "none"):
            loss = xentkit_loss(student, teacher, target, backend, beta=0.5, reduction=reduction)
            loss.sum().backward()
            assert all(t.grad is None for t in teacher)
            assert student[0].grad is not None and student[1].grad is not None


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("beta", BETAS)
def test_gradcheck(beta, reduction):
    student, teacher, target = make_inputs((2, 3), 3, 5, ignored=[1])

    def fn(h, w, b):
        return xentkit.linear_distillation_loss(
            h, w, teacher[0], teacher[1], target, student_bias=b, teacher_bias=teacher[2],
            beta=beta, temperature=1.7, hard_weight=0.3, reduction=reduction, chunk_size=2,
        )  # fmt: skip

    assert torch.autograd.gradcheck(fn, student)


def test_bfloat16_against_float64():
    student, teacher, target = make_inputs((48,), 32, 80, ignored=range(0, 48, 5))
    kwargs = {"beta": 0.5, "temperature": 0.9, "hard_weight": 0.2}
    want = value_and_grads(xentkit_loss, student, teacher, target, **kwargs)
    low = [tuple(t.detach().bfloat16() for t in model) for model in (student, teacher)]
    low[0] = tuple(t.requires_grad_() for t in low[0])
    got = value_and_grads(xentkit_loss, *low, target, chunk_size=16, **kwargs)
    assert got[0].dtype == torch.bfloat16
    torch.testing.assert_close(got[0].double(), want[0], atol=2e-2, rtol=2e-2)
    for grad, want_grad in zip(got[1], want[1], strict=True):
        # The gradients sum over tokens or classes: compare against their scale.
        scale = want_grad.abs().max()
        torch.testing.assert_close(grad.double() / scale, want_grad / scale, atol=3e-2, rtol=0)


def test_teacher_in_another_dtype():
    """A bfloat16 teacher beside a float32 student: the teacher's logits in bfloat16, the rest
    in float32, as the reference computes it."""
    student, teacher, target = make_inputs((9,), 6, 10, torch.float32, ignored=[3])
    teacher = tuple(t.bfloat16() for t in teacher)
    kwargs = {"beta": 0.3, "temperature": 1.5}
    got = value_and_grads(xentkit_loss, student, teacher, target, chunk_size=4, **kwargs)
    assert_same(got, value_and_grads(exact, student, teacher, target, **kwargs), torch.float32)


def test_autocast_runs_both_heads_in_bfloat16_and_returns_float32():
    student, teacher, target = make_inputs((6,), 8, 10, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = xentkit_loss(student, teacher, target, beta=0.5)
    assert loss.dtype == torch.float32
    low = [tuple(t.detach().bfloat16() for t in m) for m in (student, teacher)]
    want = xentkit_loss(*low, target, beta=0.5)
    torch.testing.assert_close(loss, want.float(), atol=1e-2, rtol=1e-2)
    loss.backward()
    assert student[0].grad.dtype == student[1].grad.dtype == torch.float32


def test_masked_classes_in_both_heads():
    """A class masked in both heads (-inf bias) adds 0, not NaN, to every regime."""
    student, teacher, target = make_inputs((9,), 4, 8)
    with torch.no_grad():
        for b in (student[2], teacher[2]):
            b[[1, 5]] = float("-inf")
    target[(target == 1) | (target == 5)] = 0
    backends = ["chunked"] + (["triton"] if importlib.util.find_spec("triton") else [])
    for beta, backend in itertools.product(BETAS, backends):
        kwargs = {"beta": beta, "hard_weight": 0.5, "backend": backend}
        got = value_and_grads(xentkit_loss, student, teacher, target, chunk_size=4, **kwargs)
        kwargs.pop("backend")
        assert_same(got, value_and_grads(exact, student, teacher, target, **kwargs))
        assert got[0].isfinite() and all(g[:2].isfinite().all() for g in got[1][:2])


def test_module_form():
    student, teacher, target = make_inputs((2, 3), 4, 6, ignored=[2])
    module = xentkit.nn.LinearDistillationLoss(beta=0.3, temperature=2.0, hard_weight=0.1)
    got = module(student[0], student[1], teacher[0], teacher[1], target, student[2], teacher[2])
    want = torch_unfused(student, teacher, target, beta=0.3, temperature=2.0, hard_weight=0.1)
    torch.testing.assert_close(got, want)


def test_torch_compile_fullgraph_dynamic_does_not_recompile():
    student_head, teacher_head = torch.nn.Linear(8, 11), torch.nn.Linear(6, 11)
    teacher_head.requires_grad_(False)

    def step(hidden, teacher_hidden, target):
        return xentkit.linear_distillation_loss(
            torch.tanh(hidden), student_head.weight, teacher_hidden, teacher_head.weight, target,
            student_bias=student_head.bias, teacher_bias=teacher_head.bias, beta=0.4,
            temperature=0.7, hard_weight=0.2, chunk_size=3,
        )  # fmt: skip

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    params = (student_head.weight, student_head.bias)
    # Token counts unlike every other size here (dynamo would share one symbol between them).
    for n, patch in ((7, {}), (10, {"error_on_recompile": True})):
        hidden = torch.randn(n, 8, requires_grad=True)
        teacher_hidden = torch.randn(n, 6)
        target = torch.randint(11, (n,))
        target[1] = -100
        with torch._dynamo.config.patch(**patch):
            got = compiled(hidden, teacher_hidden, target)
            got_grads = torch.autograd.grad(got, (hidden, *params))
        want = step(hidden, teacher_hidden, target)
        want_grads = torch.autograd.grad(want, (hidden, *params))
        for g, w in zip((got, *got_grads), (want, *want_grads), strict=True):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"beta": -0.1}, ValueError, r"beta must be a float in \[0, 1\]"),
        ({"beta": 1.5}, ValueError, r"beta must be a float in \[0, 1\]"),
        ({"beta": float("nan")}, ValueError, "beta must be a float"),
        ({"temperature": 0.0}, ValueError, "temperature must be a positive finite float"),
        ({"temperature": -2.0}, ValueError, "temperature must be a positive finite float"),
        ({"hard_weight": 1.2}, ValueError, r"hard_weight must be a float in \[0, 1\]"),
        ({"hard_weight": -0.5}, ValueError, r"hard_weight must be a float in \[0, 1\]"),
        ({"reduction": "batchmean"}, ValueError, "is not a valid value for reduction"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
        ({"backend": "cuda"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_options(kwargs, error, match):
    student, teacher, target = make_inputs((5,), 3, 4)
    with pytest.raises(error, match=match):
        xentkit_loss(student, teacher, target, **{"backend": None, **kwargs})


def test_hard_weight_needs_target():
    student, teacher, _ = make_inputs((5,), 3, 4)
    with pytest.raises(ValueError, match=r"hard_weight=0\.5 needs target"):
        xentkit_loss(student, teacher, None, hard_weight=0.5)


def test_bad_inputs():
    (h, w, _), (th, tw, _), target = make_inputs((5,), 3, 4, bias=False)

    def call(*args, **kwargs):
        return xentkit.linear_distillation_loss(*args, **kwargs)

    with pytest.raises(ValueError, match=r"student_input .* and student_weight .* must share D"):
        call(h, w.T, th, tw, target)
    with pytest.raises(ValueError, match=r"teacher_input .* and teacher_weight .* must share D"):
        call(h, w, th, w, target)
    with pytest.raises(ValueError, match="must share the vocabulary V"):
        call(h, w, th, tw[:3], target)
    with pytest.raises(ValueError, match="must hold the same tokens"):
        call(h, w, th[:4], tw, target)
    with pytest.raises(ValueError, match="Expected target of shape"):
        call(h, w, th, tw, target[:4])
    with pytest.raises(RuntimeError, match="expected target dtype to be Long or Byte"):
        call(h, w, th, tw, target.float())
    with pytest.raises(IndexError, match="Target 4 is out of bounds"):
        call(h, w, th, tw, torch.tensor([0, 1, 4, 2, 3]))
    with pytest.raises(RuntimeError, match="student_weight dtype Float must match student_input"):
        call(h, w.float(), th, tw, target)
    with pytest.raises(RuntimeError, match="teacher_weight dtype Float must match teacher_input"):
        call(h, w, th, tw.float(), target)
    with pytest.raises(RuntimeError, match=r"student_bias must have shape \(4,\)"):
        call(h, w, th, tw, target, student_bias=torch.zeros(3, dtype=h.dtype))
    with pytest.raises(TypeError, match="teacher_input must be a floating-point tensor"):
        call(h, w, target, tw, target)


def test_memory_does_not_grow_with_tokens():
    assert_memory_does_not_grow_with_tokens(
        "    loss = xentkit.linear_distillation_loss(\n"
        "        hidden, weight, hidden.detach().flip(1), weight.detach().flip(0), target,\n"
        "        beta=0.5, hard_weight=0.1, backend=backend, chunk_size=256,\n"
        "    )\n"
        "    loss.backward()"
    )


def test_the_readme_block_runs():
    readme = Path(__file__).resolve().parents[1] / "README.md"
    section = readme.read_text().split("## Distillation from the LM head\n", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["hidden"].grad.abs().sum() > 0


def test_benchmark_rows_compute_the_same_gradients():
    from benchmarks import bench_distill
    from benchmarks.harness import Shape

    grads = {}
    for provider in ("xentkit", "torch"):
        torch.manual_seed(0)
        grads[provider] = bench_distill.build(provider, Shape(9, 4, 16), torch.float64, "").step()
    for got, want in zip(grads["xentkit"], grads["torch"], strict=True):
        torch.testing.assert_close(got, want)
