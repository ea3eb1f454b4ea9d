"""Fused linear cross entropy (``backend="chunked"``) against the exact path and PyTorch.

The exact path is ``backend="reference"`` (``F.linear`` then :mod:`xentkit.reference`); PyTorch
is ``F.cross_entropy(F.linear(...))``, which has no z-loss or softcap.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import RecordOps, assert_memory_does_not_grow_with_tokens
from hypothesis import given
from hypothesis import strategies as st

import xentkit
from xentkit.kernels import linear_chunked

REDUCTIONS = ("mean", "sum", "none")
TOLERANCES = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
}


def make_inputs(m, d, v, dtype=torch.float64, bias=True, ignored=(), leading=None):
    """Hidden states, weight, bias and targets with ``requires_grad`` on the parameters."""
    shape = (m,) if leading is None else leading
    hidden = torch.randn(*shape, d, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, d, dtype=dtype) / d**0.5).requires_grad_()
    b = torch.randn(v, dtype=dtype).requires_grad_() if bias else None
    target = torch.randint(v, shape)
    target.view(-1)[list(ignored)] = -100
    return hidden, weight, b, target


def value_and_grads(fn, hidden, weight, bias, target, grad_output_seed=1, **kwargs):
    """``fn``'s loss and the gradients of ``sum(grad_output * loss)`` for every parameter."""
    params = [p for p in (hidden, weight, bias) if p is not None]
    loss = fn(hidden, weight, target, bias, **kwargs)
    generator = torch.Generator().manual_seed(grad_output_seed)
    grad_output = torch.randn(loss.shape, generator=generator, dtype=loss.dtype)
    grads = torch.autograd.grad(loss, params, grad_output) if loss.requires_grad else ()
    return loss.detach(), grads


def fused(hidden, weight, target, bias=None, **kwargs):
    return xentkit.linear_cross_entropy(hidden, weight, target, bias, backend="chunked", **kwargs)


def exact(hidden, weight, target, bias=None, **kwargs):
    return xentkit.linear_cross_entropy(hidden, weight, target, bias, backend="reference", **kwargs)


def torch_unfused(hidden, weight, target, bias=None, class_weight=None, **kwargs):
    logits = F.linear(hidden, weight, bias).flatten(0, -2)
    loss = F.cross_entropy(logits, target.flatten(), class_weight, **kwargs)
    return loss.reshape(target.shape) if kwargs.get("reduction") == "none" else loss


def assert_same(got, want, dtype=torch.float64):
    (loss, grads), (want_loss, want_grads) = got, want
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(loss, want_loss, equal_nan=True, **tol)
    assert len(grads) == len(want_grads)
    for grad, want_grad in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(grad, want_grad, **tol)


@given(
    m=st.integers(0, 12),
    v=st.integers(1, 9),
    d=st.integers(1, 5),
    chunk_size=st.one_of(st.none(), st.integers(1, 14)),
    reduction=st.sampled_from(REDUCTIONS),
    bias=st.booleans(),
    weighted=st.booleans(),
    ignored=st.sets(st.integers(0, 11)),
    label_smoothing=st.sampled_from([0.0, 0.2]),
    z_loss=st.sampled_from([0.0, 1e-2]),
    softcap=st.sampled_from([None, 2.0]),
)
def test_matches_exact_path_and_torch(
    m, v, d, chunk_size, reduction, bias, weighted, ignored, label_smoothing, z_loss, softcap
):
    hidden, weight, b, target = make_inputs(m, d, v, bias=bias, ignored=ignored & set(range(m)))
    options = {
        "class_weight": torch.rand(v, dtype=torch.float64) if weighted else None,
        "reduction": reduction,
        "label_smoothing": label_smoothing,
    }
    options.update(z_loss=z_loss, softcap=softcap)
    got = value_and_grads(fused, hidden, weight, b, target, chunk_size=chunk_size, **options)
    assert_same(got, value_and_grads(exact, hidden, weight, b, target, **options))
    if not z_loss and softcap is None:
        del options["z_loss"], options["softcap"]
        assert_same(got, value_and_grads(torch_unfused, hidden, weight, b, target, **options))


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_dtypes_match_torch(dtype, reduction):
    hidden, weight, bias, target = make_inputs(40, 16, 50, dtype, ignored=range(0, 40, 7))
    kwargs = {"reduction": reduction, "label_smoothing": 0.1, "class_weight": torch.rand(50)}
    kwargs["class_weight"] = kwargs["class_weight"].to(dtype)
    got = value_and_grads(fused, hidden, weight, bias, target, chunk_size=16, **kwargs)
    assert got[0].dtype == dtype
    assert_same(got, value_and_grads(torch_unfused, hidden, weight, bias, target, **kwargs), dtype)
    assert_same(got, value_and_grads(exact, hidden, weight, bias, target, **kwargs), dtype)


