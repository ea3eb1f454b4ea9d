"""Reference maths for the cross-entropy family: the spec every fast path is tested against.

Everything here is written from the formulas with elementwise torch ops (``exp``, ``log``,
``sum``, ``gather``), never by calling the ``torch.nn.functional`` function it stands for.
It is readable first and fast second, works in any floating dtype (float64 included) and is
differentiable (twice) through autograd.

Layout: the loss functions take *rows*: logits or log-probabilities of shape ``(M, C)`` with
the classes last, index targets of shape ``(M,)`` and probability targets of shape ``(M, C)``.
:mod:`xentkit._layout` turns PyTorch's ``(C)``, ``(N, C)`` and ``(N, C, d1, ..., dk)``
layouts into rows and back.

Each loss has a ``*_terms`` function returning every intermediate quantity per row
(what :mod:`xentkit.explain` prints) and a reducing function built on it.

Example:
    >>> import torch
    >>> from xentkit import reference as ref
    >>> logits = torch.tensor([[1.0, 0.5, 2.0], [0.5, 3.0, 1.0]])
    >>> ref.cross_entropy(logits, torch.tensor([2, 1]))
    tensor(0.3306)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

REDUCTIONS = ("none", "mean", "sum")

# torch floors log(p) of binary_cross_entropy at -100 so a probability of exactly 0 or 1
# gives a large finite loss instead of inf, and floors p (1 - p) at 1e-12 in its gradient.
BCE_LOG_FLOOR = -100.0
BCE_GRAD_EPS = 1e-12


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are accumulated in: float64 for float64, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_max(x: Tensor, dim: int) -> Tensor:
    """The maximum along ``dim`` (kept), detached: the shift that keeps ``exp`` from overflowing;
    0 for rows that are all ``-inf`` (or have no element)."""
    if x.shape[dim] == 0:
        shape = list(x.shape)
        shape[dim] = 1
        return x.new_zeros(shape)
    m = x.amax(dim=dim, keepdim=True).detach()
    # Only -inf: a +inf maximum must give inf - inf = NaN, as in PyTorch.
    return torch.where(m == float("-inf"), torch.zeros_like(m), m)


def _shift(x: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(m, x - m, log(sum(exp(x - m))))`` with :math:`m` the row maximum (kept dims).

    Subtracting :math:`m` first means no exponential overflows and the largest term is exactly
    1; a row that is all ``-inf`` uses :math:`m = 0` to avoid ``-inf - -inf``.
    """
    m = _row_max(x, dim)
    shifted = x - m
    return m, shifted, torch.log(torch.exp(shifted).sum(dim=dim, keepdim=True))


def logsumexp(x: Tensor, dim: int = -1, keepdim: bool = False) -> Tensor:
    r"""Stable :math:`\log \sum_j e^{x_j} = m + \log \sum_j e^{x_j - m}` along ``dim``
    (``-inf`` for a row that is all ``-inf``)."""
    m, _, log_sum = _shift(x, dim)
    out = m + log_sum
    return out if keepdim else out.squeeze(dim)


