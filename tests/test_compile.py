"""Every public function and module inside ``torch.compile(fullgraph=True, dynamic=True)``: no
graph break, the eager values and gradients, one compilation for every batch size, and the
data-dependent checks kept as asserts on the device (no host synchronisation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import xentkit
from xentkit.kernels import chunked

C, D = 7, 5


def _ce(**options):
    return lambda x, t: xentkit.cross_entropy(x, t, **options)


def _probs(**options):
    def fn(x, t):
        return xentkit.cross_entropy(x, torch.softmax(t.unsqueeze(1) * x.detach(), 1), **options)

    return fn


HEAD = torch.nn.Linear(D, C)


def _linear(**options):
    return lambda h, t: xentkit.linear_cross_entropy(h, HEAD.weight, t, HEAD.bias, **options)


CLASS_WEIGHT = torch.linspace(0.5, 1.5, C)
CASES = {
    "cross_entropy": _ce(),
    "cross_entropy options": _ce(
        weight=CLASS_WEIGHT, label_smoothing=0.1, z_loss=1e-3, softcap=4.0, ignore_index=2
    ),
    "cross_entropy none": _ce(reduction="none", label_smoothing=0.2),
    "cross_entropy sum inplace": lambda x, t: xentkit.cross_entropy(
        x * 1, t, reduction="sum", inplace_backward=True
    ),
    "cross_entropy reference": _ce(backend="reference", label_smoothing=0.1),
    "probability targets": _probs(label_smoothing=0.1, weight=CLASS_WEIGHT),
    "nll_loss": lambda x, t: xentkit.nll_loss(xentkit.log_softmax(x, 1), t, CLASS_WEIGHT),
    "softmax": lambda x, t: (xentkit.softmax(x, 1) * t.unsqueeze(1)).sum(),
    "binary_cross_entropy": lambda x, t: xentkit.binary_cross_entropy(
        torch.sigmoid(x), torch.sigmoid(x.detach() * t.unsqueeze(1))
    ),
    "binary_cross_entropy_with_logits": lambda x, t: xentkit.binary_cross_entropy_with_logits(
        x, (t.unsqueeze(1) > 2).float().expand_as(x), pos_weight=CLASS_WEIGHT
    ),
    "CrossEntropyLoss": xentkit.nn.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4),
    "NLLLoss": lambda x, t: xentkit.nn.NLLLoss(reduction="sum")(F.log_softmax(x, 1), t),
    "BCELoss": lambda x, t: xentkit.nn.BCELoss(reduction="sum")(
        torch.sigmoid(x), torch.ones_like(x)
    ),
    "BCEWithLogitsLoss": lambda x, t: xentkit.nn.BCEWithLogitsLoss()(x, torch.ones_like(x)),
    "linear_cross_entropy": _linear(),
    "linear_cross_entropy options": _linear(
        ignore_index=3, label_smoothing=0.1, z_loss=1e-3, softcap=3.0, chunk_size=2
    ),
    "linear_cross_entropy none": _linear(reduction="none", class_weight=CLASS_WEIGHT),
    "linear_cross_entropy reference": _linear(backend="reference"),
    # The Triton kernels run through Triton's interpreter here (TRITON_INTERPRET=1).
    "cross_entropy triton": _ce(backend="triton", label_smoothing=0.1, z_loss=1e-3),
    "cross_entropy triton inplace": lambda x, t: xentkit.cross_entropy(
        x * 1, t, backend="triton", inplace_backward=True
    ),
    "linear_cross_entropy triton": _linear(backend="triton", reduction="none", softcap=3.0),
    "LinearCrossEntropyLoss": lambda h, t: xentkit.nn.LinearCrossEntropyLoss(z_loss=0.1)(
        h, HEAD.weight, t
    ),
}


def _inputs(name: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    width = D if name.startswith(("linear", "Linear")) else C
    x = torch.randn(n, width, generator=gen)
    return x, torch.randint(0, C, (n,), generator=gen)


def _run(fn, x, t):
    x = x.clone().requires_grad_()
    out = fn(x, t)
    leaves = [x, HEAD.weight, HEAD.bias]
    weights = torch.linspace(0.5, 1.5, out.numel()).view_as(out)
    return out.detach(), torch.autograd.grad(out, leaves, weights, allow_unused=True)


@pytest.mark.parametrize("name", CASES)
def test_full_graph_matches_eager_without_recompiling(name):
    if "triton" in name:
        pytest.importorskip("triton")
    torch.compiler.reset()
    fn = CASES[name]
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for n in (6, 11):
        x, t = _inputs(name, n)
        # After the first call, a new batch size must not recompile.
        with torch._dynamo.config.patch(error_on_recompile=n != 6):
            got, got_grad = _run(compiled, x, t)
        want, want_grad = _run(fn, x, t)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_grad, want_grad)


def test_the_fused_kernels_own_compilation_runs_inside_a_callers(monkeypatch):
    monkeypatch.setattr(chunked, "COMPILE_MIN_ELEMENTS", 0)
    chunked.reset_compiled()
    x, t = torch.randn(64, 33), torch.randint(0, 33, (64,))
    compiled = torch.compile(lambda x, t: xentkit.cross_entropy(x, t), fullgraph=True)
    got, got_grad = _run(compiled, x, t)
    want, want_grad = _run(F.cross_entropy, x, t)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    chunked.reset_compiled()


@pytest.mark.parametrize(
    "call",
    [
        lambda x, t: xentkit.cross_entropy(x, t),
        lambda x, t: xentkit.nll_loss(x, t),
        lambda x, t: xentkit.linear_cross_entropy(x, torch.ones(C, C), t),
    ],
)
def test_an_out_of_range_target_fails_when_the_graph_runs(call):
    torch.compiler.reset()
    compiled = torch.compile(call, fullgraph=True, dynamic=True)
    x = torch.randn(4, C)
    compiled(x, torch.tensor([0, 1, 2, -100]))
    with pytest.raises(RuntimeError, match="out of bounds"):
        compiled(x, torch.tensor([0, 1, C, 2]))


def test_probabilities_outside_the_unit_interval_fail_when_the_graph_runs():
    torch.compiler.reset()
    compiled = torch.compile(xentkit.binary_cross_entropy, fullgraph=True, dynamic=True)
    with pytest.raises(RuntimeError, match="between 0 and 1"):
        compiled(torch.tensor([0.5, 1.5]), torch.tensor([1.0, 0.0]))


def test_eager_errors_are_unchanged():
    with pytest.raises(IndexError, match=f"Target {C} is out of bounds"):
        xentkit.cross_entropy(torch.randn(2, C), torch.tensor([0, C]))


def test_a_compiled_training_step_matches_eager():
    """A whole step of a small model: embedding, LM head, fused loss, optimizer."""

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(C, D), torch.nn.Linear(D, D))
        head = torch.nn.Linear(D, C, bias=False)
        return model, head, torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.1)

    def step(model, head, opt, ids):
        hidden = model(ids[:, :-1])
        loss = xentkit.linear_cross_entropy(hidden, head.weight, ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    torch.compiler.reset()
    eager, compiled = make(), make()
    fn = torch.compile(step, fullgraph=False, dynamic=True)
    for batch in (3, 5):
        ids = torch.randint(0, C, (batch, 9))
        torch.testing.assert_close(fn(*compiled, ids), step(*eager, ids))
    for a, b in zip(eager[0].parameters(), compiled[0].parameters(), strict=True):
        torch.testing.assert_close(a, b)