@pytest.mark.parametrize(
    ("m", "v", "chunk_size"),
    [(24, 12, 1), (24, 12, 6), (24, 12, 8), (24, 12, 24), (24, 12, 100), (23, 13, 5), (23, 13, 7)],
)
def test_chunk_sizes_dividing_or_not(m, v, chunk_size):
    hidden, weight, bias, target = make_inputs(m, 6, v, torch.float32, ignored=[3, 4, 20])
    kwargs = {"z_loss": 1e-3, "softcap": 4.0}
    got = value_and_grads(fused, hidden, weight, bias, target, chunk_size=chunk_size, **kwargs)
    assert_same(got, value_and_grads(exact, hidden, weight, bias, target, **kwargs), torch.float32)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_leading_shapes(reduction):
    hidden, weight, bias, target = make_inputs(0, 8, 20, torch.float32, leading=(3, 5))
    target[1, 2] = -100
    got = value_and_grads(fused, hidden, weight, bias, target, reduction=reduction, chunk_size=4)
    want = value_and_grads(torch_unfused, hidden, weight, bias, target, reduction=reduction)
    assert got[0].shape == ((3, 5) if reduction == "none" else ())
    assert_same(got, want, torch.float32)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("m", [0, 6])
def test_all_ignored_and_empty(m, reduction):
    hidden, weight, bias, target = make_inputs(m, 4, 7, ignored=range(m))
    kwargs = {"reduction": reduction, "class_weight": torch.rand(7, dtype=torch.float64)}
    got = value_and_grads(fused, hidden, weight, bias, target, **kwargs)
    assert_same(got, value_and_grads(torch_unfused, hidden, weight, bias, target, **kwargs))
    if reduction == "mean":
        assert got[0].isnan()  # 0 / 0, as in PyTorch
    assert all(not g.any() for g in got[1])


def test_masked_classes_with_infinite_bias():
    hidden, weight, bias, target = make_inputs(9, 4, 8)
    with torch.no_grad():
        bias[[1, 5]] = float("-inf")
    target[target == 1] = 0
    target[target == 5] = 0
    got = value_and_grads(fused, hidden, weight, bias, target, chunk_size=4)
    assert_same(got, value_and_grads(torch_unfused, hidden, weight, bias, target))
    assert not got[1][2][[1, 5]].any()


@pytest.mark.parametrize(
    "needs", [(True, False, False), (False, True, False), (False, False, True)]
)
def test_only_requested_gradients(needs):
    hidden, weight, bias, target = make_inputs(10, 4, 6, ignored=[2])
    for param, need in zip((hidden, weight, bias), needs, strict=True):
        param.requires_grad_(need)
    fused(hidden, weight, target, bias, chunk_size=3).backward()
    want = [p.grad for p in (hidden, weight, bias)]
    for param in (hidden, weight, bias):
        param.grad = None
    exact(hidden, weight, target, bias).backward()
    for param, need, got in zip((hidden, weight, bias), needs, want, strict=True):
        assert (got is not None) == need
        if need:
            torch.testing.assert_close(got, param.grad)