def log_softmax_and_lse(x: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    r"""Log-softmax :math:`(x_i - m) - \log \sum_j e^{x_j - m}` and the log-sum-exp (dim
    dropped), sharing one pass. The log-probabilities are formed from the shifted logits, never
    as :math:`x_i - \mathrm{lse}`, which would lose digits when :math:`|x|` is large."""
    m, shifted, log_sum = _shift(x, dim)
    return shifted - log_sum, (m + log_sum).squeeze(dim)


def log_softmax(x: Tensor, dim: int = -1) -> Tensor:
    r"""Log-softmax: :math:`(x_i - m) - \log \sum_j e^{x_j - m}`, with :math:`m = \max_j x_j`.

    A row that is all ``-inf`` gives NaN, as PyTorch's does.
    """
    return log_softmax_and_lse(x, dim)[0]


def softmax(x: Tensor, dim: int = -1) -> Tensor:
    r"""Softmax: :math:`e^{x_i - m} / \sum_j e^{x_j - m}`, with :math:`m = \max_j x_j`."""
    e = torch.exp(x - _row_max(x, dim))
    return e / e.sum(dim=dim, keepdim=True)


def apply_softcap(x: Tensor, softcap: float | None) -> Tensor:
    r"""Logit soft-capping (Gemma 2): :math:`c \tanh(x / c)`; identity when ``softcap`` is None."""
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def reduce(loss: Tensor, reduction: str, denominator: Tensor | float | None = None) -> Tensor:
    """Apply a reduction: ``none`` keeps ``loss``; ``sum`` adds it up; ``mean`` divides the sum
    by ``denominator`` (the number of elements when None)."""
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    if denominator is None:
        denominator = loss.numel()
    return total / denominator


class NLLTerms(NamedTuple):
    """Per-row quantities of the negative log-likelihood with index targets."""

    counted: Tensor  # (M,) bool: the target is not ignore_index
    target_log_prob: Tensor  # (M,) log-probability picked at the target (0 where ignored)
    target_weight: Tensor  # (M,) weight of the row's target class (0 where ignored)
    loss: Tensor  # (M,) -weight * picked log-probability (0 where ignored)


def nll_terms(
    log_probs: Tensor, target: Tensor, weight: Tensor | None = None, ignore_index: int = -100
) -> NLLTerms:
    r"""Per-row :math:`\ell_i = -w_{t_i} \log p_{i, t_i}`, with :math:`\ell_i = 0` where
    :math:`t_i` is ``ignore_index``."""
    counted = target != ignore_index
    safe_target = torch.where(counted, target, torch.zeros_like(target))
    if log_probs.shape[-1]:
        picked = log_probs.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
        picked = torch.where(counted, picked, torch.zeros_like(picked))
    else:  # no classes: every target is ignored (others fail the range check), nothing to pick
        picked = log_probs.new_zeros(target.shape)
    if weight is None:
        w = counted.to(log_probs.dtype)
    else:
        w = torch.where(counted, weight.to(log_probs.dtype)[safe_target], 0.0)
    loss = torch.where(counted, -w * picked, torch.zeros_like(picked))
    return NLLTerms(counted, picked, w, loss)


def nll_loss(
    log_probs: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    r"""Negative log-likelihood of index targets.

    .. math:: \ell_i = -w_{t_i} \log p_{i, t_i}, \qquad
              \text{mean} = \sum_i \ell_i \Big/ \sum_{i:\, t_i \ne \text{ignore}} w_{t_i}

    Args:
        log_probs: ``(M, C)`` log-probabilities.
        target: ``(M,)`` class indices in ``[0, C)`` or ``ignore_index``.
        weight: optional ``(C,)`` class weights.
    Returns:
        ``(M,)`` for ``reduction="none"``, else a scalar (NaN for a mean over no counted row,
        as in PyTorch).
    """
    terms = nll_terms(log_probs, target, weight, ignore_index)
    return reduce(terms.loss, reduction, terms.target_weight.sum())


class CrossEntropyTerms(NamedTuple):
    """Per-row quantities of cross entropy; ``loss`` sums to the reduced value over
    ``denominator`` (and ``z_denominator`` for the z-loss part) for ``reduction="mean"``."""

    logits: Tensor  # (M, C) logits after soft-capping
    lse: Tensor  # (M,) log-sum-exp of each row
    log_probs: Tensor  # (M, C)
    counted: Tensor  # (M,) bool
    target_log_prob: Tensor  # (M,) index targets: picked log p; probability targets: sum y log p
    target_weight: Tensor  # (M,) weight of the row in the mean's denominator
    nll: Tensor  # (M,) the unsmoothed term
    smooth: Tensor  # (M,) the uniform-target term (already divided by C)
    ce: Tensor  # (M,) (1 - eps) * nll + eps * smooth
    z: Tensor  # (M,) z_loss * lse**2 (0 where not counted)
    loss: Tensor  # (M,) ce + z
    denominator: Tensor  # scalar: divides the cross-entropy part for the mean
    z_denominator: Tensor  # scalar: divides the z-loss part for the mean (number of counted rows)


def cross_entropy_terms(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> CrossEntropyTerms:
    r"""Every term of cross entropy, per row, for index targets ``(M,)`` or probability
    targets ``(M, C)`` (a floating ``target`` of the logits' shape).

    With :math:`x' = c \tanh(x / c)` when ``softcap`` is set,
    :math:`\log p = x' - \mathrm{lse}(x')`, :math:`\varepsilon` = ``label_smoothing``,
    :math:`C` classes:

    * index targets: :math:`\ell_i = (1-\varepsilon)(-w_{t_i} \log p_{i,t_i})
      + \varepsilon \big(-\tfrac{1}{C}\sum_c w_c \log p_{i,c}\big) + z\,\mathrm{lse}_i^2`,
      ignored rows are 0; the mean divides the first two terms by :math:`\sum_i w_{t_i}` over
      counted rows (as PyTorch) and the z term by the number of counted rows;
    * probability targets: :math:`y' = (1-\varepsilon) y + \varepsilon / C`,
      :math:`\ell_i = -\sum_c w_c y'_{i,c} \log p_{i,c} + z\,\mathrm{lse}_i^2`; the mean divides
      by the number of rows.
    """
    dtype = accumulation_dtype(logits.dtype)
    x = apply_softcap(logits.to(dtype), softcap)
    num_classes = x.shape[-1]
    log_probs, lse = log_softmax_and_lse(x, dim=-1)
    w = None if weight is None else weight.to(dtype)
    eps = label_smoothing

    if target.is_floating_point():
        y = target.to(dtype)
        if eps > 0:
            y = y * (1 - eps) + eps / num_classes
        wy = y if w is None else y * w
        nll = -(log_probs * wy).sum(-1)
        smooth = torch.zeros_like(nll)
        counted = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        picked = (log_probs * y).sum(-1)
        target_weight = torch.ones_like(nll)
        ce = nll
    else:
        terms = nll_terms(log_probs, target, w, ignore_index)
        counted, picked, target_weight, nll = terms
        lp = log_probs if w is None else log_probs * w
        smooth = torch.where(counted, -lp.sum(-1) / num_classes, 0.0)
        ce = (1 - eps) * nll + eps * smooth if eps > 0 else nll

    z = torch.where(counted, z_loss * lse * lse, 0.0) if z_loss else torch.zeros_like(lse)
    loss = ce + z if z_loss else ce
    denominator = target_weight.sum()
    z_denominator = counted.sum().to(dtype)
    return CrossEntropyTerms(
        x, lse, log_probs, counted, picked, target_weight, nll, smooth, ce, z, loss, denominator,
        z_denominator,
    )  # fmt: skip


def reduce_cross_entropy(terms: CrossEntropyTerms, reduction: str) -> Tensor:
    """Reduce :func:`cross_entropy_terms` as PyTorch does; the mean of the z-loss part is per
    counted row, whatever the class weights."""
    if reduction != "mean":
        return reduce(terms.loss, reduction)
    return terms.ce.sum() / terms.denominator + terms.z.sum() / terms.z_denominator


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> Tensor:
    r"""Cross entropy of ``(M, C)`` logits with index or probability targets.

    .. math:: \ell_i = -\sum_c w_c\, y_{i,c} \log \mathrm{softmax}(x_i)_c

    See :func:`cross_entropy_terms` for every option. The result is in float32 (float64 for
    float64 logits); the caller casts it back.
    """
    terms = cross_entropy_terms(
        logits, target, weight, ignore_index, label_smoothing, z_loss, softcap
    )
    return reduce_cross_entropy(terms, reduction)


class _BinaryCrossEntropy(torch.autograd.Function):
    """Elementwise ``-[y max(log p, -100) + (1 - y) max(log(1 - p), -100)]`` with PyTorch's
    gradient ``(p - y) / max(p (1 - p), 1e-12)``, which stays finite at p = 0 and p = 1."""

    @staticmethod
    def forward(ctx, p: Tensor, y: Tensor) -> Tensor:
        ctx.save_for_backward(p, y)
        log_p, log_1mp = _floored_logs(p)
        return -(y * log_p + (1 - y) * log_1mp)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        p, y = ctx.saved_tensors
        grad_p = grad * (p - y) / (p * (1 - p)).clamp_min(BCE_GRAD_EPS)
        log_p, log_1mp = _floored_logs(p)
        return grad_p, grad * (log_1mp - log_p)


def _floored_logs(p: Tensor) -> tuple[Tensor, Tensor]:
    return torch.log(p).clamp_min(BCE_LOG_FLOOR), torch.log1p(-p).clamp_min(BCE_LOG_FLOOR)


def binary_cross_entropy_terms(
    probs: Tensor, target: Tensor, weight: Tensor | None = None
) -> Tensor:
    r"""Elementwise :math:`\ell = -w\,[\,y \log p + (1 - y) \log(1 - p)\,]`, each log floored
    at -100 as in PyTorch."""
    dtype = accumulation_dtype(probs.dtype)
    loss = _BinaryCrossEntropy.apply(probs.to(dtype), target.to(dtype))
    return loss if weight is None else loss * weight.to(dtype)


def binary_cross_entropy(
    probs: Tensor, target: Tensor, weight: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    r"""Binary cross entropy on probabilities, mean over all elements.

    .. math:: \ell = -w\,[\,y \log p + (1 - y) \log(1 - p)\,]
    """
    return reduce(binary_cross_entropy_terms(probs, target, weight), reduction)


def binary_cross_entropy_with_logits_terms(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    pos_weight: Tensor | None = None,
) -> Tensor:
    r"""Elementwise BCE on logits in the stable form.

    .. math:: \ell = (1 - y)\,x + (1 + (p_w - 1)\,y)\,\big(\log(1 + e^{-|x|}) + \max(-x, 0)\big)

    which is :math:`-[\,p_w y \log\sigma(x) + (1-y)\log(1-\sigma(x))\,]` without ever computing
    :math:`e^{x}` for large :math:`x` (:math:`-\log\sigma(x) = \log(1+e^{-|x|}) + \max(-x, 0)`).
    ``pos_weight`` broadcasts against the last (class) dimension.
    """
    dtype = accumulation_dtype(logits.dtype)
    x, y = logits.to(dtype), target.to(dtype)
    neg_log_sigmoid = torch.log1p(torch.exp(-x.abs())) + (-x).clamp_min(0)
    scale = 1 if pos_weight is None else 1 + (pos_weight.to(dtype) - 1) * y
    loss = (1 - y) * x + scale * neg_log_sigmoid
    return loss if weight is None else loss * weight.to(dtype)


def binary_cross_entropy_with_logits(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
    pos_weight: Tensor | None = None,
) -> Tensor:
    """Binary cross entropy on logits (multi-label with ``pos_weight``); mean over all elements.
    See :func:`binary_cross_entropy_with_logits_terms`."""
    loss = binary_cross_entropy_with_logits_terms(logits, target, weight, pos_weight)
    return reduce(loss, reduction)


# Below this log-probability every dtype's exp is exactly 0 (float64's smallest positive number
# is e^-744.4), so flooring log p here changes no p log p; it only turns a masked class's
# 0 * log 0 = 0 * -inf = NaN into 0 (and keeps its gradient finite).
LOG_PROB_FLOOR = -1e4


class TokenStatistics(NamedTuple):
    """Every per-row output of the LM head (0 / False where ignored)."""

    log_prob: Tensor  # (M,) log p of the target
    entropy: Tensor  # (M,) -sum p log p
    log_sum_sq_probs: Tensor  # (M,) log sum p^2
    mean_logits: Tensor  # (M,) mean of the transformed logits
    is_top1: Tensor  # (M,) bool: the target is the first argmax


def token_statistics(
    logits: Tensor,
    target: Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> TokenStatistics:
    r"""Everything a training loop takes from a row of the LM head besides the loss.

    With :math:`s = c \tanh(\lambda x / c) / T` (no tanh without a softcap :math:`c`; TRL's
    order), :math:`\mathrm{lse} = \log \sum_j e^{s_j}` and :math:`p = \mathrm{softmax}(s)`:
    :math:`\log p_t = s_t - \mathrm{lse}`, the entropy :math:`H = -\sum_j p_j \log p_j`,
    :math:`\log \sum_j p_j^2`, the mean logit :math:`\frac{1}{C} \sum_j s_j` and whether the
    target is the first :math:`\operatorname{argmax}_j s_j` (a class with :math:`p_j = 0`,
    such as a masked ``-inf`` logit, adds :math:`0 \log 0 = 0` to the entropy). The first two
    carry gradients, which autograd derives here and the fused kernels write out:

    .. math:: \frac{\partial \log p_t}{\partial s_j} = [j = t] - p_j, \qquad
              \frac{\partial H}{\partial s_j} = -p_j (\log p_j + H), \qquad
              \frac{\partial}{\partial x} = \frac{\lambda}{T}\,(1 - \tanh^2)
              \frac{\partial}{\partial s}

    Args:
        logits: ``(M, C)`` logits.
        target: ``(M,)`` class indices in ``[0, C)`` or ``ignore_index``.
        temperature: :math:`T > 0`; logit_scale: :math:`\lambda`; softcap: :math:`c` or None.
    Returns:
        :class:`TokenStatistics` of ``(M,)`` tensors in float32 (float64 for float64 logits);
        0 (False) where the target is ``ignore_index``.

    Example:
        >>> logits = torch.tensor([[1.0, 0.5, 2.0], [0.5, 3.0, 1.0]])
        >>> token_statistics(logits, torch.tensor([2, 0]))  # doctest: +NORMALIZE_WHITESPACE
        TokenStatistics(log_prob=tensor([-0.4644, -2.6967]), entropy=tensor([0.9060, 0.5876]),
            log_sum_sq_probs=tensor([-0.7589, -0.3687]), mean_logits=tensor([1.1667, 1.5000]),
            is_top1=tensor([ True, False]))
    """
    dtype = accumulation_dtype(logits.dtype)
    s = logits.to(dtype) * logit_scale
    s = apply_softcap(s, softcap) / temperature
    log_probs = log_softmax(s)
    counted, log_prob, _, _ = nll_terms(log_probs, target, None, ignore_index)
    p_log_p = torch.exp(log_probs) * log_probs.clamp_min(LOG_PROB_FLOOR)
    entropy = torch.where(counted, -p_log_p.sum(-1), 0.0)
    log_sum_sq = torch.where(counted, logsumexp(2 * log_probs), 0.0)
    mean = torch.where(counted, s.mean(-1), 0.0)
    top1 = counted & (s.argmax(-1) == torch.where(counted, target, 0))
    return TokenStatistics(log_prob, entropy, log_sum_sq, mean, top1)


class DistillationTerms(NamedTuple):
    """Per-row quantities of the distillation loss between a student's and a teacher's logits."""

    counted: Tensor  # (M,) bool: the target is not ignore_index (all True without a target)
    soft: Tensor  # (M,) generalized JSD at the temperature (0 where ignored)
    hard: Tensor  # (M,) cross entropy of the student's raw logits (0 where ignored or unused)
    loss: Tensor  # (M,) (1 - hard_weight) * soft + hard_weight * hard


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    r""":math:`\mathrm{KL}(p \,\|\, q) = \sum_j p_j (\log p_j - \log q_j)` per row."""
    return (torch.exp(log_p) * (log_p - log_q)).sum(-1)


def distillation_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    beta: float = 0.0,
    temperature: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
) -> DistillationTerms:
    r"""TRL's generalized Jensen-Shannon divergence between the student's and the teacher's
    distributions at ``temperature``, plus an optional hard cross entropy: what knowledge
    distillation (GKD, on-policy distillation) takes from two LM heads.

    With :math:`p = \mathrm{softmax}(s / T)` (student), :math:`q = \mathrm{softmax}(t / T)`
    (teacher) and :math:`m = \beta q + (1-\beta) p`:

    .. math:: D_\beta = \begin{cases}
              \mathrm{KL}(q \,\|\, p) & \beta = 0 \text{ (forward KL)} \\
              \mathrm{KL}(p \,\|\, q) & \beta = 1 \text{ (reverse KL)} \\
              \beta\,\mathrm{KL}(q \,\|\, m) + (1-\beta)\,\mathrm{KL}(p \,\|\, m) & \text{otherwise}
              \end{cases}

    (:math:`\log m` is a ``logaddexp`` of :math:`\log p + \log(1-\beta)` and
    :math:`\log q + \log\beta`), and per row
    :math:`\ell = (1-\lambda) D_\beta + \lambda\,\mathrm{ce}(s, y)` with :math:`\lambda` =
    ``hard_weight``: the hard term is the cross entropy of the student's *raw* logits
    (temperature 1, as Liger Kernel's distillation losses take it). Log-probabilities are
    floored at :data:`LOG_PROB_FLOOR`, so a class masked in both models adds 0, not NaN.
    There is no :math:`T^2` factor (TRL has none either).

    Args:
        student_logits: ``(M, V)`` logits of the model being trained.
        teacher_logits: ``(M, V)`` logits of the teacher (gradients flow through both here;
            :func:`xentkit.linear_distillation_loss` detaches the teacher).
        target: ``(M,)`` labels or ``ignore_index``, or None (every row counts).
        beta: :math:`\beta \in [0, 1]`.
        temperature: :math:`T > 0`.
        hard_weight: :math:`\lambda \in [0, 1]`; above 0 it needs ``target``.
    Returns:
        :class:`DistillationTerms` of ``(M,)`` tensors in float32 (float64 for float64 logits).

    Example:
        >>> s = torch.tensor([[1.0, 0.5, 2.0], [0.5, 3.0, 1.0]])
        >>> t = torch.tensor([[2.0, 0.5, 1.0], [0.5, 3.0, 1.0]])
        >>> distillation_terms(s, t, torch.tensor([2, 1]), beta=0.5, hard_weight=0.5).loss
        tensor([0.2799, 0.0984])
    """
    dtype = accumulation_dtype(student_logits.dtype)
    log_p = log_softmax(student_logits.to(dtype) / temperature).clamp_min(LOG_PROB_FLOOR)
    log_q = log_softmax(teacher_logits.to(dtype) / temperature).clamp_min(LOG_PROB_FLOOR)
    if beta == 0:
        soft = _kl(log_q, log_p)
    elif beta == 1:
        soft = _kl(log_p, log_q)
    else:
        b = torch.tensor(beta, dtype=dtype, device=log_p.device)
        log_m = torch.logaddexp(log_p + torch.log1p(-b), log_q + torch.log(b))
        soft = beta * _kl(log_q, log_m) + (1 - beta) * _kl(log_p, log_m)
    if target is None:
        counted = torch.ones(soft.shape, dtype=torch.bool, device=soft.device)
        hard = torch.zeros_like(soft)
    else:
        counted = target != ignore_index
        hard = torch.zeros_like(soft)
        if hard_weight > 0:
            hard = nll_terms(log_softmax(student_logits.to(dtype)), target, None, ignore_index).loss
    soft = torch.where(counted, soft, 0.0)
    return DistillationTerms(counted, soft, hard, (1 - hard_weight) * soft + hard_weight * hard)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    beta: float = 0.0,
    temperature: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """:func:`distillation_terms`' loss, reduced: ``mean`` over the counted rows (a mean over
    none is 0 / 0 = NaN, as in PyTorch's ``cross_entropy``), ``sum``, or ``none``.

    Example:
        >>> s = torch.tensor([[1.0, 0.5, 2.0], [0.5, 3.0, 1.0]])
        >>> t = torch.tensor([[2.0, 0.5, 1.0], [0.5, 3.0, 1.0]])
        >>> distillation_loss(s, t, torch.tensor([2, -100]))
        tensor(0.3973)
    """
    terms = distillation_terms(
        student_logits, teacher_logits, target, beta, temperature, hard_weight, ignore_index
    )
    return reduce(terms.loss, reduction, terms.counted.sum())


class LossStats(NamedTuple):
    """What ``return_stats=True`` returns beside the loss, all detached."""

    z_loss: Tensor  # the z-loss part of the loss, with the loss's reduction
    accuracy: Tensor  # () fraction of counted positions whose argmax is the target
    lse: Tensor  # per position log-sum-exp of the logits (0 where ignored)
    entropy: Tensor  # () mean entropy of the softmax over counted positions


def loss_stats(
    lse: Tensor,
    entropy: Tensor,
    is_top1: Tensor,
    counted: Tensor,
    z_loss: float,
    reduction: str,
) -> LossStats:
    r""":class:`LossStats` from per-row log-sum-exp, entropy and top-1 hit (any values where
    not ``counted``): the z-loss part :math:`z\,\mathrm{lse}^2` per counted row reduced as in
    :func:`reduce_cross_entropy` (the mean over counted rows), accuracy and entropy averaged
    over counted rows (NaN when none counts, as a mean over nothing).

    Example:
        >>> lse, entropy = torch.tensor([2.0, 1.0, 3.0]), torch.tensor([0.5, 0.25, 1.0])
        >>> hit, counted = torch.tensor([True, False, True]), torch.tensor([True, True, False])
        >>> loss_stats(lse, entropy, hit, counted, 1e-2, "mean")  # doctest: +NORMALIZE_WHITESPACE
        LossStats(z_loss=tensor(0.0250), accuracy=tensor(0.5000), lse=tensor([2., 1., 0.]),
                  entropy=tensor(0.3750))
    """
    lse = torch.where(counted, lse, 0.0).detach()
    z = z_loss * lse * lse
    count = counted.sum()
    z_part = reduce(z, reduction, count)
    accuracy = (is_top1 & counted).sum() / count
    mean_entropy = torch.where(counted, entropy, 0.0).sum() / count
    return LossStats(z_part.detach(), accuracy.to(lse.dtype), lse, mean_entropy.detach())


def logits_stats(
    logits: Tensor, target: Tensor, ignore_index: int, softcap: float | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per row of ``(M, C)`` logits (after the softcap): ``(lse, entropy, is_top1, counted)``,
    the inputs of :func:`loss_stats`."""
    x = apply_softcap(logits.detach().to(accumulation_dtype(logits.dtype)), softcap)
    counted = target != ignore_index
    log_probs, lse = log_softmax_and_lse(x)
    entropy = -(torch.exp(log_probs) * log_probs.clamp_min(LOG_PROB_FLOOR)).sum(-1)
    top1 = x.argmax(-1) == target if x.shape[-1] else torch.zeros_like(counted)
    return lse, entropy, top1, counted
