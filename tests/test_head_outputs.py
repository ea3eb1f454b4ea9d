"""Per-token outputs of the LM head (``linear_head_outputs``, ``linear_log_probs``) on every
backend, and the one description of the row statistics they share (``kernels/row_stats.py``):
its block merge against a whole row, its Triton transcription, and its vocab-parallel use."""

from __future__ import annotations

import importlib.util
import itertools
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_distributed import _spawn

import xentkit
from xentkit.functional import HEAD_OUTPUTS, linear_head_outputs
from xentkit.kernels import row_stats

BACKENDS = ["reference", "chunked"]
if importlib.util.find_spec("triton") is not None:
    BACKENDS.append("triton")  # the interpreter on CPU (TRITON_INTERPRET=1, from conftest.py)


def plain_torch(hidden, weight, target, bias, temperature, logit_scale, softcap, ignore_index):
    """The unfused formulas, written as a user would (the logits built)."""
    z = F.linear(hidden, weight, bias) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    s = z / temperature
    log_p = torch.log_softmax(s, -1)
    counted = (
        torch.ones_like(target, dtype=torch.bool)
        if ignore_index is None
        else (target != ignore_index)
    )
    safe = torch.where(counted, target, 0)
    zero = torch.zeros((), dtype=s.dtype)
    log_prob = torch.where(counted, log_p.gather(-1, safe.unsqueeze(-1)).squeeze(-1), zero)
    entropy = torch.where(counted, -(log_p.exp() * log_p).sum(-1), zero)
    log_sum_sq = torch.where(counted, torch.logsumexp(2 * log_p, -1), zero)
    mean = torch.where(counted, s.mean(-1), zero)
    top1 = counted & (s.argmax(-1) == safe)
    return log_prob, entropy, log_sum_sq, mean, top1


def inputs(rows, dim, vocab, dtype, seed, ignore_index):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g, dtype=dtype) * 0.7).requires_grad_()
    bias = torch.randn(vocab, generator=g, dtype=dtype).requires_grad_()
    target = torch.randint(vocab, (rows,), generator=g)
    if ignore_index is not None:
        target[torch.rand(rows, generator=g) < 0.3] = ignore_index
    return hidden, weight, bias, target