def test_no_grad_computes_the_loss_only():
    hidden, weight, bias, target = make_inputs(10, 4, 6)
    with torch.no_grad():
        loss = fused(hidden, weight, target, bias, chunk_size=3)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, exact(hidden, weight, target, bias).detach())


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_can_run_twice(reduction):
    hidden, weight, bias, target = make_inputs(5, 3, 4, ignored=[0])
    loss = fused(hidden, weight, target, bias, reduction=reduction, z_loss=0.1).sum()
    first = torch.autograd.grad(loss, (hidden, weight, bias), retain_graph=True)
    for got, want in zip(torch.autograd.grad(loss, (hidden, weight, bias)), first, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_weight_gradient_is_not_copied():
    hidden, weight, bias, target = make_inputs(5, 3, 4, dtype=torch.float32)
    loss = fused(hidden, weight, target, bias)
    address = loss.grad_fn.saved_tensors[2].data_ptr()  # the forward's weight-gradient buffer
    loss.backward()
    assert weight.grad.data_ptr() == address


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_backward_makes_no_pass_over_the_gradients(dtype, reduction):
    """``loss.backward()`` (grad_output 1) returns the forward's gradients of the reduced loss as
    they are: no multiplication over the V x D weight gradient; any other grad_output scales
    them."""
    hidden, weight, bias, target = make_inputs(6, 3, 5, dtype=dtype, ignored=[1])
    params = (hidden, weight, bias)
    for grad_output in (1.0, 2.5):
        loss = fused(hidden, weight, target, bias, reduction=reduction)
        with RecordOps() as recorded:
            grads = torch.autograd.grad(loss, params, torch.tensor(grad_output, dtype=loss.dtype))
        assert recorded.multiplied((5, 3)) == (grad_output != 1)
        want = torch_unfused(hidden, weight, target, bias, reduction=reduction) * grad_output
        for got, expected in zip(grads, torch.autograd.grad(want, params), strict=True):
            torch.testing.assert_close(got, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(reduction):
    hidden, weight, bias, target = make_inputs(5, 3, 4, ignored=[1])
    kwargs = {
        "class_weight": torch.rand(4, dtype=torch.float64) + 0.5,
        "reduction": reduction,
        "label_smoothing": 0.1,
        "z_loss": 0.1,
        "softcap": 3.0,
        "chunk_size": 2,
    }
    assert torch.autograd.gradcheck(
        lambda h, w, b: fused(h, w, target, b, **kwargs), (hidden, weight, bias)
    )


def test_torch_compile_runs_and_matches():
    hidden, weight, bias, target = make_inputs(0, 8, 11, torch.float32, leading=(2, 5))

    def step(hidden, weight, target, bias):
        return xentkit.linear_cross_entropy(torch.tanh(hidden), weight, target, bias)

    got = value_and_grads(torch.compile(step), hidden, weight, bias, target)
    assert_same(got, value_and_grads(step, hidden, weight, bias, target), torch.float32)


def test_module():
    hidden, weight, bias, target = make_inputs(0, 8, 11, torch.float32, leading=(2, 5))
    loss_fn = xentkit.nn.LinearCrossEntropyLoss(z_loss=1e-3, chunk_size=3, backend="chunked")
    got = value_and_grads(lambda h, w, t, b: loss_fn(h, w, t, b), hidden, weight, bias, target)
    want = value_and_grads(exact, hidden, weight, bias, target, z_loss=1e-3)
    assert_same(got, want, torch.float32)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5])
def test_bad_chunk_size(chunk_size):
    hidden, weight, bias, target = make_inputs(5, 3, 4)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        fused(hidden, weight, target, bias, chunk_size=chunk_size)


