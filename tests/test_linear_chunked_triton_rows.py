"""The chunked linear cross entropy with Triton's row kernel (its CUDA row pass), run through
Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set by conftest.py) by forcing
``linear_chunked.ROW_KERNEL = "triton"``, against the float64 reference and PyTorch.

The row kernel's vocabulary block is shrunk to 16 and the chunks to a few rows, so that the
small inputs span several blocks and several chunks, most of them not full.
"""

from __future__ import annotations

import types

import pytest

pytest.importorskip(
    "triton", reason="Triton is not installed (an optional dependency: pip install triton)"
)

import torch
import torch.nn.functional as F

import xentkit
from xentkit import reference
from xentkit.kernels import chunked, linear_chunked
from xentkit.kernels import triton as kernels

pytestmark = pytest.mark.triton

# (rtol, atol) of the loss and of the gradients (atol relative to the largest entry) against
# the float64 reference of the same rounded inputs.
TOL = {
    torch.float64: ((1e-10, 1e-12), (1e-10, 1e-12)),
    torch.float32: ((1e-5, 1e-6), (1e-5, 1e-6)),
    torch.bfloat16: ((1e-5, 1e-6), (2e-2, 1e-2)),
}
# Every option alone, then all together (with a class weight, a bias and ignored tokens).
OPTIONS = {
    "plain": {},
    "ignore_index": {"ignore_index": 3},
    "class_weight": {"class_weight": True},
    "label_smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 4.0},
    "all": {"class_weight": True, "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 4.0},
}


@pytest.fixture(autouse=True)
def triton_rows(monkeypatch):
    """Chunks run Triton's row kernel, with vocabulary blocks of 16."""
    monkeypatch.setattr(linear_chunked, "ROW_KERNEL", "triton")
    monkeypatch.setattr(kernels, "CE_MAX_BLOCK_V", 16)


def case(dtype, m=19, v=37, d=12, bias=True, seed=0):
    """Hidden states, a classifier, a bias, and targets with every fourth one ignored."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, d, generator=gen, dtype=torch.float64).to(dtype)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(v, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    target = torch.randint(v, (m,), generator=gen)
    target[::4] = -100
    class_weight = torch.rand(v, generator=gen, dtype=torch.float64) + 0.5
    return hidden, weight, b, target, class_weight


def loss_and_grads(fn, inputs, reduction, seed=1):
    """The loss and the gradients of ``fn(*inputs)`` (a fixed random ``grad_output`` for
    ``reduction="none"``)."""
    inputs = [x.detach().requires_grad_() for x in inputs]
    loss = fn(*inputs)
    grad_out = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad(loss, inputs, grad_out.to(loss.dtype))
    return loss.detach(), grads


def close(got, want, tol):
    rtol, atol = tol
    want = want.to(got.dtype)
    atol *= max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def check(dtype, reduction, options, chunk_size=4, **shape):
    hidden, weight, bias, target, class_weight = case(dtype, **shape)
    options = dict(options)
    cw = class_weight.to(torch.float32 if dtype == torch.bfloat16 else dtype)
    cw = cw if options.pop("class_weight", False) else None
    ignore_index = options.get("ignore_index", -100)
    if ignore_index != -100:
        target[target == -100] = ignore_index
    eps = options.get("label_smoothing", 0.0)
    z_loss, softcap = options.get("z_loss", 0.0), options.get("softcap")
    args = (ignore_index, reduction, eps, z_loss, softcap)

    def fused(h, w, b):
        return linear_chunked.linear_cross_entropy(h, w, target, b, cw, *args, chunk_size)

    def want(h, w, b):
        # The head in the inputs' dtype, as the chunked path multiplies: the same rounded logits.
        logits = F.linear(h, w, b).double()
        weights = None if cw is None else cw.double()
        return reference.cross_entropy(logits, target, weights, *args)

    loss_tol, grad_tol = TOL[dtype]
    got_loss, got_grads = loss_and_grads(fused, [hidden, weight, bias], reduction)
    want_loss, want_grads = loss_and_grads(want, [hidden, weight, bias], reduction)
    close(got_loss, want_loss, loss_tol)
    for got, expected in zip(got_grads, want_grads, strict=True):
        assert got.dtype == dtype
        close(got, expected, grad_tol)


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(reduction, option):
    check(torch.float64, reduction, OPTIONS[option])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_and_single_precision(dtype, reduction):
    check(dtype, reduction, OPTIONS["all"])


def test_one_chunk_and_uneven_chunks():
    check(torch.float64, "mean", OPTIONS["all"], chunk_size=64)
    check(torch.float64, "sum", OPTIONS["all"], chunk_size=7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_target_ignored(reduction):
    """No chunk at all: the loss of PyTorch (NaN for the mean), zero gradients."""
    hidden, weight, bias, target, _ = case(torch.float64, m=5)
    target[:] = -100
    got, grads = loss_and_grads(
        lambda h, w, b: xentkit.linear_cross_entropy(h, w, target, b, reduction=reduction),
        [hidden, weight, bias],
        reduction,
    )
    want = F.cross_entropy(F.linear(hidden, weight, bias), target, reduction=reduction)
    torch.testing.assert_close(got, want, equal_nan=True)
    assert all(not g.any() for g in grads)


def test_same_as_the_torch_ops_row_kernel(monkeypatch):
    """The two row kernels give the same loss and gradients, bit for bit up to float64
    rounding, through the public function and its default chunk size."""
    hidden, weight, bias, target, class_weight = case(torch.float64, m=33, v=50)
    options = dict(class_weight=class_weight, label_smoothing=0.05, z_loss=1e-3, softcap=6.0)

    def run():
        return loss_and_grads(
            lambda h, w, b: xentkit.linear_cross_entropy(h, w, target, b, **options),
            [hidden, weight, bias],
            "mean",
        )

    triton_loss, triton_grads = run()
    monkeypatch.setattr(linear_chunked, "ROW_KERNEL", "chunked")
    torch_loss, torch_grads = run()
    torch.testing.assert_close(triton_loss, torch_loss, rtol=1e-12, atol=1e-12)
    for got, want in zip(triton_grads, torch_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_row_pass_matches_loss_and_grad():
    """The seam itself: ``triton_loss_and_grad`` returns what ``chunked.loss_and_grad``
    returns, for a scalar and a per-row scale, writing over the logits or not."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    target = torch.tensor([0, 39, -100, 5, 17, 3])
    weight = torch.rand(40, generator=gen, dtype=torch.float64)
    options = (weight, -100, 0.1, 1e-2, 3.0)
    for scale in (None, 0.5, torch.rand(6, generator=gen, dtype=torch.float64)):
        want = chunked.loss_and_grad(logits.clone(), target, *options, scale, scale)
        buffer = logits.clone()
        got = linear_chunked.triton_loss_and_grad(buffer, target, *options, scale, scale, buffer)
        for g, w in zip(got, want, strict=True):
            if w is None:
                assert g is None
            else:
                torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
        if scale is not None:
            assert got[2].data_ptr() == buffer.data_ptr()  # in place


def test_per_row_scales_must_agree_with_z_loss():
    logits, target = torch.randn(3, 8), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="per-row ce_scale"):
        linear_chunked.triton_loss_and_grad(
            logits, target, None, -100, 0.0, 1e-2, None, torch.ones(3), torch.ones(3)
        )