def loss_of(log_prob, entropy, seed=3):
    """A loss that weighs every output by a different number (any grad_output)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(log_prob.shape, generator=g, dtype=torch.float64).to(log_prob.dtype)
    b = torch.randn(log_prob.shape, generator=g, dtype=torch.float64).to(log_prob.dtype)
    return (a * log_prob).sum() + (b * entropy).sum()


@settings(max_examples=15, deadline=None)
@given(
    rows=st.integers(0, 9),
    vocab=st.integers(1, 40),
    chunk=st.sampled_from([None, 1, 4]),
    temperature=st.sampled_from([1.0, 0.6]),
    logit_scale=st.sampled_from([1.0, 1.7]),
    softcap=st.sampled_from([None, 3.0]),
    ignore_index=st.sampled_from([-100, None, 0]),
    backend=st.sampled_from(BACKENDS),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_every_field_and_gradient_match_plain_torch(
    rows, vocab, chunk, temperature, logit_scale, softcap, ignore_index, backend, dtype
):
    hidden, weight, bias, target = inputs(rows, 6, vocab, dtype, rows * vocab, ignore_index)
    options = (temperature, logit_scale, softcap, ignore_index)
    got = linear_head_outputs(
        hidden, weight, target, bias, temperature=temperature, logit_scale=logit_scale,
        softcap=softcap, outputs=HEAD_OUTPUTS, ignore_index=ignore_index, chunk_size=chunk,
        backend=backend,
    )  # fmt: skip
    want = plain_torch(hidden, weight, target, bias, *options)
    tol = {} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}
    for name, g, w in zip(got._fields, got, want, strict=True):
        if name == "is_top1":
            assert torch.equal(g, w), (g, w)
        else:
            torch.testing.assert_close(g, w.detach(), **tol, msg=name)
    params = (hidden, weight, bias)
    got_grads = torch.autograd.grad(loss_of(got.log_probs, got.entropy), params)
    want_grads = torch.autograd.grad(loss_of(want[0], want[1]), params)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_through_softcap_scale_and_temperature(backend):
    hidden, weight, bias, target = inputs(4, 3, 7, torch.float64, 1, -100)

    def fn(h, w, b):
        out = linear_head_outputs(
            h, w, target, b, temperature=0.8, logit_scale=1.5, softcap=2.0,
            outputs=("entropy",), chunk_size=2, backend=backend,
        )  # fmt: skip
        return out.log_probs, out.entropy

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_bfloat16_is_as_accurate_as_torch():
    hidden, weight, bias, target = inputs(64, 32, 300, torch.float64, 2, None)
    exact = plain_torch(hidden, weight, target, bias, 0.7, 1.0, None, None)
    low = [t.detach().bfloat16() for t in (hidden, weight, bias)]
    got = linear_head_outputs(*low[:2], target, low[2], temperature=0.7, ignore_index=None)
    torch_bf16 = plain_torch(*low[:2], target, low[2], 0.7, 1.0, None, None)
    for mine, theirs, truth in zip(got[:2], torch_bf16[:2], exact[:2], strict=True):
        err = (mine.double() - truth).abs().max()
        assert err <= 2 * (theirs.double() - truth).abs().max() + 1e-3


def test_masked_classes_and_ties():
    """-inf logits (masked vocabulary) add 0 to the entropy; a tie keeps the first argmax."""
    hidden = torch.eye(3, dtype=torch.float64)
    weight = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]], dtype=torch.float64)
    bias = torch.tensor([0.0, 0.0, float("-inf"), 0.0], dtype=torch.float64)
    target = torch.tensor([1, 0, 3])
    for backend in BACKENDS:
        out = linear_head_outputs(
            hidden, weight, target, bias, outputs=HEAD_OUTPUTS, backend=backend
        )
        assert out.is_top1.tolist() == [False, True, True], backend  # class 0 ties class 1
        assert torch.isfinite(out.entropy).all(), backend


@settings(max_examples=30, deadline=None)
@given(
    cuts=st.lists(st.integers(0, 12), max_size=4),
    masked=st.lists(st.integers(0, 11), max_size=12),
    seed=st.integers(0, 100),
)
def test_merging_blocks_equals_the_whole_row(cuts, masked, seed):
    """Any split of a row into blocks (empty ones too, in class order) merges to the row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 12, generator=g, dtype=torch.float64).round(decimals=0)  # ties happen
    x[0, masked] = float("-inf")
    x[1] = float("-inf") if len(masked) > 10 else x[1]
    target = torch.randint(12, (3,), generator=g)
    bounds = [0, *sorted(cuts), 12]
    asked = {"entropy": True, "sum_sq": True, "sum_x": True, "argmax": True}
    parts = []
    for lo, hi in itertools.pairwise(bounds):
        owned = (target >= lo) & (target < hi)
        local = torch.where(owned, target - lo, 0).clamp_max(max(hi - lo - 1, 0))
        parts.append(row_stats.block(x[:, lo:hi], local, owned=owned, offset=lo, **asked))
    merged, whole = row_stats.merge(row_stats.stack(parts)), row_stats.block(x, target, **asked)
    assert torch.equal(merged.argmax, whole.argmax)
    finite = torch.isfinite(whole.max)
    for field in ("max", "sum_exp", "target", "sum_exp_x", "sum_exp2"):
        a, b = getattr(merged, field)[finite], getattr(whole, field)[finite]
        torch.testing.assert_close(a, b, msg=field)
    done = (row_stats.finish(stats, target, 12) for stats in (merged, whole))
    for m, w in zip(*done, strict=True):
        torch.testing.assert_close(m[finite], w[finite])


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(0, 9),
    vocab=st.integers(1, 12),
    slice_bytes=st.integers(1, 200),
    seed=st.integers(0, 100),
)
def test_row_slices_change_nothing(rows, vocab, slice_bytes, seed):
    """The row passes in slices of rows (``block``, ``log_prob_grad``) give what one pass over
    all the rows gives, whatever the slice size."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3
    x[:, : vocab // 3] = float("-inf") if seed % 2 else x[:, : vocab // 3]
    target = torch.randint(vocab, (rows,), generator=g)
    owned = torch.rand(rows, generator=g) > 0.3  # a vocabulary shard's rows
    class_weight = torch.rand(vocab, generator=g, dtype=torch.float64)
    options = {"entropy": True, "sum_sq": True, "sum_x": True, "argmax": True, "offset": 5}
    options |= {"owned": owned, "class_weight": class_weight}
    whole = row_stats.block(x, target, **options)  # one slice: 8 MiB of rows
    done = row_stats.finish(whole)
    a, b = torch.randn(rows, generator=g, dtype=torch.float64), torch.rand(rows, generator=g)
    args = (done.lse, a, b.double(), done.entropy, target, owned)
    want_grad = row_stats.log_prob_grad(x.clone(), *args)  # one slice: 8 MiB of rows
    with mock.patch.object(row_stats, "SLICE_BYTES", slice_bytes):
        assert len(row_stats.row_slices(x)) == max(
            1, -(-rows // max(1, slice_bytes // (8 * vocab)))
        )
        sliced = row_stats.block(x, target, **options)
        got = row_stats.log_prob_grad(x.clone(), *args)
    for field, want, have in zip(whole._fields, whole, sliced, strict=True):
        torch.testing.assert_close(have, want, msg=field)
    torch.testing.assert_close(got, want_grad)


@pytest.mark.triton
@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not installed")
@pytest.mark.parametrize("vocab", [1, 5, 300])
def test_the_triton_row_kernels_transcribe_row_stats(vocab):
    from xentkit.kernels import triton as kernels

    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(6, vocab, generator=g, dtype=torch.float64) * 4
    x[1, : vocab // 2] = float("-inf")
    x[2] = x[2].round()
    target = torch.randint(vocab, (6,), generator=g)
    asked = {"entropy": True, "sum_sq": True, "sum_x": True, "argmax": True}
    got, want = kernels.row_stats_block(x, target, **asked), row_stats.block(x, target, **asked)
    for field, a, b in zip(want._fields, got, want, strict=True):
        torch.testing.assert_close(a, b, msg=field)
    done = row_stats.finish(want)
    a, b = torch.randn(6, generator=g, dtype=torch.float64), torch.rand(6, generator=g)
    args = (done.lse, a, b.double(), done.entropy, target)
    torch.testing.assert_close(
        kernels.log_prob_grad(x.clone(), *args), row_stats.log_prob_grad(x.clone(), *args)
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"outputs": ("entropy", "lse")}, ValueError, "outputs must be a tuple of names"),
        ({"outputs": "entropy"}, ValueError, "outputs must be a tuple of names"),
        ({"logit_scale": 0.0}, ValueError, "logit_scale must be a positive finite float"),
        ({"softcap": -1.0}, ValueError, "softcap must be a positive finite float"),
        ({"temperature": 0.0}, ValueError, "temperature must be a positive"),
        ({"ignore_index": None}, IndexError, "Target -100 is out of bounds"),
    ],
)
def test_bad_options(kwargs, error, match):
    hidden, weight, bias, target = inputs(5, 3, 4, torch.float64, 0, -100)
    target[0] = -100
    with pytest.raises(error, match=match):
        linear_head_outputs(hidden, weight, target, bias, **kwargs)


# ---------------------------------------------------------------- vocabulary-parallel


def _vocab_parallel_worker(checks, rank: int, world_size: int) -> None:
    WORLD = torch.distributed.group.WORLD
    sizes = {2: [13, 8], 3: [12, 0, 9]}[world_size]  # uneven; an empty slice on 3 ranks
    vocab, start = sum(sizes), sum(sizes[:rank])
    for dtype, ignore_index, kw in [
        (torch.float64, -100, {}),
        (torch.float64, None, {"temperature": 0.7, "logit_scale": 1.3, "softcap": 2.5}),
        (torch.float32, -100, {"temperature": 1.4}),
    ]:
        hidden, weight, bias, target = inputs(11, 5, vocab, dtype, 7, ignore_index)
        target[0] = start  # a target on this rank's first class
        torch.distributed.broadcast(target, 0)
        local_w = weight.detach()[start : start + sizes[rank]].clone().requires_grad_()
        local_b = bias.detach()[start : start + sizes[rank]].clone().requires_grad_()
        common = dict(outputs=HEAD_OUTPUTS, ignore_index=ignore_index, chunk_size=4, **kw)
        got = linear_head_outputs(hidden, local_w, target, local_b, process_group=WORLD, **common)
        want = linear_head_outputs(hidden, weight, target, bias, backend="reference", **common)
        for name, g, w in zip(got._fields, got, want, strict=True):
            if name == "is_top1":
                checks.true(f"{name} {dtype}", torch.equal(g, w), f"{g} != {w}")
            else:
                checks.close(f"{name} {dtype} {kw}", g, w.detach(), dtype)
        got_grads = torch.autograd.grad(
            loss_of(got.log_probs, got.entropy), (hidden, local_w, local_b)
        )
        want_grads = torch.autograd.grad(
            loss_of(want.log_probs, want.entropy), (hidden, weight, bias)
        )
        checks.close(f"grad input {dtype}", got_grads[0], want_grads[0], dtype)
        stop = start + sizes[rank]
        checks.close(f"grad weight {dtype}", got_grads[1], want_grads[1][start:stop], dtype)
        checks.close(f"grad bias {dtype}", got_grads[2], want_grads[2][start:stop], dtype)
    log_prob = xentkit.linear_log_probs(
        hidden.detach(),
        local_w.detach(),
        target,
        local_b.detach(),
        temperature=1.4,
        process_group=WORLD,
    )
    checks.close("linear_log_probs over the group", log_prob, want.log_probs.detach(), dtype)
    bad = {"temperature": 1.0 + rank}
    checks.raises(
        "ranks disagree", ValueError, "the ranks disagree on the temperature",
        lambda: linear_head_outputs(hidden, local_w, target, process_group=WORLD, **bad),
    )  # fmt: skip


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 3])
def test_vocab_parallel_matches_one_process(tmp_path, world_size):
    _spawn(tmp_path, world_size, _vocab_parallel_worker)