def test_auto_chunk_size():
    sizes = [linear_chunked.auto_chunk_size(v, 1024, torch.float32) for v in (512, 32768, 262144)]
    assert sizes == sorted(sizes, reverse=True)
    assert all(s % 32 == 0 and s >= linear_chunked.MIN_CHUNK_ROWS for s in sizes)
    bf16 = linear_chunked.auto_chunk_size(32768, 1024, torch.bfloat16)
    assert bf16 >= linear_chunked.auto_chunk_size(32768, 1024, torch.float32)


def test_memory_does_not_grow_with_tokens():
    assert_memory_does_not_grow_with_tokens(
        "    loss = xentkit.linear_cross_entropy(\n"
        "        hidden, weight, target, backend=backend, chunk_size=256\n"
        "    )\n"
        "    loss.backward()"
    )


def test_class_weight_requiring_grad_runs_the_reference():
    """The fused kernels differentiate the logits only; a class weight that needs a gradient
    gets the exact path, whatever the backend asked for."""
    hidden = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    class_weight = (torch.rand(7, dtype=torch.float64) + 0.5).requires_grad_()
    target = torch.tensor([0, 6, -100, 3, 3])

    def fn(h, w, cw):
        return xentkit.linear_cross_entropy(h, w, target, class_weight=cw, backend="chunked")

    assert torch.autograd.gradcheck(fn, (hidden, weight, class_weight))