def test_row_kernel_by_device(monkeypatch):
    """By default the row pass is Triton's on CUDA tensors only; CPU tensors keep the torch-ops
    kernel."""
    monkeypatch.setattr(linear_chunked, "ROW_KERNEL", None)
    assert linear_chunked._row_kernel(torch.empty(2, 3)) is chunked.loss_and_grad
    cuda_like = types.SimpleNamespace(is_cuda=True)
    assert linear_chunked._row_kernel(cuda_like) is linear_chunked.triton_loss_and_grad
    monkeypatch.setattr(linear_chunked, "_TRITON_INSTALLED", False)
    assert linear_chunked._row_kernel(cuda_like) is chunked.loss_and_grad


def test_cuda_chunks_are_sized_for_the_matrix_products():
    """On CUDA a chunk is about CUDA_CHUNK_BYTES of logits, whatever the hidden size; on the CPU
    about CHUNK_BYTES of logits, hidden rows and their gradient, and at least MIN_CHUNK_ROWS
    rows."""
    bf16 = torch.bfloat16
    assert linear_chunked.auto_chunk_size(128256, 4096, bf16, "cuda") == 4096
    assert linear_chunked.auto_chunk_size(256000, 4096, bf16, "cuda") == 2048
    assert linear_chunked.auto_chunk_size(2**22, 4096, torch.float32, "cuda") == 1024
    assert linear_chunked.auto_chunk_size(128256, 4096, bf16) == 2048  # CPU: MIN_CHUNK_ROWS
    assert linear_chunked.auto_chunk_size(128256, 256, bf16) == 2048
    assert linear_chunked.auto_chunk_size(8192, 256, bf16) == 7680  # CHUNK_BYTES
