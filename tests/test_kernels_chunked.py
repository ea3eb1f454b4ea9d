"""The fused chunked cross-entropy kernel against the float64 reference and against PyTorch."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from xentkit import reference
from xentkit.kernels import chunked

DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# Tolerances of a result in `dtype` against the float64 reference: the loss terms are
# accumulated in float32 for every dtype but float64; gradients are rounded to `dtype`.
LOSS_TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1e-5, 1e-6),
}
GRAD_TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1.6e-2, 1e-3),
}


def close(actual, expected, tol):
    rtol, atol = tol
    torch.testing.assert_close(
        actual, expected.to(actual.dtype), rtol=rtol, atol=atol, equal_nan=True
    )


def make_case(gen, m, v, dtype, ignore_frac=0.3, weighted=False, ignore_index=-100):
    logits = (torch.randn(m, v, generator=gen, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, v, (m,), generator=gen)
    target[torch.rand(m, generator=gen) < ignore_frac] = ignore_index
    weight = torch.rand(v, generator=gen, dtype=torch.float64).to(dtype) if weighted else None
    return logits, target, weight


def reference_loss_and_grad(logits, target, weight, ignore_index, eps, z_loss, softcap, a, b):
    """ce, z and the gradient of sum(a * ce + b * z) by autograd through the reference, in
    float64."""
    x = logits.double().requires_grad_()
    w = None if weight is None else weight.double()
    terms = reference.cross_entropy_terms(x, target, w, ignore_index, eps, z_loss, softcap)
    objective = (torch.as_tensor(a, dtype=torch.float64) * terms.ce).sum()
    objective = objective + (torch.as_tensor(b, dtype=torch.float64) * terms.z).sum()
    (grad,) = torch.autograd.grad(objective, x)
    return terms.ce.detach(), terms.z.detach(), grad


options = st.fixed_dictionaries(
    {
        "m": st.integers(0, 9),
        "v": st.integers(1, 11),
        "dtype": st.sampled_from(DTYPES),
        "weighted": st.booleans(),
        "ignore_index": st.sampled_from([-100, 0, 2]),
        "eps": st.sampled_from([0.0, 0.1, 1.0]),
        "z_loss": st.sampled_from([0.0, 1e-2]),
        "softcap": st.sampled_from([None, 2.0]),
        "scales": st.sampled_from(["scalar", "rows", "tensor"]),
        "out": st.sampled_from(["new", "buffer", "inplace"]),
    }
)


@given(options)
def test_loss_and_grad_matches_reference(o):
    gen = torch.Generator().manual_seed(o["m"] * 100 + o["v"])
    m, v, dtype = o["m"], o["v"], o["dtype"]
    logits, target, weight = make_case(gen, m, v, dtype, 0.3, o["weighted"], o["ignore_index"])
    if o["scales"] == "rows":
        a, b = torch.rand(m, generator=gen), torch.rand(m, generator=gen)
    elif o["scales"] == "tensor":
        a, b = torch.tensor(0.25), torch.tensor(3.0)
    else:
        a, b = 0.5, 2.0
    args = (target, weight, o["ignore_index"], o["eps"], o["z_loss"], o["softcap"])
    expected = reference_loss_and_grad(logits, *args, a, b)

    given_logits = logits.clone()
    out = {"new": None, "buffer": torch.empty_like(logits), "inplace": given_logits}[o["out"]]
    ce, z, grad = chunked.loss_and_grad(given_logits, *args, a, b, out=out)
    acc = reference.accumulation_dtype(dtype)
    assert ce.dtype == z.dtype == acc and grad.dtype == dtype and grad.shape == (m, v)
    close(ce, expected[0], LOSS_TOL[dtype])
    close(z, expected[1], LOSS_TOL[dtype])
    close(grad, expected[2], GRAD_TOL[dtype])
    if out is not None:
        assert grad.data_ptr() == out.data_ptr()
    else:
        assert torch.equal(given_logits, logits)  # the input is left alone


def test_loss_and_grad_without_scale_computes_no_gradient():
    logits, target, _ = make_case(torch.Generator().manual_seed(0), 5, 7, torch.float32)
    ce, _, grad = chunked.loss_and_grad(logits, target, None, -100, 0.0, 0.0, None, None)
    assert grad is None
    close(ce, reference.cross_entropy_terms(logits.double(), target).ce, LOSS_TOL[torch.float32])
