"""PyTorch's own OpInfo sample inputs for the six functions, run through xentkit and compared
with torch for values and gradients."""

from __future__ import annotations

import pytest
import torch

import xentkit

opinfo = pytest.importorskip(
    "torch.testing._internal.common_methods_invocations", reason="needs expecttest (dev extra)"
)

OURS = {
    "softmax": xentkit.softmax,
    "log_softmax": xentkit.log_softmax,
    "nn.functional.cross_entropy": xentkit.cross_entropy,
    "nn.functional.nll_loss": xentkit.nll_loss,
    "nn.functional.binary_cross_entropy": xentkit.binary_cross_entropy,
    "nn.functional.binary_cross_entropy_with_logits": xentkit.binary_cross_entropy_with_logits,
}
OPS = [op for op in opinfo.op_db if op.name in OURS]


def _grads(out, inputs):
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not leaves or not out.requires_grad:
        return []
    return torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", OPS, ids=[f"{op.name}-{op.variant_test_name}" for op in OPS])
def test_opinfo_samples_match_torch(op, dtype):
    ours = OURS[op.name]
    samples = list(op.sample_inputs("cpu", dtype, requires_grad=True))
    assert samples
    for sample in samples:
        inputs = [sample.input, *sample.args, *sample.kwargs.values()]
        want = op.op(sample.input, *sample.args, **sample.kwargs)
        got = ours(sample.input, *sample.args, **sample.kwargs)
        assert got.dtype == want.dtype and got.shape == want.shape, sample
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
        torch.testing.assert_close(got, want, equal_nan=True, **tol)
        for a, b in zip(_grads(got, inputs), _grads(want, inputs), strict=True):
            if b is not None:
                torch.testing.assert_close(a, b, equal_nan=True, **tol)
