"""Fused cross entropy in torch ops: the loss and its gradient in one pass over the logits.

The gradient of cross entropy with respect to the logits is known in closed form once the
row's log-sum-exp is, so the forward pass writes it into one buffer and the backward pass only
scales that buffer by ``grad_output``. The formulas are those of
:func:`xentkit.reference.cross_entropy_terms`; the tests hold every path here to it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xentkit import reference


def _as_scale(scale: float | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A scalar or per-row ``(m,)`` scale as a tensor that broadcasts over rows."""
    return torch.as_tensor(scale, dtype=dtype, device=device)


def loss_and_grad(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    ce_scale: float | Tensor | None,
    z_scale: float | Tensor = 1.0,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    r"""Per-row cross entropy and z-loss of a chunk of logits, and their scaled gradient.

    With :math:`x' = c \tanh(x / c)` (``softcap``), :math:`p = \mathrm{softmax}(x')`,
    :math:`\varepsilon` = ``label_smoothing``, :math:`C` classes and
    :math:`W = \sum_c w_c` (:math:`C` without weights), the terms of
    :func:`xentkit.reference.cross_entropy_terms` are
    :math:`\mathrm{ce}_i = (1-\varepsilon)\,w_{t_i}(\mathrm{lse}_i - x'_{i,t_i})
    + \tfrac{\varepsilon}{C}\sum_c w_c(\mathrm{lse}_i - x'_{i,c})` and
    :math:`z_i = z\,\mathrm{lse}_i^2` (both 0 where ``target`` is ``ignore_index``), and the
    gradient of :math:`\sum_i a_i \mathrm{ce}_i + b_i z_i` (:math:`a` = ``ce_scale``,
    :math:`b` = ``z_scale``) is

    .. math:: \frac{\partial}{\partial x'_{i,j}} = p_{i,j}\big(a_i((1-\varepsilon)w_{t_i}
              + \varepsilon W / C) + 2 b_i z\,\mathrm{lse}_i\big)
              - a_i\big((1-\varepsilon)\,w_{t_i}[j = t_i] + \varepsilon\, w_j / C\big)

    times :math:`1 - (x'_{i,j}/c)^2` with a softcap.

    Args:
        logits: ``(m, V)`` logits, any floating dtype.
        target: ``(m,)`` int64 class ids or ``ignore_index``.
        weight: optional ``(V,)`` class weights.
        ignore_index, label_smoothing, z_loss, softcap: as in :func:`xentkit.cross_entropy`.
        ce_scale: ``a``, a scalar or ``(m,)``; None computes no gradient.
        z_scale: ``b``, a scalar or ``(m,)``.
        out: ``(m, V)`` buffer for the gradient (may be ``logits`` itself); allocated when None.
    Returns:
        ``(ce, z, grad)``: ``ce`` and ``z`` ``(m,)`` in float32 (float64 for float64 logits);
        ``grad`` ``(m, V)`` in the logits' dtype, or None when ``ce_scale`` is None.

    Example:
        >>> logits = torch.tensor([[1.0, 0.5, 2.0], [0.5, 3.0, 1.0]])
        >>> ce, z, grad = loss_and_grad(logits, torch.tensor([2, 1]), None, -100, 0.0, 0.0,
        ...                             None, ce_scale=0.5)
        >>> ce
        tensor([0.4644, 0.1967])
        >>> grad
        tensor([[ 0.1156,  0.0701, -0.1857],
                [ 0.0337, -0.0893,  0.0556]])
    """
    acc = reference.accumulation_dtype(logits.dtype)
    num_classes = logits.shape[-1]
    eps = label_smoothing
    counted = target != ignore_index
    safe_target = torch.where(counted, target, 0)
    w = None if weight is None else weight.to(acc)
    w_t = counted.to(acc) if w is None else torch.where(counted, w[safe_target], 0.0)

    x = logits.to(acc)  # the logits themselves when already in the accumulation dtype
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(x / softcap)
        x = tanh * softcap
    # Subtracting the row max keeps exp finite; an all -inf row keeps max 0 (as the reference).
    row_max = x.amax(-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), 0.0, row_max)
    shifted = x.sub_(row_max) if x is not logits else x - row_max

    target_shifted = shifted.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    if eps:
        weighted_sum = shifted.sum(-1) if w is None else shifted @ w
    exps = shifted.exp_()  # from here on the buffer holds exp(x' - max)
    sum_exp = exps.sum(-1)
    log_sum = sum_exp.log()
    lse = row_max.squeeze(1) + log_sum

    # lse - x'_t = log_sum - (x'_t - max): the max cancels without rounding.
    ce = torch.where(counted, w_t * (log_sum - target_shifted), 0.0)
    total_w = num_classes if w is None else w.sum()
    if eps:
        smooth = torch.where(counted, (total_w * log_sum - weighted_sum) / num_classes, 0.0)
        ce = (1 - eps) * ce + eps * smooth
    z = torch.where(counted, z_loss * lse * lse, 0.0) if z_loss else torch.zeros_like(lse)
    if ce_scale is None:
        return ce, z, None

    a = _as_scale(ce_scale, acc, logits.device)
    coef = a * ((1 - eps) * w_t + eps * total_w / num_classes)
    if z_loss:
        coef = coef + _as_scale(z_scale, acc, logits.device) * (2 * z_loss) * lse
    grad = exps.mul_((torch.where(counted, coef, 0.0) / sum_exp).unsqueeze(1))
    grad.scatter_add_(1, safe_target.unsqueeze(1), (-(1 - eps) * a * w_t).unsqueeze(1))
    if eps:
        smooth_row = (a * eps / num_classes) * counted
        grad.sub_(smooth_row.unsqueeze(1) if w is None else torch.outer(smooth_row, w))
    # An ignored row has zero gradient even where its logits make exp NaN (all -inf).
    ignored = (~counted).nonzero().squeeze(1)
    if ignored.numel():
        grad.index_fill_(0, ignored, 0.0)
    if tanh is not None:
        grad.mul_(tanh.square_().neg_().add_(1))  # d(c tanh(x/c))/dx = 1 - tanh(x/c)^2
    if out is not None:
        return ce, z, out.copy_(grad)
    return ce, z, grad.to(logits.dtype)
