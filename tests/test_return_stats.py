"""``return_stats=True`` on cross_entropy and linear_cross_entropy: the loss unchanged and
``LossStats`` (z-loss part, accuracy, per-position lse, mean entropy) equal to plain torch's
on every backend, one process and vocab-parallel."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_distributed import _spawn

import xentkit

BACKENDS = ["reference", "chunked"]
if importlib.util.find_spec("triton") is not None:
    BACKENDS.append("triton")  # the interpreter on CPU (TRITON_INTERPRET=1, from conftest.py)


def torch_stats(logits, target, ignore_index, z_loss, softcap, reduction):
    """The statistics written with plain torch ops on the (capped) logits."""
    x = logits.detach().double()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    counted = target != ignore_index
    lse = torch.where(counted, torch.logsumexp(x, -1), 0.0)
    z = z_loss * lse**2
    z = {"none": z, "sum": z.sum(), "mean": z.sum() / counted.sum()}[reduction]
    hit = (x.argmax(-1) == target) & counted
    log_p = torch.log_softmax(x, -1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    mean_entropy = torch.where(counted, entropy, 0.0).sum() / counted.sum()
    return z, hit.sum() / counted.sum(), lse, mean_entropy


def check(got, want, dtype):
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for name, g, w in zip(("z_loss", "accuracy", "lse", "entropy"), got, want, strict=True):
        torch.testing.assert_close(g.double(), w.double(), **tol, equal_nan=True, msg=name)
        assert not g.requires_grad, name


@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(1, 12),
    vocab=st.integers(1, 30),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    z_loss=st.sampled_from([0.0, 1e-2]),
    softcap=st.sampled_from([None, 4.0]),
    smoothing=st.sampled_from([0.0, 0.1]),
    backend=st.sampled_from(BACKENDS),
    linear=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_stats_match_torch_and_the_loss_is_unchanged(
    rows, vocab, reduction, z_loss, softcap, smoothing, backend, linear, dtype
):
    g = torch.Generator().manual_seed(rows * 31 + vocab)
    hidden = torch.randn(rows, 5, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, 5, generator=g, dtype=dtype, requires_grad=True)
    target = torch.randint(vocab, (rows,), generator=g)
    target[torch.rand(rows, generator=g) < 0.3] = -100
    options = dict(reduction=reduction, z_loss=z_loss, softcap=softcap, label_smoothing=smoothing)
    logits = F.linear(hidden, weight)
    if linear:
        kw = dict(**options, backend=backend, chunk_size=4)
        loss, stats = xentkit.linear_cross_entropy(hidden, weight, target, **kw, return_stats=True)
        plain = xentkit.linear_cross_entropy(hidden, weight, target, **kw)
    else:
        loss, stats = xentkit.cross_entropy(logits, target, **options, backend=backend,
                                            return_stats=True)  # fmt: skip
        plain = xentkit.cross_entropy(logits, target, **options, backend=backend)
    torch.testing.assert_close(loss, plain, equal_nan=True)
    check(stats, torch_stats(logits, target, -100, z_loss, softcap, reduction), dtype)
    # The loss still differentiates as without stats.
    grads = torch.autograd.grad(loss.sum(), (hidden, weight), retain_graph=True)
    want = torch.autograd.grad(plain.sum(), (hidden, weight))
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_stats_of_a_batch_of_sequences_keep_its_shape():
    logits = torch.randn(2, 7, 5)  # (N, C, d1)
    target = torch.randint(7, (2, 5))
    loss, stats = xentkit.cross_entropy(logits, target, reduction="none", z_loss=1e-3,
                                        return_stats=True)  # fmt: skip
    assert loss.shape == stats.lse.shape == stats.z_loss.shape == (2, 5)
    hidden, weight = torch.randn(2, 5, 4), torch.randn(7, 4)
    _, stats = xentkit.linear_cross_entropy(hidden, weight, target, return_stats=True)
    assert stats.lse.shape == (2, 5) and stats.accuracy.shape == ()


def test_in_place_backward_reads_the_stats_first():
    logits = torch.randn(6, 9, requires_grad=True)
    target = torch.randint(9, (6,))
    want = xentkit.cross_entropy(logits.detach(), target, return_stats=True)[1]
    given = logits.detach().clone().requires_grad_()
    loss, stats = xentkit.cross_entropy(given * 1, target, inplace_backward=True, return_stats=True)
    loss.backward()
    check(stats, want, torch.float32)


def test_probability_targets_have_no_stats():
    logits = torch.randn(3, 4)
    with pytest.raises(ValueError, match="return_stats needs class-index targets"):
        xentkit.cross_entropy(logits, logits.softmax(-1), return_stats=True)


def _distributed_worker(checks, rank: int, world_size: int) -> None:
    sizes = [9, 0, 6]
    vocab, start = sum(sizes), sum(sizes[:rank])
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(10, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, 4, generator=g, dtype=torch.float64)
    target = torch.randint(vocab, (10,), generator=g)
    target[3] = -100
    local = weight[start : start + sizes[rank]]
    group = torch.distributed.group.WORLD
    for reduction in ("mean", "none"):
        opts = dict(reduction=reduction, z_loss=1e-2, softcap=5.0, label_smoothing=0.1)
        want = xentkit.linear_cross_entropy(hidden, weight, target, **opts, return_stats=True)
        got = xentkit.linear_cross_entropy(
            hidden, local, target, **opts, process_group=group, chunk_size=3, return_stats=True
        )
        logits = F.linear(hidden, local)
        from xentkit.distributed import vocab_parallel_cross_entropy

        got_ce = vocab_parallel_cross_entropy(
            logits, target, group=group, **opts, return_stats=True
        )
        for name, (a, b) in {"linear": (got, want), "logits": (got_ce, want)}.items():
            checks.close(f"{name} loss {reduction}", a[0], b[0])
            for field, x, y in zip(b[1]._fields, a[1], b[1], strict=True):
                checks.close(f"{name} {field} {reduction}", x, y)


@pytest.mark.distributed
def test_vocab_parallel_stats_match_one_process(tmp_path):
    _spawn(tmp_path, 3, _distributed_worker)  # uneven slices, one of them empty
