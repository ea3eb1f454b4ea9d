"""Triton kernels for CUDA: fused cross entropy and fused linear cross entropy.

Two fast paths, each a ``torch.library`` custom op around Triton kernels (opaque to
``torch.compile``, with fake implementations and registered backwards; no host synchronisation,
so they can be captured in CUDA graphs):

* :func:`cross_entropy` over ``(M, V)`` logits: one program per row sweeps the row twice,
  first for the log-sum-exp (an online maximum and sum over vocabulary blocks) and the loss,
  then for the gradient, which it writes in the forward pass (into the logits' own storage
  with ``inplace_backward``); the backward pass only scales it by ``grad_output``.
* :func:`linear_cross_entropy` of hidden states ``(M, D)`` and a classifier ``(V, D)``: the
  forward kernel multiplies hidden-state tiles by classifier tiles and keeps only each row's
  log-sum-exp and loss, never the ``M x V`` logits; the backward kernel recomputes the logit
  tiles and accumulates the gradients of the input and of the weight in float32, skipping
  tiles whose softmax values are all below ``filter_eps`` (as Apple's Cut Cross-Entropy does).

The loss terms are those of :func:`xentkit.reference.cross_entropy_terms` and the reductions
those of :func:`xentkit.reference.reduce_cross_entropy`; the tests hold both kernels to them.
Sums are accumulated in float32 (float64 for float64 input).

The kernels need CUDA tensors, or ``TRITON_INTERPRET=1`` in the environment before Triton is
first imported: then they run on CPU tensors through Triton's interpreter (slowly; that is
how the tests run them without a GPU).

Example:
    >>> import torch
    >>> from xentkit.kernels import triton as kernels
    >>> logits = torch.tensor([[1.0, 0.5, 2.0], [0.5, 3.0, 1.0]], requires_grad=True)
    >>> target = torch.tensor([2, 1])
    >>> loss = kernels.cross_entropy(logits, target, None, -100, "mean", 0.0, 0.0, None, False)
    >>> loss.detach()
    tensor(0.3306)
    >>> loss.backward()
    >>> logits.grad
    tensor([[ 0.1156,  0.0701, -0.1857],
            [ 0.0337, -0.0893,  0.0556]])
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from xentkit import reference
from xentkit.kernels._fused_op import fused_cross_entropy, no_class_weight_derivative

# The kernels below are Python functions run on CPU tensors, not compiled for a GPU, when
# TRITON_INTERPRET was set as this module was imported (Triton decides at decoration time).
INTERPRETED = triton.knobs.runtime.interpret

# Vocabulary block of the cross-entropy kernel: a row is read in blocks of at most this many
# logits (a power of two; smaller rows use one block rounded up to a power of two).
CE_MAX_BLOCK_V = 8192

# Tiles of the linear kernels, by the inputs' element size: rows (tokens), classes and hidden
# features per step (tl.dot needs powers of two, at least 16), with 8 warps. Untuned (no GPU
# was at hand): the largest tiles that compile for sm_90 without register spills to speak of.
LINEAR_TILES = {2: (64, 64, 64), 4: (64, 64, 32), 8: (32, 64, 32)}
LINEAR_WARPS = 8

# The default of linear_cross_entropy's ``filter_eps``: float32's machine epsilon / 32
# (2**-28), the value Cut Cross-Entropy's "auto" picks for float32.
FILTER_EPS = torch.finfo(torch.float32).eps / 32

# Order of the per-call constants the kernels load from one small tensor, in the accumulation
# dtype (a float argument would reach the kernel as float32 whatever the data's dtype). Kernels
# may only read globals that are tl.constexpr.
_CE_SCALE, _Z_SCALE, _TOTAL_WEIGHT, _SMOOTHING, _Z_LOSS, _SOFTCAP = map(tl.constexpr, range(6))


@triton.jit
def _softcap(x, softcap):
    """``softcap * tanh(x / softcap)``, with tanh as ``(1 - e) / (1 + e)``, ``e = exp(-2|y|)``:
    it never overflows, and Triton's interpreter has no libdevice tanh."""
    e = tl.exp(-2.0 * tl.abs(x) / softcap)
    t = (1.0 - e) / (1.0 + e)
    return softcap * tl.where(x < 0, -t, t)


# ---------------------------------------------------------------- per-row statistics
# The Triton transcription of xentkit.kernels.row_stats: a block's statistics and the merge of
# two blocks, used by the head-output row kernels below (tests hold them to row_stats).


