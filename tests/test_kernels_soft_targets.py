"""Probability (soft) targets in the fused chunked kernel: values and gradients of the float64
reference and of PyTorch, eager and compiled, and one N x V buffer of extra memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from test_kernels_chunked import GRAD_TOL, LOSS_TOL, close, kernel_mode

import xentkit
from xentkit import reference

REDUCTIONS = ("none", "mean", "sum")


def _problem(seed: int, rows: int, classes: int, dtype, scale: float = 3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, classes, generator=gen, dtype=torch.float64) * scale).to(dtype)
    probs = torch.softmax(torch.randn(rows, classes, generator=gen, dtype=torch.float64), 1)
    grad_out = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.5
    return logits, probs.to(dtype), grad_out


def _value_and_grad(fn, logits, grad_out):
    leaf = logits.detach().clone().requires_grad_()
    loss = fn(leaf)
    g = grad_out.to(loss.dtype) if loss.dim() else torch.ones((), dtype=loss.dtype)
    (grad,) = torch.autograd.grad(loss, leaf, g)
    return loss.detach(), grad


@given(
    rows=st.integers(0, 9),
    classes=st.integers(1, 12),
    reduction=st.sampled_from(REDUCTIONS),
    label_smoothing=st.sampled_from([0.0, 0.3]),
    z_loss=st.sampled_from([0.0, 0.05]),
    softcap=st.sampled_from([None, 2.5]),
    weighted=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    chunk_rows=st.sampled_from([1, 4, 100]),
    seed=st.integers(0, 2**16),
)
def test_eager_kernel_matches_the_reference(
    rows, classes, reduction, label_smoothing, z_loss, softcap, weighted, dtype, chunk_rows, seed
):
    logits, probs, grad_out = _problem(seed, rows, classes, dtype)
    weight = torch.rand(classes, dtype=torch.float64) + 0.5 if weighted else None
    options = dict(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss)
    options.update(softcap=softcap, weight=None if weight is None else weight.to(dtype))
    with kernel_mode(False, chunk_rows, classes):
        loss, grad = _value_and_grad(
            lambda x: xentkit.cross_entropy(x, probs, backend="chunked", **options),
            logits,
            grad_out,
        )
    exact_options = {**options, "weight": weight}
    want_loss, want_grad = _value_and_grad(
        lambda x: xentkit.cross_entropy(x, probs.double(), backend="reference", **exact_options),
        logits.double(),
        grad_out,
    )
    close(loss.double(), want_loss, LOSS_TOL[dtype] if dtype != torch.bfloat16 else (1e-2, 1e-2))
    close(grad, want_grad, GRAD_TOL[dtype])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_compiled_kernel_matches_torch(reduction):
    logits, probs, grad_out = _problem(1, 40, 33, torch.float32)
    logits[3, 4], probs[5] = float("-inf"), torch.nn.functional.one_hot(torch.tensor(2), 33)
    options = dict(reduction=reduction, label_smoothing=0.1, weight=torch.rand(33))
    with kernel_mode(True):
        ours = lambda x: xentkit.cross_entropy(x, probs, **options)  # noqa: E731
        got = _value_and_grad(ours, logits, grad_out)
    want = _value_and_grad(lambda x: F.cross_entropy(x, probs, **options), logits, grad_out)
    torch.testing.assert_close(got, want, equal_nan=True)


def test_non_finite_logits_as_torch():
    logits, probs, grad_out = _problem(2, 4, 5, torch.float32)
    logits[0, 2], logits[1, 3], logits[2, 1] = float("-inf"), float("-inf"), float("inf")
    probs[1] = torch.tensor([0.0, 0, 1, 0, 0])
    for compiled in (False, True):
        with kernel_mode(compiled):
            got = _value_and_grad(
                lambda x: xentkit.cross_entropy(x, probs, reduction="none"), logits, grad_out
            )
        want = _value_and_grad(
            lambda x: F.cross_entropy(x, probs, reduction="none"), logits, grad_out
        )
        torch.testing.assert_close(got, want, equal_nan=True)


def test_gradcheck():
    logits, probs, _ = _problem(3, 5, 6, torch.float64)
    for reduction in REDUCTIONS:
        options = dict(reduction=reduction, label_smoothing=0.2, z_loss=0.1, softcap=3.0)
        assert torch.autograd.gradcheck(
            lambda x, o=options: xentkit.cross_entropy(x, probs, backend="chunked", **o),
            logits.requires_grad_(),
        )


def test_a_target_that_needs_a_gradient_runs_the_reference():
    logits, probs, _ = _problem(4, 3, 4, torch.float64)
    probs.requires_grad_()
    loss = xentkit.cross_entropy(logits, probs)
    (grad,) = torch.autograd.grad(loss, probs)
    torch.testing.assert_close(grad, -torch.log_softmax(logits, 1) / 3)


@pytest.mark.triton
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("inplace", [False, True])
def test_the_triton_kernel_matches_the_reference(reduction, dtype, inplace):
    """Triton's soft-target row kernel (through the interpreter, TRITON_INTERPRET=1 from
    conftest.py), every option, against the float64 reference."""
    pytest.importorskip("triton")
    logits, probs, grad_out = _problem(4, 7, 300, dtype)  # 300 classes: several blocks
    weight = torch.rand(300, dtype=torch.float64) + 0.5
    for options in (
        {},
        {"label_smoothing": 0.2, "z_loss": 0.05, "softcap": 2.5, "weight": weight},
    ):
        mine = {**options, "reduction": reduction, "inplace_backward": inplace}
        if "weight" in mine:
            mine["weight"] = weight.to(dtype)
        loss, grad = _value_and_grad(
            lambda x, o=mine: xentkit.cross_entropy(x * 1, probs, backend="triton", **o),
            logits,
            grad_out,
        )
        exact = {**options, "reduction": reduction}
        want_loss, want_grad = _value_and_grad(
            lambda x, o=exact: xentkit.cross_entropy(x, probs.double(), backend="reference", **o),
            logits.double(),
            grad_out,
        )
        close(loss.double(), want_loss, LOSS_TOL[dtype])
        close(grad, want_grad, GRAD_TOL[dtype])


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets the NaNs
def test_the_triton_kernel_handles_non_finite_logits_as_torch():
    pytest.importorskip("triton")
    logits, probs, grad_out = _problem(2, 4, 5, torch.float32)
    logits[0, 2], logits[1, 3], logits[2, 1] = float("-inf"), float("-inf"), float("inf")
    probs[1] = torch.tensor([0.0, 0, 1, 0, 0])
    got = _value_and_grad(
        lambda x: xentkit.cross_entropy(x, probs, reduction="none", backend="triton"),
        logits,
        grad_out,
    )
    want = _value_and_grad(lambda x: F.cross_entropy(x, probs, reduction="none"), logits, grad_out)
    torch.testing.assert_close(got, want, equal_nan=True)


# Peak resident memory of one forward + backward in a fresh process (VmHWM reset after the
# inputs exist), in units of one N x V float32 buffer.
_MEMORY = textwrap.dedent(
    """
    import json, sys, torch, torch.nn.functional as F, xentkit

    def kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])

    n, v = 2048, 4096
    logits = torch.randn(n, v, requires_grad=True)
    probs = torch.softmax(torch.randn(n, v), 1)
    fn = xentkit.cross_entropy if sys.argv[1] == "xentkit" else F.cross_entropy
    fn(logits, probs).backward()  # warm up (a compilation on the first call)
    logits.grad = None
    before = kib("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")
    fn(logits, probs).backward()
    print(json.dumps((kib("VmHWM:") - before) * 1024 / (n * v * 4)))
    """
)


@pytest.mark.slow
def test_extra_memory_is_one_buffer_where_torch_needs_more():
    peaks = {}
    for name in ("xentkit", "torch"):
        run = subprocess.run(
            [sys.executable, "-c", _MEMORY, name], capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stderr[-2000:]
        peaks[name] = json.loads(run.stdout)
    # The gradient (kept as logits.grad) is the one buffer; pages of allocator slack aside.
    assert peaks["xentkit"] < 1.3, peaks
    assert peaks["torch"] > 2 * peaks["xentkit"], peaks


def test_reference_is_the_spec():
    """The kernel's per-row terms are those of reference.cross_entropy_terms."""
    from xentkit.kernels.chunked import soft_loss_and_grad

    logits, probs, _ = _problem(6, 7, 5, torch.float64)
    ce, z, _ = soft_loss_and_grad(logits, probs, None, 0.1, 0.2, None, None)
    terms = reference.cross_entropy_terms(logits, probs, None, -100, 0.1, 0.2)
    torch.testing.assert_close(ce, terms.ce)
    torch.testing.assert_close(z, terms.z)