@pytest.mark.parametrize("failed", [False, True])
def test_chunk_gradient_overwrites_its_logits_unless_that_failed_to_compile(monkeypatch, failed):
    """One chunk buffer on the CPU (the row kernel writes the gradient over the logits); a
    second one only once compiling that in-place kernel has failed in this process."""
    from xentkit.kernels import chunked

    monkeypatch.setattr(chunked, "_inplace_compile_failed", failed)
    made = []
    for name in ("buffer", "workspace"):
        make = getattr(linear_chunked.Problem, name)

        def counted(self, make=make):
            made.append(1)
            return make(self)

        monkeypatch.setattr(linear_chunked.Problem, name, counted)
    h = torch.randn(40, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    target = torch.randint(30, (40,))
    loss = xentkit.linear_cross_entropy(h, w, target, chunk_size=16)
    got = torch.autograd.grad(loss, (h, w))
    want = torch.autograd.grad(F.cross_entropy(h @ w.T, target), (h, w))
    assert len(made) == (2 if failed else 1)
    for g, x in zip(got, want, strict=True):
        torch.testing.assert_close(g, x)


def test_automatic_chunks_are_even():
    """The automatic size sets how many chunks; they are then of equal size (no short last
    chunk). An explicit ``chunk_size`` is taken as it is."""
    hidden, weight, _, target = make_inputs(5048, 64, 32768, dtype=torch.float32, bias=False)
    rows = linear_chunked.auto_chunk_size(32768, 64, torch.float32)
    sizes = [len(t) for _, _, t in linear_chunked.Problem(
        hidden, weight, target, None, None, -100, 0.0, 0.0, None, None
    ).chunks()]  # fmt: skip
    assert len(sizes) == -(-5048 // rows) > 1 and sum(sizes) == 5048
    assert max(sizes) - min(sizes) <= 1
    explicit = linear_chunked.Problem(
        hidden, weight, target, None, None, -100, 0.0, 0.0, None, 1000
    )  # fmt: skip
    assert [len(t) for _, _, t in explicit.chunks()] == [1000] * 5 + [48]


def test_chunk_buffer_is_kept_between_calls(monkeypatch):
    """On the CPU the chunk buffer is the workspace: mapped by the first call, reused by the
    next ones, freed by ``xentkit.empty_cache()``."""
    from xentkit.kernels import _memory

    xentkit.empty_cache()
    mapped = []
    large_empty = _memory.large_empty

    def counted(shape, dtype, device):
        mapped.append(shape)
        return large_empty(shape, dtype, device)

    monkeypatch.setattr(_memory, "large_empty", counted)
    hidden, weight, bias, target = make_inputs(40, 8, 30, dtype=torch.float32)
    for _ in range(3):
        loss = xentkit.linear_cross_entropy(hidden, weight, target, bias, chunk_size=16)
        loss.backward()
    assert len(mapped) == 1
    xentkit.empty_cache()
    assert _memory._WORKSPACE.bytes is None


def test_workspace_is_lent_to_one_caller_at_a_time():
    from xentkit.kernels import _memory

    cpu = torch.device("cpu")
    with (
        _memory.workspace((4, 8), torch.float32, cpu) as first,
        _memory.workspace((4, 8), torch.float32, cpu) as second,
    ):
        assert second.data_ptr() != first.data_ptr()  # a fresh one while it is lent
    with _memory.workspace((2, 8), torch.bfloat16, cpu) as again:
        assert again.data_ptr() == first.data_ptr() and again.dtype == torch.bfloat16
    with _memory.workspace((100, 8), torch.float32, cpu) as larger:
        assert larger.shape == (100, 8)
        larger.fill_(1.0)
    assert _memory._WORKSPACE.bytes.numel() >= 100 * 8 * 4


def test_cached_empty_reuses_a_mapping_once_its_tensors_are_dead():
    """The weight gradient's memory: a mapping that outlives its tensor and serves the next one
    of its size, never while the tensor or a view of it lives."""
    from xentkit.kernels import _memory

    cpu, shape = torch.device("cpu"), (4096, 2048)  # 32 MiB of float32: cached
    xentkit.empty_cache()
    first = _memory.cached_empty(shape, torch.float32, cpu)
    first.fill_(7.0)
    address = first.data_ptr()
    second = _memory.cached_empty(shape, torch.float32, cpu)
    assert second.data_ptr() != address  # in use
    view = first[5:6]
    del first
    third = _memory.cached_empty(shape, torch.float32, cpu)
    assert third.data_ptr() != address and bool((view == 7.0).all())  # a view keeps it
    del view, second, third
    again = _memory.cached_empty(shape, torch.float32, cpu)
    assert again.data_ptr() == address and again.shape == shape
    del again
    assert _memory.cached_empty((3, 4), torch.float32, cpu).shape == (3, 4)  # small: plain
    xentkit.empty_cache()
    assert _memory._CACHE.entries == []


def test_weight_gradients_held_by_the_caller_are_never_reused():
    hidden, weight, _, target = make_inputs(8, 512, 16384, dtype=torch.float32, bias=False)
    first = torch.autograd.grad(fused(hidden, weight, target), (weight,))[0]
    kept = first.clone()
    second = torch.autograd.grad(fused(hidden, weight, target), (weight,))[0]
    assert second.data_ptr() != first.data_ptr()
    torch.testing.assert_close(first, kept, rtol=0, atol=0)
    torch.testing.assert_close(second, kept, rtol=0, atol=0)
    address = first.data_ptr()
    del first
    third = torch.autograd.grad(fused(hidden, weight, target), (weight,))[0]
    assert third.data_ptr() == address  # its pages already resident
    torch.testing.assert_close(third, kept, rtol=0, atol=0)
    leaf = weight.detach().requires_grad_()
    for _ in range(2):  # accumulated into .grad, which holds the first step's buffer
        fused(hidden, leaf, target).backward()
    torch.testing.assert_close(leaf.grad, 2 * kept)


def test_concurrent_calls_from_threads():
    """Two threads in the fused head at once: each gets its own chunk buffer."""
    import threading

    hidden, weight, bias, target = make_inputs(64, 8, 50, dtype=torch.float32)
    want = torch.autograd.grad(fused(hidden, weight, target, bias, chunk_size=16), (weight,))[0]
    got = [None] * 4

    def run(k):
        loss = fused(hidden, weight, target, bias, chunk_size=16)
        got[k] = torch.autograd.grad(loss, (weight,))[0]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for g in got:
        torch.testing.assert_close(g, want)