@triton.jit
def _shift(m):
    """:func:`xentkit.kernels.row_stats.shift`: the maximum, 0 where it is -inf."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _block_stats(x, AXIS: tl.constexpr, HAS_X: tl.constexpr, HAS_Q: tl.constexpr):
    """:func:`xentkit.kernels.row_stats.block` of logits ``x`` (-inf where masked) along
    ``AXIS``: the maximum ``m``, ``S``, and (else 0) ``X`` (relative to the shift) and ``Q``."""
    m = tl.max(x, AXIS)
    shifted = x - tl.expand_dims(_shift(m), AXIS)
    e = tl.exp(shifted)
    s = tl.sum(e, AXIS)
    xx = tl.zeros_like(s)
    q = tl.zeros_like(s)
    if HAS_X:
        floored = tl.maximum(shifted, -1e4)  # reference.LOG_PROB_FLOOR: 0 * -inf would be NaN
        xx = tl.sum(e * floored, AXIS)
    if HAS_Q:
        q = tl.sum(e * e, AXIS)
    return m, s, xx, q


@triton.jit
def _merge(m_a, s_a, x_a, q_a, m_b, s_b, x_b, q_b):
    """:func:`xentkit.kernels.row_stats.merge` of block ``a`` and the next block ``b``."""
    m = tl.maximum(m_a, m_b)
    new = _shift(m)
    scale_a = tl.where(m_a == float("-inf"), 0.0, tl.exp(_shift(m_a) - new))
    scale_b = tl.where(m_b == float("-inf"), 0.0, tl.exp(_shift(m_b) - new))
    s = s_a * scale_a + s_b * scale_b
    x = scale_a * (x_a + s_a * (_shift(m_a) - new)) + scale_b * (x_b + s_b * (_shift(m_b) - new))
    q = q_a * scale_a * scale_a + q_b * scale_b * scale_b
    return m, s, x, q


@triton.jit
def _row_loss(lse, x_t, sum_wx, w_t, counted, consts_ptr, num_classes, HAS_SMOOTHING, HAS_Z):
    r"""Per-row ``(ce, z)`` of :func:`xentkit.reference.cross_entropy_terms` from the row's
    log-sum-exp, target logit, :math:`\sum_c w_c x'_c` and target weight:
    :math:`\mathrm{ce} = (1-\varepsilon) w_t (\mathrm{lse} - x'_t)
    + \tfrac{\varepsilon}{C} (W\,\mathrm{lse} - \sum_c w_c x'_c)`, :math:`z = z\,\mathrm{lse}^2`,
    both 0 where the row is not counted."""
    ce = w_t * (lse - x_t)
    if HAS_SMOOTHING:
        eps = tl.load(consts_ptr + _SMOOTHING)
        total_w = tl.load(consts_ptr + _TOTAL_WEIGHT)
        ce = (1 - eps) * ce + eps * (total_w * lse - sum_wx) / num_classes
    z = tl.zeros_like(lse)
    if HAS_Z:
        z = tl.load(consts_ptr + _Z_LOSS) * lse * lse
    return tl.where(counted, ce, 0.0), tl.where(counted, z, 0.0)


@triton.jit
def _logit_grad(
    x, p, is_target, w, w_t, lse, a, b, consts_ptr, num_classes, HAS_SMOOTHING, HAS_Z, HAS_SOFTCAP
):
    r"""Gradient of :math:`a\,\mathrm{ce} + b\,z` with respect to the logits before softcap:

    .. math:: p_j\big(a((1-\varepsilon)w_t + \varepsilon W / C) + 2 b z\,\mathrm{lse}\big)
              - a\big((1-\varepsilon)\,w_t [j = t] + \varepsilon\, w_j / C\big)

    times :math:`1 - (x'_j/c)^2` with a softcap (``x`` is the capped logit :math:`x'`)."""
    if HAS_SMOOTHING:
        eps = tl.load(consts_ptr + _SMOOTHING)
        total_w = tl.load(consts_ptr + _TOTAL_WEIGHT)
        target_w = (1 - eps) * w_t
        grad = p * (a * (target_w + eps * total_w / num_classes)) - a * (eps * w / num_classes)
        grad -= tl.where(is_target, a * target_w, 0.0)
    else:
        grad = p * (a * w_t) - tl.where(is_target, a * w_t, 0.0)
    if HAS_Z:
        grad += p * (2 * b * tl.load(consts_ptr + _Z_LOSS) * lse)
    if HAS_SOFTCAP:
        capped = x / tl.load(consts_ptr + _SOFTCAP)
        grad *= 1 - capped * capped
    return grad


@triton.jit
def _cross_entropy_kernel(
    logits_ptr,
    logits_stride,
    grad_ptr,
    grad_stride,
    target_ptr,
    weight_ptr,
    consts_ptr,
    ce_ptr,
    z_ptr,
    num_classes,
    ignore_index,
    ACC: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One row: its loss terms, then (``COMPUTE_GRAD``) its scaled gradient, possibly over the
    logits themselves (``grad_ptr == logits_ptr``: each block is read before it is written)."""
    # int64 offsets: M * V passes 2**31 at LM sizes.
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * logits_stride
    softcap = tl.load(consts_ptr + _SOFTCAP)
    target = tl.load(target_ptr + row)
    counted = target != ignore_index
    safe_target = tl.where(counted, target, 0)
    x_t = tl.load(logits_ptr + safe_target).to(ACC)
    if HAS_SOFTCAP:
        x_t = _softcap(x_t, softcap)
    w_t = tl.where(counted, 1.0, 0.0).to(ACC)
    if HAS_WEIGHT:
        w_t *= tl.load(weight_ptr + safe_target).to(ACC)

    # Sweep 1: online log-sum-exp, each block's statistics merged into the running ones as
    # row_stats describes (an all -inf row keeps lse = -inf, never NaN).
    m = tl.full((), float("-inf"), ACC)
    s = tl.zeros((), ACC)
    sum_wx = tl.zeros((), ACC)
    for start in range(0, num_classes, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < num_classes
        x = tl.load(logits_ptr + cols, mask=mask, other=0.0).to(ACC)
        if HAS_SOFTCAP:
            x = _softcap(x, softcap)
        x = tl.where(mask, x, float("-inf"))
        m_b, s_b, _, _ = _block_stats(x, 0, False, False)
        m, s, _, _ = _merge(m, s, 0.0, 0.0, m_b, s_b, 0.0, 0.0)
        if HAS_SMOOTHING:
            w = 1.0
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(ACC)
            sum_wx += tl.sum(w * tl.where(mask, x, 0.0), 0)  # masked x: -inf, w: 0
    lse = _shift(m) + tl.log(s)
    ce, z = _row_loss(lse, x_t, sum_wx, w_t, counted, consts_ptr, num_classes, HAS_SMOOTHING, HAS_Z)
    tl.store(ce_ptr + row, ce)
    tl.store(z_ptr + row, z)

    if COMPUTE_GRAD:
        # Sweep 2: the gradient, already scaled by the reduction (1 / denominator for a mean).
        grad_ptr += row * grad_stride
        # 0 for an ignored row, whose scale may be 1 / 0 (a mean over no counted row).
        a = tl.where(counted, tl.load(consts_ptr + _CE_SCALE), 0.0)
        b = tl.where(counted, tl.load(consts_ptr + _Z_SCALE), 0.0)
        for start in range(0, num_classes, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < num_classes
            x = tl.load(logits_ptr + cols, mask=mask, other=0.0).to(ACC)
            if HAS_SOFTCAP:
                x = _softcap(x, softcap)
            w = 1.0
            if HAS_WEIGHT and HAS_SMOOTHING:
                w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(ACC)
            p = tl.exp(x - lse)
            grad = _logit_grad(
                x, p, cols == target, w, w_t, lse, a, b, consts_ptr, num_classes,
                HAS_SMOOTHING, HAS_Z, HAS_SOFTCAP,
            )  # fmt: skip
            # An ignored row has zero gradient, even where its logits make p NaN (all -inf).
            grad = tl.where(counted, grad, 0.0)
            tl.store(grad_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _soft_block(
    logits_ptr,
    y_ptr,
    weight_ptr,
    cols,
    mask,
    softcap,
    eps,
    num_classes,
    ACC: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """A block of a row's capped logits :math:`x'` and weighted, smoothed targets
    :math:`u = w((1-\varepsilon) y + \varepsilon / V)` (0 past the row)."""
    x = tl.load(logits_ptr + cols, mask=mask, other=0.0).to(ACC)
    if HAS_SOFTCAP:
        x = _softcap(x, softcap)
    u = tl.load(y_ptr + cols, mask=mask, other=0.0).to(ACC)
    if HAS_SMOOTHING:
        u = (1 - eps) * u + eps / num_classes
    if HAS_WEIGHT:
        u *= tl.load(weight_ptr + cols, mask=mask, other=0.0).to(ACC)
    return x, tl.where(mask, u, 0.0)


@triton.jit
def _soft_cross_entropy_kernel(
    logits_ptr,
    logits_stride,
    grad_ptr,
    grad_stride,
    y_ptr,
    y_stride,
    weight_ptr,
    consts_ptr,
    ce_ptr,
    z_ptr,
    num_classes,
    ACC: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    r"""One row with probability targets :math:`y`: with :math:`u = w((1-\varepsilon) y +
    \varepsilon / V)`, its loss :math:`\sum_j u_j (\mathrm{lse} - x'_j)` and z-loss (sweep 1,
    the log-sum-exp by row_stats' block merge), then (``COMPUTE_GRAD``) its gradient
    :math:`p_j (a U + 2 b z\,\mathrm{lse}) - a u_j` times the softcap's derivative (sweep 2),
    where :math:`U = \sum_j u_j` (:func:`xentkit.kernels.chunked._soft_rows` in torch ops)."""
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * logits_stride
    y_ptr += row * y_stride
    softcap = tl.load(consts_ptr + _SOFTCAP)
    eps = tl.load(consts_ptr + _SMOOTHING)
    m = tl.full((), float("-inf"), ACC)
    s = tl.zeros((), ACC)
    total_u = tl.zeros((), ACC)
    total_ux = tl.zeros((), ACC)
    for start in range(0, num_classes, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < num_classes
        x, u = _soft_block(
            logits_ptr, y_ptr, weight_ptr, cols, mask, softcap, eps, num_classes,
            ACC, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP,
        )  # fmt: skip
        total_u += tl.sum(u, 0)
        total_ux += tl.sum(tl.where(mask, u * x, 0.0), 0)
        m_b, s_b, _, _ = _block_stats(tl.where(mask, x, float("-inf")), 0, False, False)
        m, s, _, _ = _merge(m, s, 0.0, 0.0, m_b, s_b, 0.0, 0.0)
    lse = _shift(m) + tl.log(s)
    tl.store(ce_ptr + row, total_u * lse - total_ux)
    z = tl.zeros_like(lse)
    if HAS_Z:
        z = tl.load(consts_ptr + _Z_LOSS) * lse * lse
    tl.store(z_ptr + row, z)

    if COMPUTE_GRAD:
        grad_ptr += row * grad_stride
        a = tl.load(consts_ptr + _CE_SCALE)
        coef = a * total_u
        if HAS_Z:
            coef += 2 * tl.load(consts_ptr + _Z_SCALE) * tl.load(consts_ptr + _Z_LOSS) * lse
        for start in range(0, num_classes, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < num_classes
            x, u = _soft_block(
                logits_ptr, y_ptr, weight_ptr, cols, mask, softcap, eps, num_classes,
                ACC, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP,
            )  # fmt: skip
            grad = tl.exp(x - lse) * coef - a * u
            if HAS_SOFTCAP:
                capped = x / softcap
                grad *= 1 - capped * capped
            tl.store(grad_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _logits_tile(
    h_ptr,
    h_stride,
    w_ptr,
    w_stride,
    bias_ptr,
    rows,
    cols,
    row_mask,
    col_mask,
    dim,
    softcap,
    ACC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The ``(BLOCK_M, BLOCK_V)`` tile of capped logits ``softcap(h @ w.T + bias)`` in ``ACC``;
    -inf in the columns past the vocabulary. ``DOT`` is the dtype the tiles are multiplied in
    (see :func:`_linear_launch`)."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), ACC)
    for start in range(0, dim, BLOCK_D):
        ds = start + tl.arange(0, BLOCK_D)
        d_mask = ds < dim
        h = tl.load(
            h_ptr + rows[:, None] * h_stride + ds[None, :],
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        ).to(DOT)
        w = tl.load(
            w_ptr + cols[:, None] * w_stride + ds[None, :],
            mask=col_mask[:, None] & d_mask[None, :],
            other=0.0,
        ).to(DOT)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
    if HAS_SOFTCAP:
        acc = _softcap(acc, softcap)
    return tl.where(col_mask[None, :], acc, float("-inf"))


@triton.jit
def _linear_forward_kernel(
    h_ptr,
    h_stride,
    w_ptr,
    w_stride,
    bias_ptr,
    target_ptr,
    class_weight_ptr,
    consts_ptr,
    lse_ptr,
    ce_ptr,
    z_ptr,
    entropy_ptr,
    top_ptr,
    num_rows,
    num_classes,
    dim,
    ignore_index,
    ACC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_STATS: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``BLOCK_M`` rows: online log-sum-exp over vocabulary tiles; writes each row's lse and
    loss terms (and with ``HAS_STATS`` its entropy and whether the target is the first
    argmax), never the logits."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    target = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index)
    counted = (target != ignore_index) & row_mask
    softcap = tl.load(consts_ptr + _SOFTCAP)

    m = tl.full((BLOCK_M,), float("-inf"), ACC)
    s = tl.zeros((BLOCK_M,), ACC)
    xx = tl.zeros((BLOCK_M,), ACC)
    best = tl.zeros((BLOCK_M,), tl.int64)
    x_t = tl.zeros((BLOCK_M,), ACC)
    sum_wx = tl.zeros((BLOCK_M,), ACC)
    for start in range(0, num_classes, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < num_classes
        x = _logits_tile(
            h_ptr, h_stride, w_ptr, w_stride, bias_ptr, rows, cols, row_mask, col_mask, dim,
            softcap, ACC, HAS_BIAS, HAS_SOFTCAP, DOT, PRECISION, BLOCK_M, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        # As in the cross-entropy kernel (a bias of -inf masks classes: a whole tile of a row
        # can be -inf).
        m_b, s_b, x_b, _ = _block_stats(x, 1, HAS_STATS, False)
        if HAS_STATS:
            # The first maximum: a later tile wins only with a strictly larger maximum.
            first = start + tl.argmax(x, 1, tie_break_left=True).to(tl.int64)
            best = tl.where(m_b > m, first, best)
        m, s, xx, _ = _merge(m, s, xx, 0.0, m_b, s_b, x_b, 0.0)
        x_t += tl.sum(tl.where(cols[None, :] == target[:, None], x, 0.0), 1)
        if HAS_SMOOTHING:
            w = 1.0
            if HAS_WEIGHT:
                w = tl.load(class_weight_ptr + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
            sum_wx += tl.sum(w * tl.where(col_mask[None, :], x, 0.0), 1)
    lse = _shift(m) + tl.log(s)
    if HAS_STATS:
        tl.store(entropy_ptr + rows, tl.log(s) - xx / s, mask=row_mask)
        tl.store(top_ptr + rows, best == target, mask=row_mask)
    w_t = tl.where(counted, 1.0, 0.0).to(ACC)
    if HAS_WEIGHT:
        safe_target = tl.where(counted, target, 0)
        w_t *= tl.load(class_weight_ptr + safe_target, mask=counted, other=0.0).to(ACC)
    ce, z = _row_loss(lse, x_t, sum_wx, w_t, counted, consts_ptr, num_classes, HAS_SMOOTHING, HAS_Z)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(ce_ptr + rows, ce, mask=row_mask)
    tl.store(z_ptr + rows, z, mask=row_mask)


@triton.jit
def _linear_backward_kernel(
    h_ptr,
    h_stride,
    w_ptr,
    w_stride,
    bias_ptr,
    target_ptr,
    class_weight_ptr,
    consts_ptr,
    lse_ptr,
    grad_out_ptr,
    grad_out_stride,
    grad_h_ptr,
    grad_w_ptr,
    grad_b_ptr,
    num_rows,
    num_classes,
    dim,
    ignore_index,
    filter_eps,
    ACC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_FILTER: tl.constexpr,
    GRAD_H: tl.constexpr,
    GRAD_W: tl.constexpr,
    GRAD_B: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``BLOCK_M`` rows: recompute each logit tile, turn it into the tile of the logits'
    gradient ``G`` and accumulate ``grad_h += G @ W`` (rows owned by this program) and
    ``grad_w += G.T @ h``, ``grad_b += sum(G)`` (shared by all programs: atomic adds)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    target = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index)
    counted = (target != ignore_index) & row_mask
    softcap = tl.load(consts_ptr + _SOFTCAP)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    # grad_output is (M,) for reduction "none" and a scalar seen with stride 0 otherwise.
    g = tl.load(grad_out_ptr + rows * grad_out_stride, mask=row_mask, other=0.0).to(ACC)
    # 0 for an ignored row, whose scale may be 1 / 0 (a mean over no counted row).
    a = tl.where(counted, tl.load(consts_ptr + _CE_SCALE), 0.0) * g
    b = tl.where(counted, tl.load(consts_ptr + _Z_SCALE), 0.0) * g
    w_t = tl.where(counted, 1.0, 0.0).to(ACC)
    if HAS_WEIGHT:
        safe_target = tl.where(counted, target, 0)
        w_t *= tl.load(class_weight_ptr + safe_target, mask=counted, other=0.0).to(ACC)

    for start in range(0, num_classes, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < num_classes
        x = _logits_tile(
            h_ptr, h_stride, w_ptr, w_stride, bias_ptr, rows, cols, row_mask, col_mask, dim,
            softcap, ACC, HAS_BIAS, HAS_SOFTCAP, DOT, PRECISION, BLOCK_M, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        p = tl.where(counted[:, None], tl.exp(x - lse[:, None]), 0.0)
        is_target = cols[None, :] == target[:, None]
        keep = True
        if HAS_FILTER:
            # Cut Cross-Entropy's gradient filter: skip a tile that holds no target and whose
            # softmax values are all below filter_eps; each gradient entry it would have added
            # is below filter_eps times its row's scale (see linear_cross_entropy).
            significant = tl.where(is_target & counted[:, None], 1.0, p)
            keep = tl.max(tl.max(significant, 1), 0) >= filter_eps
        if keep:
            w = 1.0
            if HAS_WEIGHT and HAS_SMOOTHING:
                w = tl.load(class_weight_ptr + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
            # Past the vocabulary x is -inf, where the softcap's derivative would make NaNs.
            x = tl.where(col_mask[None, :], x, 0.0)
            grad = _logit_grad(
                x, p, is_target, w, w_t[:, None], lse[:, None], a[:, None], b[:, None],
                consts_ptr, num_classes, HAS_SMOOTHING, HAS_Z, HAS_SOFTCAP,
            )  # fmt: skip
            grad = tl.where(counted[:, None] & col_mask[None, :], grad, 0.0)
            if GRAD_B:
                tl.atomic_add(grad_b_ptr + cols, tl.sum(grad, 0), mask=col_mask)
            # The matmuls take the gradient in the inputs' dtype, as an unfused backward would.
            grad = grad.to(h_ptr.dtype.element_ty).to(DOT)
            for d_start in range(0, dim, BLOCK_D):
                ds = d_start + tl.arange(0, BLOCK_D)
                d_mask = ds < dim
                if GRAD_H:
                    w_tile = tl.load(
                        w_ptr + cols[:, None] * w_stride + ds[None, :],
                        mask=col_mask[:, None] & d_mask[None, :],
                        other=0.0,
                    ).to(DOT)
                    offsets = rows[:, None] * dim + ds[None, :]
                    tile_mask = row_mask[:, None] & d_mask[None, :]
                    grad_h = tl.load(grad_h_ptr + offsets, mask=tile_mask, other=0.0)
                    grad_h = tl.dot(grad, w_tile, grad_h, input_precision=PRECISION)
                    tl.store(grad_h_ptr + offsets, grad_h, mask=tile_mask)
                if GRAD_W:
                    h_tile = tl.load(
                        h_ptr + rows[:, None] * h_stride + ds[None, :],
                        mask=row_mask[:, None] & d_mask[None, :],
                        other=0.0,
                    ).to(DOT)
                    zeros = tl.zeros((BLOCK_V, BLOCK_D), ACC)
                    grad_w = tl.dot(tl.trans(grad), h_tile, zeros, input_precision=PRECISION)
                    tl.atomic_add(
                        grad_w_ptr + cols[:, None] * dim + ds[None, :],
                        grad_w,
                        mask=col_mask[:, None] & d_mask[None, :],
                    )


def _check_device(*tensors: Tensor | None) -> None:
    if INTERPRETED:
        return
    for t in tensors:
        if t is not None and not t.is_cuda:
            raise RuntimeError(
                f"The Triton backend needs CUDA tensors, got a tensor on {t.device}. Move the "
                "inputs to a GPU, use backend='chunked' on the CPU, or set TRITON_INTERPRET=1 "
                "before Triton is first imported to run the kernels through its interpreter."
            )


_TL = {
    torch.float64: tl.float64,
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


def _denominators(
    target: Tensor, weight: Tensor | None, ignore_index: int, acc: torch.dtype
) -> tuple[Tensor, Tensor]:
    """The mean's two denominators, as in :func:`xentkit.reference.cross_entropy_terms`:
    the sum of the counted rows' target weights (cross-entropy part) and their number (z part).
    """
    counted = target != ignore_index
    if weight is None:
        return counted.sum().to(acc), counted.sum().to(acc)
    w_t = weight.to(acc)[torch.where(counted, target, 0)]
    return torch.where(counted, w_t, 0.0).sum(), counted.sum().to(acc)


def _constants(
    reduction: str,
    denominator: Tensor,
    count: Tensor,
    weight: Tensor | None,
    num_classes: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> Tensor:
    """The per-call constants the kernels load (see ``_CE_SCALE`` ...), in ``count``'s dtype:
    the reduction's scales of the two parts of the gradient (1 unless ``mean``), the classes'
    total weight and the options. Built on the device, so no value is synchronised to the host.
    """
    one = torch.ones((), dtype=count.dtype, device=count.device)
    ce_scale, z_scale = (1 / denominator, 1 / count) if reduction == "mean" else (one, one)
    total_w = one * num_classes if weight is None else weight.to(count.dtype).sum()
    # Python floats times a device scalar: no host-to-device copy (which a CUDA graph could not
    # capture).
    options = [one * label_smoothing, one * z_loss, one * (1.0 if softcap is None else softcap)]
    return torch.stack([ce_scale, z_scale, total_w, *options])


def _reduce(ce: Tensor, z: Tensor, reduction: str, denominator: Tensor, count: Tensor) -> Tensor:
    """:func:`xentkit.reference.reduce_cross_entropy` from the per-row terms."""
    return reference.reduce(ce, reduction, denominator) + reference.reduce(z, reduction, count)


def _ce_block(num_classes: int) -> tuple[int, int]:
    """Vocabulary block and warps of the cross-entropy kernel."""
    block = min(triton.next_power_of_2(num_classes), CE_MAX_BLOCK_V)
    return block, 16 if block >= 8192 else 8 if block >= 2048 else 4


def _forward(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    compute_grad: bool,
    out: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """The reduced loss and, when ``compute_grad``, its gradient written into ``out`` (a new
    buffer when None): one launch of :func:`_cross_entropy_kernel`, no host synchronisation."""
    num_rows, num_classes = logits.shape
    acc = reference.accumulation_dtype(logits.dtype)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    target = target.contiguous()
    weight = None if weight is None else weight.contiguous()
    if target.is_floating_point():
        options = (weight, reduction, label_smoothing, z_loss, softcap, compute_grad, out)
        return _soft_forward(logits, target, *options)
    denominator, count = _denominators(target, weight, ignore_index, acc)
    consts = _constants(
        reduction, denominator, count, weight, num_classes, label_smoothing, z_loss, softcap
    )
    ce = torch.empty(num_rows, dtype=acc, device=logits.device)
    z = torch.empty_like(ce)
    grad = None
    if compute_grad:
        grad = torch.empty_like(logits) if out is None else out
    if num_rows:
        block, warps = _ce_block(num_classes)
        _cross_entropy_kernel[(num_rows,)](
            logits, logits.stride(0), logits if grad is None else grad,
            logits.stride(0) if grad is None else grad.stride(0), target, weight, consts, ce,
            z, num_classes, ignore_index, _TL[acc], weight is not None,
            label_smoothing > 0, z_loss > 0, softcap is not None, compute_grad, block,
            num_warps=warps,
        )  # fmt: skip
    return _reduce(ce, z, reduction, denominator, count), grad


def _soft_forward(
    logits: Tensor,
    probs: Tensor,
    weight: Tensor | None,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    compute_grad: bool,
    out: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """:func:`_forward` for probability targets ``(M, V)``: every row counts, so the mean
    divides both parts by ``M``; one launch of :func:`_soft_cross_entropy_kernel`."""
    num_rows, num_classes = logits.shape
    acc = reference.accumulation_dtype(logits.dtype)
    rows = torch.full((), num_rows, dtype=acc, device=logits.device)
    consts = _constants(reduction, rows, rows, weight, num_classes, label_smoothing, z_loss,
                        softcap)  # fmt: skip
    ce = torch.empty(num_rows, dtype=acc, device=logits.device)
    z = torch.empty_like(ce)
    grad = (torch.empty_like(logits) if out is None else out) if compute_grad else None
    if num_rows:
        block, warps = _ce_block(num_classes)
        dest = logits if grad is None else grad
        _soft_cross_entropy_kernel[(num_rows,)](
            logits, logits.stride(0), dest, dest.stride(0), probs, probs.stride(0), weight,
            consts, ce, z, num_classes, _TL[acc], weight is not None, label_smoothing > 0,
            z_loss > 0, softcap is not None, compute_grad, block, num_warps=warps,
        )  # fmt: skip
    return _reduce(ce, z, reduction, rows, rows), grad


_fused_cross_entropy = fused_cross_entropy("triton_cross_entropy", _forward)


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    inplace_backward: bool,
) -> Tensor:
    r"""Fused cross entropy of ``(M, V)`` logits with index targets, in Triton.

    .. math:: \ell_i = (1-\varepsilon)\,w_{t_i}(\mathrm{lse}_i - x'_{i,t_i})
              + \tfrac{\varepsilon}{V}\sum_c w_c(\mathrm{lse}_i - x'_{i,c})
              + z\,\mathrm{lse}_i^2

    with :math:`x' = c \tanh(x / c)` under a softcap and :math:`\mathrm{lse}_i` the row's
    log-sum-exp (:func:`xentkit.reference.cross_entropy_terms`). The kernel writes the gradient
    of the reduced loss with respect to ``logits`` during the forward pass; backward multiplies
    it by ``grad_output``, so it holds one ``(M, V)`` buffer between the two passes.

    Args:
        logits: ``(M, V)`` float logits (float32, float64, bfloat16 or float16); CUDA, or CPU
            under ``TRITON_INTERPRET=1``.
        target: ``(M,)`` int64 class indices in ``[0, V)`` or ``ignore_index``.
        weight: optional ``(V,)`` class weights.
        ignore_index, reduction, label_smoothing, z_loss, softcap: as in
            :func:`xentkit.cross_entropy`.
        inplace_backward: write the gradient into ``logits``' storage (its values are
            destroyed) and scale it there in backward: no extra ``(M, V)`` buffer, and one
            backward pass per forward pass.
    Returns:
        ``(M,)`` for ``reduction="none"``, else a scalar; float32 (float64 for float64 logits).

    Example:
        >>> import torch
        >>> logits = torch.tensor([[1.0, 0.5, 2.0], [0.5, 3.0, 1.0]])
        >>> cross_entropy(logits, torch.tensor([2, -100]), None, -100, "none", 0.0, 0.0, None,
        ...               False)
        tensor([0.4644, 0.0000])

    See also :func:`linear_cross_entropy`, :mod:`xentkit.kernels.chunked` (the CPU path).
    """
    _check_device(logits, target, weight)
    return _fused_cross_entropy(
        logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
        inplace_backward,
    )  # fmt: skip


def _linear_launch(hidden: Tensor) -> tuple[tuple[int], dict]:
    """The grid of the linear kernels and the tile sizes and matmul options they all take."""
    block_m, block_v, block_d = LINEAR_TILES[hidden.element_size()]
    options = {
        "ACC": _TL[reference.accumulation_dtype(hidden.dtype)],
        # Triton 3.9's interpreter multiplies bfloat16 tiles as their raw bits, so interpreted
        # runs multiply them in float32 (exact: a product of two bfloat16 values fits in it).
        "DOT": tl.float32 if INTERPRETED and hidden.dtype == torch.bfloat16 else _TL[hidden.dtype],
        # float32 inputs are multiplied in float32, not TF32, as torch's matmul does by default.
        "PRECISION": "ieee" if hidden.dtype in (torch.float32, torch.float64) else "tf32",
        "BLOCK_M": block_m,
        "BLOCK_V": block_v,
        "BLOCK_D": block_d,
        "num_warps": LINEAR_WARPS,
    }
    return (triton.cdiv(hidden.shape[0], block_m),), options


def _linear_flags(
    bias: Tensor | None,
    class_weight: Tensor | None,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> dict[str, bool]:
    """The compile-time switches of the linear kernels."""
    return {
        "HAS_BIAS": bias is not None,
        "HAS_WEIGHT": class_weight is not None,
        "HAS_SMOOTHING": label_smoothing > 0,
        "HAS_Z": z_loss > 0,
        "HAS_SOFTCAP": softcap is not None,
    }


@torch.library.custom_op("xentkit::triton_linear_cross_entropy", mutates_args=())
def _linear_op(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    class_weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    filter_eps: float | None,
    stats: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, lse, consts, entropy, is_top1)``: the forward kernel keeps each row's
    log-sum-exp for the backward kernel (which also takes ``filter_eps``), and with ``stats``
    each row's entropy and top-1 hit (else empty); one opaque op for ``torch.compile``, with
    no host synchronisation."""
    num_rows, dim = hidden.shape
    num_classes = weight.shape[0]
    acc = reference.accumulation_dtype(hidden.dtype)
    hidden, weight, target = hidden.contiguous(), weight.contiguous(), target.contiguous()
    bias = None if bias is None else bias.contiguous()
    class_weight = None if class_weight is None else class_weight.contiguous()
    denominator, count = _denominators(target, class_weight, ignore_index, acc)
    consts = _constants(
        reduction, denominator, count, class_weight, num_classes, label_smoothing, z_loss,
        softcap,
    )  # fmt: skip
    lse = torch.empty(num_rows, dtype=acc, device=hidden.device)
    ce, z = torch.empty_like(lse), torch.empty_like(lse)
    entropy = torch.empty(num_rows if stats else 0, dtype=acc, device=hidden.device)
    top1 = torch.empty(num_rows if stats else 0, dtype=torch.bool, device=hidden.device)
    flags = _linear_flags(bias, class_weight, label_smoothing, z_loss, softcap)
    if num_rows:
        grid, launch = _linear_launch(hidden)
        _linear_forward_kernel[grid](
            hidden, hidden.stride(0), weight, weight.stride(0), bias, target, class_weight,
            consts, lse, ce, z, entropy, top1, num_rows, num_classes, dim, ignore_index,
            **flags, HAS_STATS=stats, **launch,
        )  # fmt: skip
    return _reduce(ce, z, reduction, denominator, count), lse, consts, entropy, top1


@_linear_op.register_fake
def _(hidden, weight, target, bias, class_weight, ignore_index, reduction, *_options):
    acc = reference.accumulation_dtype(hidden.dtype)
    lse = hidden.new_empty(hidden.shape[:1], dtype=acc)
    loss = torch.empty_like(lse) if reduction == "none" else lse.new_empty(())
    rows = hidden.shape[0] if _options[-1] else 0
    entropy, top1 = lse.new_empty(rows), lse.new_empty(rows, dtype=torch.bool)
    return loss, lse, lse.new_empty(6), entropy, top1


@torch.library.custom_op("xentkit::triton_linear_cross_entropy_backward", mutates_args=())
def _linear_backward_op(
    grad_output: Tensor,
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    class_weight: Tensor | None,
    consts: Tensor,
    lse: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    filter_eps: float | None,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients asked for by ``needs`` (hidden, weight, bias) in the inputs' dtypes, an
    empty tensor for each other one: the backward kernel recomputes the logit tiles."""
    num_rows, dim = hidden.shape
    acc = lse.dtype
    hidden, weight, target = hidden.contiguous(), weight.contiguous(), target.contiguous()
    bias = None if bias is None else bias.contiguous()
    class_weight = None if class_weight is None else class_weight.contiguous()
    need_h, need_w, need_b = needs
    grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
    grad_output = grad_output.to(acc).expand(num_rows)
    flags = _linear_flags(bias, class_weight, label_smoothing, z_loss, softcap)
    if num_rows:
        grid, launch = _linear_launch(hidden)
        _linear_backward_kernel[grid](
            hidden, hidden.stride(0), weight, weight.stride(0), bias, target, class_weight,
            consts, lse, grad_output, grad_output.stride(0), grad_h, grad_w, grad_b,
            num_rows, weight.shape[0], dim, ignore_index,
            0.0 if filter_eps is None else filter_eps,
            **flags, HAS_FILTER=filter_eps is not None, GRAD_H=need_h, GRAD_W=need_w,
            GRAD_B=need_b, **launch,
        )  # fmt: skip
    grads = zip((grad_h, grad_w, grad_b), (hidden, weight, bias), strict=True)
    return tuple(hidden.new_empty(0) if g is None else g.to(p.dtype) for g, p in grads)


@_linear_backward_op.register_fake
def _(grad_output, hidden, weight, target, bias, *options):
    needs = options[-1]
    params = (hidden, weight, bias)
    return tuple(
        torch.empty_like(p) if need else hidden.new_empty(0)
        for p, need in zip(params, needs, strict=True)
    )


def _linear_setup_context(ctx, inputs, output) -> None:
    hidden, weight, target, bias, class_weight, ignore_index, _, *options = inputs
    *options, filter_eps, _stats = options
    _, lse, consts, *per_row = output
    ctx.save_for_backward(hidden, weight, target, bias, class_weight, consts, lse)
    # Label smoothing adds a gradient that does not shrink with the softmax: no filtering.
    ctx.options = (ignore_index, *options, filter_eps if options[0] == 0 else None)
    ctx.mark_non_differentiable(lse, consts, *per_row)
    ctx.set_materialize_grads(False)


def _linear_backward(ctx, grad_loss: Tensor | None, *_unused):
    hidden, weight, target, bias, class_weight, consts, lse = ctx.saved_tensors
    no_class_weight_derivative(ctx.needs_input_grad[4])
    if grad_loss is None:
        return (None,) * 12
    needs = [ctx.needs_input_grad[i] for i in (0, 1, 3)]
    grads = _linear_backward_op(
        grad_loss, hidden, weight, target, bias, class_weight, consts, lse, *ctx.options, needs
    )
    gh, gw, gb = (g if need else None for g, need in zip(grads, needs, strict=True))
    return gh, gw, None, gb, *(None,) * 8


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    class_weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    chunk_size: int | None,
    stats: bool = False,
    *,
    filter_eps: float | None = FILTER_EPS,
) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    r"""Fused ``cross_entropy(hidden @ weight.T + bias, target)`` in Triton, never holding the
    ``(M, V)`` logits.

    .. math:: \ell_i = \mathrm{lse}(W h_i + b) - (W h_i + b)_{t_i}
              \quad\text{(and every option of :func:`cross_entropy`)}

    The forward kernel keeps each row's log-sum-exp; the backward kernel recomputes the logits
    tile by tile and accumulates ``grad_input`` and ``grad_weight`` in float32 (float64 for
    float64 input).

    Gradient filtering (Cut Cross-Entropy's): with ``filter_eps`` set, backward skips a
    ``(rows, classes)`` tile that holds none of its rows' targets and whose softmax values are
    all below ``filter_eps``. A dropped entry of the logits' gradient is :math:`p_{ij} c_i`
    with :math:`p_{ij}` < ``filter_eps`` and :math:`c_i = a_i w_{t_i} + 2 b_i z\,\mathrm{lse}_i`
    (:math:`a_i, b_i`: the reduction's scales times ``grad_output``), so row ``i`` of
    ``grad_input`` moves by less than ``V * filter_eps * |c_i| * max_j |weight[j]|``. The
    default, ``FILTER_EPS`` = 2**-28 (float32's machine epsilon / 32, CCE's "auto" for
    float32), puts each dropped entry below float32's rounding of an entry of size
    :math:`|c_i|/16`: the result equals the unfiltered one to float32 rounding unless a row's
    whole gradient is that small (a target predicted with :math:`1 - p_t < 10^{-7}`). Label
    smoothing adds a gradient that does not shrink with the softmax, so it turns the filter
    off; ``filter_eps=None`` turns it off too.

    Args:
        hidden: ``(M, D)`` hidden states.
        weight: ``(V, D)`` classifier, the layout of ``nn.Linear(D, V).weight``.
        target: ``(M,)`` int64 class indices or ``ignore_index``.
        bias: optional ``(V,)``.
        class_weight, ignore_index, reduction, label_smoothing, z_loss, softcap: as in
            :func:`xentkit.cross_entropy`.
        chunk_size: unused: the kernels work in fixed tiles (``LINEAR_TILES``).
        stats: also return each row's ``(lse, entropy, is_top1)``, from the forward kernel's
            merged tile statistics.
        filter_eps: the gradient filter's threshold, or None for none.
    Returns:
        ``(M,)`` for ``reduction="none"``, else a scalar; float32 (float64 for float64 input).
        ``(loss, (lse, entropy, is_top1))`` with ``stats``.

    Example:
        >>> import torch
        >>> h, w = torch.eye(2), torch.tensor([[1.0, 0.5], [0.5, 3.0], [2.0, 1.0]])
        >>> linear_cross_entropy(h, w, torch.tensor([2, 1]), None, None, -100, "mean", 0.0,
        ...                      0.0, None, None)
        tensor(0.3306)

    See also :func:`cross_entropy`, :func:`xentkit.linear_cross_entropy`.
    """
    _check_device(hidden, weight, target, bias, class_weight)
    loss, lse, _, entropy, top1 = _linear_op(
        hidden, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing,
        z_loss, softcap, filter_eps, stats,
    )  # fmt: skip
    return (loss, (lse, entropy, top1)) if stats else loss


@triton.jit
def _row_stats_kernel(
    x_ptr,
    x_stride,
    target_ptr,
    out_ptr,
    num_classes,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One row of ``(m, V)`` logits: writes ``(max, S, t, X, Q, L, argmax)`` of
    :class:`xentkit.kernels.row_stats.RowStats` (the argmax as a float) into ``out[:, row]``."""
    row = tl.program_id(0).to(tl.int64)
    x_ptr += row * x_stride
    m = tl.full((), float("-inf"), ACC)
    s = tl.zeros((), ACC)
    xx = tl.zeros((), ACC)
    q = tl.zeros((), ACC)
    total = tl.zeros((), ACC)
    best = tl.zeros((), tl.int64)
    for start in range(0, num_classes, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < num_classes
        x = tl.load(x_ptr + cols, mask=mask, other=float("-inf")).to(ACC)
        m_b, s_b, x_b, q_b = _block_stats(x, 0, True, True)
        # The first maximum: a later block wins only with a strictly larger maximum.
        first = start + tl.argmax(x, 0, tie_break_left=True).to(tl.int64)
        best = tl.where(m_b > m, first, best)
        total += tl.sum(tl.where(mask, x, 0.0), 0)
        m, s, xx, q = _merge(m, s, xx, q, m_b, s_b, x_b, q_b)
    target = tl.load(target_ptr + row)
    picked = tl.load(x_ptr + target).to(ACC)
    rows = tl.num_programs(0).to(tl.int64)
    tl.store(out_ptr + row, m)
    tl.store(out_ptr + rows + row, s)
    tl.store(out_ptr + 2 * rows + row, picked)
    tl.store(out_ptr + 3 * rows + row, xx)
    tl.store(out_ptr + 4 * rows + row, q)
    tl.store(out_ptr + 5 * rows + row, total)
    tl.store(out_ptr + 6 * rows + row, best.to(ACC))


@triton.jit
def _log_prob_grad_kernel(
    x_ptr,
    x_stride,
    target_ptr,
    lse_ptr,
    a_ptr,
    b_ptr,
    entropy_ptr,
    num_classes,
    ACC: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """:func:`xentkit.kernels.row_stats.log_prob_grad` of one row, written over its logits:
    :math:`a([j = t] - p_j) - b\\,p_j(\\log p_j + H)`."""
    row = tl.program_id(0).to(tl.int64)
    x_ptr += row * x_stride
    target = tl.load(target_ptr + row)
    lse = tl.load(lse_ptr + row).to(ACC)
    a = tl.load(a_ptr + row).to(ACC)
    for start in range(0, num_classes, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < num_classes
        log_p = tl.load(x_ptr + cols, mask=mask, other=0.0).to(ACC) - lse
        p = tl.exp(log_p)
        if HAS_B:
            b = tl.load(b_ptr + row).to(ACC)
            h = tl.load(entropy_ptr + row).to(ACC)
            grad = -p * (a + b * (tl.maximum(log_p, -1e4) + h))
        else:
            grad = -a * p
        grad += tl.where(cols == target, a, 0.0)
        tl.store(x_ptr + cols, grad.to(x_ptr.dtype.element_ty), mask=mask)


def row_stats_block(x: Tensor, target: Tensor, **asked: bool):
    """:func:`xentkit.kernels.row_stats.block` of a whole ``(m, V)`` chunk of logits (every
    row's target in range), one program per row; the fields not ``asked`` for are None."""
    from xentkit.kernels import row_stats

    _check_device(x, target)
    x = x.contiguous()
    rows, num_classes = x.shape
    out = x.new_empty(7, rows)
    if rows:
        block, warps = _ce_block(num_classes)
        _row_stats_kernel[(rows,)](
            x, x.stride(0), target, out, num_classes,
            ACC=_TL[x.dtype], BLOCK_V=block, num_warps=warps,
        )  # fmt: skip
    m, s, t, xx, q, total, best = out
    return row_stats.RowStats(
        m, s, t,
        xx if asked.get("entropy") else None,
        q if asked.get("sum_sq") else None,
        total if asked.get("sum_x") else None,
        best.long() if asked.get("argmax") else None,
    )  # fmt: skip


def log_prob_grad(
    x: Tensor,
    lse: Tensor,
    a: Tensor,
    b: Tensor | None = None,
    entropy: Tensor | None = None,
    target: Tensor | None = None,
) -> Tensor:
    """:func:`xentkit.kernels.row_stats.log_prob_grad` over a contiguous ``(m, V)`` chunk,
    written over ``x``."""
    _check_device(x, lse, a, b, entropy, target)
    rows, num_classes = x.shape
    if rows:
        block, warps = _ce_block(num_classes)
        has_b = b is not None
        _log_prob_grad_kernel[(rows,)](
            x, x.stride(0), target, lse, a, b if has_b else a, entropy if has_b else a,
            num_classes, ACC=_TL[x.dtype], HAS_B=has_b, BLOCK_V=block, num_warps=warps,
        )  # fmt: skip
    return x


# ---------------------------------------------------------------- distillation rows


@triton.jit
def _floored_log_softmax(x, lse):
    """``log_softmax`` from a row's log-sum-exp, floored at reference.LOG_PROB_FLOOR (a class
    masked with -inf adds ``0 * floor = 0``, not NaN)."""
    return tl.maximum(x - lse, -1e4)


@triton.jit
def _distill_rows_kernel(
    s_ptr,
    t_ptr,
    stride,
    target_ptr,
    loss_ptr,
    consts_ptr,
    num_classes,
    ACC: tl.constexpr,
    MODE: tl.constexpr,
    HAS_HARD: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One row of :func:`xentkit.kernels.linear_distill._chunk`: the student's and the
    teacher's scaled logits ``s`` and ``t`` reduced by row_stats' block merge to their
    log-sum-exps (sweep 1), the divergence of ``MODE`` (0: KL(q || p), 1: KL(p || q), 2: the
    generalized JSD) and the hard term (sweep 2), then the gradient with respect to the raw
    student logits, written over ``s`` (sweep 3). ``consts`` holds, in the accumulation dtype
    (a float argument would reach the kernel as float32), beta, the temperature, the hard
    weight, log(1 - beta) and log(beta)."""
    beta = tl.load(consts_ptr)
    temperature = tl.load(consts_ptr + 1)
    hard_weight = tl.load(consts_ptr + 2)
    log_a = tl.load(consts_ptr + 3)  # the mixture's log-weights, used by MODE 2 only
    log_b = tl.load(consts_ptr + 4)
    row = tl.program_id(0).to(tl.int64)
    s_ptr += row * stride
    t_ptr += row * stride
    m_s = tl.full((), float("-inf"), ACC)
    m_t = tl.full((), float("-inf"), ACC)
    sum_s = tl.zeros((), ACC)
    sum_t = tl.zeros((), ACC)
    for start in range(0, num_classes, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < num_classes
        xs = tl.load(s_ptr + cols, mask=mask, other=float("-inf")).to(ACC)
        xt = tl.load(t_ptr + cols, mask=mask, other=float("-inf")).to(ACC)
        mb, sb, _, _ = _block_stats(xs, 0, False, False)
        m_s, sum_s, _, _ = _merge(m_s, sum_s, 0.0, 0.0, mb, sb, 0.0, 0.0)
        mb, sb, _, _ = _block_stats(xt, 0, False, False)
        m_t, sum_t, _, _ = _merge(m_t, sum_t, 0.0, 0.0, mb, sb, 0.0, 0.0)
    lse_s = _shift(m_s) + tl.log(sum_s)
    lse_t = _shift(m_t) + tl.log(sum_t)

    # Sweep 2: the divergence's sums, and the hard term's log-sum-exp of z = T log p.
    total = tl.zeros((), ACC)  # KL(q || p), KL(p || q) or KL(q || m)
    k = tl.zeros((), ACC)  # MODE 2: K = KL(p || m)
    m_z = tl.full((), float("-inf"), ACC)
    sum_z = tl.zeros((), ACC)
    for start in range(0, num_classes, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < num_classes
        log_p = _floored_log_softmax(tl.load(s_ptr + cols, mask=mask, other=0.0).to(ACC), lse_s)
        log_q = _floored_log_softmax(tl.load(t_ptr + cols, mask=mask, other=0.0).to(ACC), lse_t)
        p = tl.where(mask, tl.exp(log_p), 0.0)
        q = tl.where(mask, tl.exp(log_q), 0.0)
        if MODE == 0:
            total += tl.sum(q * (log_q - log_p), 0)
        elif MODE == 1:
            total += tl.sum(p * (log_p - log_q), 0)
        else:
            a = log_p + log_a
            b = log_q + log_b
            top = tl.maximum(a, b)
            log_m = top + tl.log(tl.exp(a - top) + tl.exp(b - top))
            total += tl.sum(q * (log_q - log_m), 0)
            k += tl.sum(p * (log_p - log_m), 0)
        if HAS_HARD:
            z = tl.where(mask, temperature * log_p, float("-inf"))
            mb, sb, _, _ = _block_stats(z, 0, False, False)
            m_z, sum_z, _, _ = _merge(m_z, sum_z, 0.0, 0.0, mb, sb, 0.0, 0.0)
    soft = total
    if MODE == 2:
        soft = beta * total + (1.0 - beta) * k
    loss = soft
    lse_z = tl.zeros((), ACC)
    target = 0
    if HAS_HARD:
        lse_z = _shift(m_z) + tl.log(sum_z)
        target = tl.load(target_ptr + row)
        z_t = temperature * _floored_log_softmax(tl.load(s_ptr + target).to(ACC), lse_s)
        loss = (1.0 - hard_weight) * soft + hard_weight * (lse_z - z_t)
    tl.store(loss_ptr + row, loss)

    if WANT_GRAD:
        # d/dz = (1 / T) d/ds; the divergence's gradient is c G, c = 1 - beta for MODE 2.
        if MODE == 2:
            scale = (1.0 - hard_weight) * (1.0 - beta) / temperature
        else:
            scale = (1.0 - hard_weight) / temperature
        for start in range(0, num_classes, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < num_classes
            log_p = _floored_log_softmax(tl.load(s_ptr + cols, mask=mask, other=0.0).to(ACC), lse_s)
            log_q = _floored_log_softmax(tl.load(t_ptr + cols, mask=mask, other=0.0).to(ACC), lse_t)
            p = tl.exp(log_p)
            if MODE == 0:  # p - q
                grad = p - tl.exp(log_q)
            elif MODE == 1:  # p (log p - log q - D)
                grad = p * (log_p - log_q - total)
            else:  # p (log p - log m - K)
                a = log_p + log_a
                b = log_q + log_b
                top = tl.maximum(a, b)
                log_m = top + tl.log(tl.exp(a - top) + tl.exp(b - top))
                grad = p * (log_p - log_m - k)
            grad = grad * scale
            if HAS_HARD:  # + lambda (softmax(z) - one_hot(y))
                z = temperature * log_p
                hard = tl.exp(z - lse_z) - tl.where(cols == target, 1.0, 0.0)
                grad += hard_weight * hard
            tl.store(s_ptr + cols, grad.to(s_ptr.dtype.element_ty), mask=mask)


def distill_rows(
    s: Tensor,
    t: Tensor,
    target: Tensor,
    beta: float,
    temperature: float,
    hard_weight: float,
    want_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """:func:`xentkit.kernels.linear_distill._chunk` (same arguments but the working buffers,
    same results) by one launch of :func:`_distill_rows_kernel`: the per-row loss, and with
    ``want_grad`` the gradient with respect to the student's raw logits, written over ``s``."""
    _check_device(s, t, target)
    s, t = s.contiguous(), t.contiguous()
    rows, num_classes = s.shape
    loss = s.new_empty(rows)
    if rows:
        block, warps = _ce_block(num_classes)
        mode = 0 if beta == 0.0 else 1 if beta == 1.0 else 2
        mixture = (math.log1p(-beta), math.log(beta)) if mode == 2 else (0.0, 0.0)
        consts = torch.tensor([beta, temperature, hard_weight, *mixture], dtype=s.dtype,
                              device=s.device)  # fmt: skip
        _distill_rows_kernel[(rows,)](
            s, t, s.stride(0), target, loss, consts, num_classes,
            ACC=_TL[s.dtype], MODE=mode, HAS_HARD=hard_weight > 0, WANT_GRAD=want_grad,
            BLOCK_V=block, num_warps=warps,
        )  # fmt: skip
    return loss, s if want_grad else None
