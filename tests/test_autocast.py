"""Under ``torch.autocast`` every function follows torch's cast policy for its device type: the
same output dtype, value and gradients as ``torch.nn.functional`` under the same autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import xentkit
from xentkit import _autocast

BF16 = torch.bfloat16


def _autocast_cpu():
    return torch.autocast("cpu", dtype=BF16)


def _probs(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x.float() * 0.5, -1).to(x.dtype)


# name -> (inputs, call); each call is valid for xentkit's and for torch's function alike.
CASES = {
    "cross_entropy": lambda f, x, t: f.cross_entropy(x, t, label_smoothing=0.1),
    "cross_entropy weight": lambda f, x, t: f.cross_entropy(x, t, torch.rand(x.shape[1])),
    "cross_entropy probabilities": lambda f, x, t: f.cross_entropy(x, _probs(x.detach())),
    "cross_entropy none": lambda f, x, t: f.cross_entropy(x, t, reduction="none"),
    "nll_loss": lambda f, x, t: f.nll_loss(x, t, torch.rand(x.shape[1])),
    "binary_cross_entropy": lambda f, x, t: f.binary_cross_entropy(
        torch.sigmoid(x), _probs(x.detach())
    ),
    "binary_cross_entropy_with_logits": lambda f, x, t: f.binary_cross_entropy_with_logits(
        x, _probs(x.detach()), pos_weight=torch.rand(x.shape[1])
    ),
    "softmax": lambda f, x, t: f.softmax(x, 1),
    "log_softmax": lambda f, x, t: f.log_softmax(x, 1),
    "log_softmax dtype": lambda f, x, t: f.log_softmax(x, 1, dtype=torch.float64),
}


@pytest.mark.parametrize("input_dtype", [BF16, torch.float32])
@pytest.mark.parametrize("name", CASES)
def test_cpu_autocast_gives_torchs_dtype_value_and_gradient(name, input_dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 11, generator=gen) * 6).to(input_dtype)
    t = torch.randint(0, 11, (16,), generator=gen)
    results = []
    for f in (xentkit, F):
        leaf = x.clone().requires_grad_()
        torch.manual_seed(1)  # the same random class weights in both calls
        with _autocast_cpu():
            out = CASES[name](f, leaf, t)
        (grad,) = torch.autograd.grad(out.float().sum(), leaf)
        results.append((out, grad))
    (ours, our_grad), (theirs, their_grad) = results
    assert ours.dtype == theirs.dtype and our_grad.dtype == their_grad.dtype
    # bfloat16 results may differ by a rounding step (ours are rounded once from float32).
    tol = {"rtol": 1e-2, "atol": 1e-2} if ours.dtype == BF16 else {}
    torch.testing.assert_close(ours, theirs, **tol)
    grad_atol = 1e-2 if our_grad.dtype == BF16 else 2e-3
    torch.testing.assert_close(our_grad, their_grad, rtol=2e-2, atol=grad_atol)


def test_the_issues_bf16_logits_give_torchs_float32_value():
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(64, 50, generator=gen) * 20).to(BF16)
    t = torch.randint(0, 50, (64,), generator=gen)
    with _autocast_cpu():
        ours, theirs = xentkit.cross_entropy(x, t), F.cross_entropy(x, t)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_linear_cross_entropy_runs_its_head_in_the_autocast_dtype(backend, with_bias):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 10, 16, generator=gen)
    head = torch.nn.Linear(16, 40, bias=with_bias)
    target = torch.randint(0, 40, (3, 10), generator=gen)
    target[0, :4] = -100
    results = []
    for fused in (True, False):
        h = hidden.clone().requires_grad_()
        with _autocast_cpu():
            if fused:
                loss = xentkit.linear_cross_entropy(
                    h, head.weight, target, head.bias, backend=backend, label_smoothing=0.1
                )
            else:
                loss = F.cross_entropy(head(h).flatten(0, 1), target.flatten(), label_smoothing=0.1)
        params = [h, *head.parameters()]
        results.append((loss, torch.autograd.grad(loss, params)))
    (ours, our_grads), (theirs, their_grads) = results
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3)
    for got, want in zip(our_grads, their_grads, strict=True):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


def test_linear_cross_entropy_takes_float32_class_weights_under_autocast():
    h, w = torch.randn(6, 8), torch.randn(5, 8)
    t, cw = torch.randint(0, 5, (6,)), torch.rand(5)
    with _autocast_cpu():
        ours = xentkit.linear_cross_entropy(h, w, t, class_weight=cw)
        theirs = F.cross_entropy(F.linear(h, w), t, weight=cw)
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3)


def test_compiled_under_autocast():
    x, t = torch.randn(8, 6, dtype=BF16), torch.randint(0, 6, (8,))
    torch.compiler.reset()
    compiled = torch.compile(lambda x, t: xentkit.cross_entropy(x, t), fullgraph=True)
    with _autocast_cpu():
        ours, theirs = compiled(x, t), F.cross_entropy(x, t)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)


@pytest.fixture
def other_device_autocast(monkeypatch):
    """Autocast "on" for a device type other than the CPU (here ``meta``, whose tensors carry
    no data): it follows CUDA's policy, which this machine cannot run."""
    monkeypatch.setattr(_autocast, "enabled", lambda device_type: device_type == "meta")


def test_the_cuda_policy_casts_softmax_and_the_losses(other_device_autocast):
    x = torch.empty(4, 3, dtype=BF16, device="meta")
    assert xentkit.softmax(x, 1).dtype == torch.float32
    assert xentkit.log_softmax(x, 1).dtype == torch.float32
    assert xentkit.softmax(x, 1, dtype=torch.float16).dtype == torch.float16
    for function in ("cross_entropy", "nll_loss", "binary_cross_entropy_with_logits"):
        assert _autocast.float32(function, x)[0].dtype == torch.float32
    double = torch.empty(2, dtype=torch.float64, device="meta")
    assert _autocast.float32("cross_entropy", double)[0].dtype == torch.float64


def test_binary_cross_entropy_is_unsafe_to_autocast_off_the_cpu(other_device_autocast):
    p = torch.empty(4, dtype=BF16, device="meta")
    with pytest.raises(RuntimeError, match=r"unsafe to autocast.*binary_cross_entropy_with_logits"):
        xentkit.binary_cross_entropy(p, p)
