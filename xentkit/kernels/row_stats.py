r"""The per-row statistics of logits, over one block of classes, and how blocks merge.

Everything a loss or a training loop takes from a row of logits :math:`x` (after any softcap,
scale and temperature) follows from a few sums over its classes. Over a block :math:`B` of
classes, with the block's maximum :math:`m_B` and shift :math:`\bar m_B` (:math:`m_B`, or 0
when the block is empty or all :math:`-\infty`):

.. math:: S_B = \sum_{j \in B} e^{x_j - \bar m_B}, \quad
          X_B = \sum_{j \in B} e^{x_j - \bar m_B} (x_j - \bar m_B), \quad
          Q_B = \sum_{j \in B} e^{2 (x_j - \bar m_B)}, \quad
          L_B = \sum_{j \in B} w_j x_j, \quad
          t_B = x_t \,[t \in B], \quad a_B = \operatorname{argmax}_{j \in B} x_j

(:math:`w` the class weights, 1 without them; :math:`a_B` the *first* maximum, as
``torch.argmax``). Two blocks merge by rescaling to the larger maximum :math:`M`:

.. math:: S = \sum_K S_K e^{\bar m_K - \bar M}, \quad
          X = \sum_K e^{\bar m_K - \bar M} \big(X_K + S_K (\bar m_K - \bar M)\big), \quad
          Q = \sum_K Q_K e^{2(\bar m_K - \bar M)}, \quad
          L = \sum_K L_K, \quad t = \sum_K t_K

over blocks :math:`K = A, B, \dots` in class order; :math:`a` is that of the first block whose
maximum is :math:`M` (so a tie keeps the first maximum). :math:`X` is kept relative to the
shift so that the entropy :math:`\log S - X / S` loses no digits to a large log-sum-exp. A
vocabulary shard on another rank is one more block: the vocab-parallel paths gather every
rank's statistics and merge them with :func:`merge` along the rank dimension. From the merged
statistics (:func:`finish`):

.. math:: \mathrm{lse} = \bar M + \log S, \quad \log p_t = t - \mathrm{lse}, \quad
          H = -\sum_j p_j \log p_j = \log S - X / S, \quad
          \log \textstyle\sum_j p_j^2 = \log Q - 2 \log S

and the gradients of :math:`\sum_i a_i \log p_{t_i} + b_i H_i` with respect to the logits,
which need only :math:`\mathrm{lse}` and :math:`H` (:func:`log_prob_grad`):

.. math:: \frac{\partial}{\partial x_j} = a\,([j = t] - p_j) - b\,p_j (\log p_j + H)

:func:`xentkit.reference.token_statistics` is the spec these are tested against; the chunked
paths take a whole row as one block, the vocab-parallel paths one block per rank, and the
Triton kernels transcribe :func:`merge` for their blocks of classes
(:mod:`xentkit.kernels.triton`), tested against this module.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from xentkit import reference


class RowStats(NamedTuple):
    """The statistics of one block of classes for each row (a field is None when not asked
    for). ``max`` is the block's true maximum; the sums are relative to :func:`shift` of it."""

    max: Tensor  # m_B, -inf for an empty or all -inf block
    sum_exp: Tensor  # S_B
    target: Tensor  # t_B: the target's logit where the block holds it, else 0
    sum_exp_x: Tensor | None = None  # X_B (relative to the shift), for the entropy
    sum_exp2: Tensor | None = None  # Q_B, for log sum p^2
    sum_x: Tensor | None = None  # L_B, for the mean logit and label smoothing
    argmax: Tensor | None = None  # a_B as a class index of the whole row (int64)


def shift(row_max: Tensor) -> Tensor:
    """The shift :math:`\\bar m` subtracted before exponentiating: the maximum, or 0 where it is
    ``-inf`` (so that ``exp(-inf - shift)`` is 0, not NaN). A ``+inf`` maximum stays, so that
    such a row's results are NaN, as in PyTorch."""
    return torch.where(row_max == float("-inf"), 0.0, row_max)


def block(
    x: Tensor,
    target: Tensor | None = None,
    *,
    owned: Tensor | None = None,
    class_weight: Tensor | None = None,
    offset: int = 0,
    entropy: bool = False,
    sum_sq: bool = False,
    sum_x: bool = False,
    argmax: bool = False,
) -> RowStats:
    """:class:`RowStats` of ``(rows, B)`` logits ``x`` (in the accumulation dtype), computed in
    :func:`row_slices` (each slice's temporaries a few MiB, whatever the number of rows).

    Args:
        x: the block's logits, already transformed (softcap, scale, temperature).
        target: ``(rows,)`` class indices *within the block*; rows where ``owned`` is False (the
            target lies in another block) may hold any index in range.
        owned: ``(rows,)`` bool, which rows' targets lie in this block (all when None).
        class_weight: ``(B,)`` weights of :math:`L_B` (1 when None).
        offset: the block's first class in the whole row (for ``argmax``).
        entropy, sum_sq, sum_x, argmax: which optional statistics to compute.

    Example:
        >>> x = torch.tensor([[1.0, 0.5, 2.0], [0.5, 3.0, 1.0]])
        >>> s = block(x, torch.tensor([2, 1]), entropy=True)
        >>> finish(s).log_prob
        tensor([-0.4644, -0.1967])
    """
    asked = (entropy, sum_sq, sum_x, argmax)
    parts = []
    for rows in row_slices(x):
        per_row = (None if t is None else t[rows] for t in (target, owned))
        parts.append(_block(x[rows], *per_row, class_weight, offset, *asked))
    return RowStats(*(None if f[0] is None else torch.cat(f) for f in zip(*parts, strict=True)))


def _block(x, target, owned, class_weight, offset, entropy, sum_sq, sum_x, argmax) -> RowStats:
    """:func:`block` of one slice of rows."""
    rows = x.shape[:-1]
    # An empty block (an uneven vocabulary shard) holds nothing: its maximum is -inf.
    row_max = x.amax(-1) if x.shape[-1] else x.new_full(rows, float("-inf"))
    shifted = x - shift(row_max).unsqueeze(-1)
    e = torch.exp(shifted)
    if target is None or not x.shape[-1]:
        picked = x.new_zeros(rows)
    else:
        picked = x.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        if owned is not None:
            picked = torch.where(owned, picked, 0.0)
    stats = RowStats(row_max, e.sum(-1), picked)
    if entropy:
        # A -inf logit has e = 0: floored, it adds 0 * floor = 0 instead of 0 * -inf = NaN.
        floored = shifted.clamp_min_(reference.LOG_PROB_FLOOR)
        stats = stats._replace(sum_exp_x=(e * floored).sum(-1))
    if sum_sq:
        stats = stats._replace(sum_exp2=(e * e).sum(-1))
    if sum_x:
        stats = stats._replace(sum_x=x.sum(-1) if class_weight is None else x @ class_weight)
    if argmax:
        first = x.argmax(-1) if x.shape[-1] else torch.zeros(rows, dtype=torch.long)
        stats = stats._replace(argmax=first.to(x.device) + offset)
    return stats


# The torch-op row passes over a chunk of rows run slice by slice of about this many bytes
# of logits: their temporaries (the shifted logits, their exponentials, products of the two)
# then stay this small and in the cache, instead of several chunk-sized tensors.
SLICE_BYTES = 8 * 2**20


def row_slices(x: Tensor) -> list[slice]:
    """Consecutive slices of the rows of ``(m, V)`` ``x``, each about :data:`SLICE_BYTES`.

    Example:
        >>> row_slices(torch.empty(5, 2**20))
        [slice(0, 2, None), slice(2, 4, None), slice(4, 6, None)]
    """
    rows = max(1, SLICE_BYTES // max(1, x.shape[-1] * x.element_size()))
    return [slice(start, start + rows) for start in range(0, max(1, x.shape[0]), rows)]


def stack(parts: list[RowStats]) -> RowStats:
    """Several blocks' statistics stacked on a new leading dimension, for :func:`merge`."""
    return RowStats(*(None if f[0] is None else torch.stack(f) for f in zip(*parts, strict=True)))


def merge(stats: RowStats) -> RowStats:
    """Merge statistics stacked along dimension 0 (blocks in class order) into one block's.

    Example:
        >>> x = torch.tensor([[1.0, 0.5, 2.0, -1.0]])
        >>> parts = [block(x[:, :2], entropy=True, argmax=True),
        ...          block(x[:, 2:], offset=2, entropy=True, argmax=True)]
        >>> merged, whole = merge(stack(parts)), block(x, entropy=True, argmax=True)
        >>> torch.allclose(merged.sum_exp, whole.sum_exp), int(merged.argmax)
        (True, 2)
    """
    new_max = stats.max.amax(0)
    # A block with no finite class weighs 0 (its sums are 0; exp(-inf) guards overflow).
    scale = torch.where(
        stats.max == float("-inf"), 0.0, torch.exp(shift(stats.max) - shift(new_max))
    )
    merged = RowStats(new_max, (stats.sum_exp * scale).sum(0), stats.target.sum(0))
    if stats.sum_exp_x is not None:
        moved = stats.sum_exp_x + stats.sum_exp * (shift(stats.max) - shift(new_max))
        merged = merged._replace(sum_exp_x=(moved * scale).sum(0))
    if stats.sum_exp2 is not None:
        merged = merged._replace(sum_exp2=(stats.sum_exp2 * scale * scale).sum(0))
    if stats.sum_x is not None:
        merged = merged._replace(sum_x=stats.sum_x.sum(0))
    if stats.argmax is not None:
        # The first block holding the maximum (argmax over dim 0 returns the first).
        winner = torch.where(stats.max == new_max, 1, 0).argmax(0, keepdim=True)
        merged = merged._replace(argmax=stats.argmax.gather(0, winner).squeeze(0))
    return merged


class RowOutputs(NamedTuple):
    """What :func:`finish` derives from a whole row's statistics (None where not asked)."""

    lse: Tensor
    log_prob: Tensor
    entropy: Tensor | None
    log_sum_sq_probs: Tensor | None
    mean_logits: Tensor | None
    is_top1: Tensor | None


def finish(
    stats: RowStats, target: Tensor | None = None, num_classes: int | None = None
) -> RowOutputs:
    """``lse``, the target's ``log p``, the entropy, ``log sum p^2``, the mean logit (with
    ``num_classes``: :math:`L / V`) and whether ``target`` (global class ids) is the first
    argmax, of whole rows."""
    log_sum = torch.log(stats.sum_exp)
    lse = shift(stats.max) + log_sum
    entropy = None if stats.sum_exp_x is None else log_sum - stats.sum_exp_x / stats.sum_exp
    log_sum_sq = None if stats.sum_exp2 is None else torch.log(stats.sum_exp2) - 2 * log_sum
    mean = None if stats.sum_x is None or num_classes is None else stats.sum_x / num_classes
    top1 = None if stats.argmax is None or target is None else stats.argmax == target
    return RowOutputs(lse, stats.target - lse, entropy, log_sum_sq, mean, top1)


def log_prob_grad(
    x: Tensor,
    lse: Tensor,
    a: Tensor,
    b: Tensor | None = None,
    entropy: Tensor | None = None,
    target: Tensor | None = None,
    owned: Tensor | None = None,
) -> Tensor:
    r""":math:`a([j = t] - p_j) - b\,p_j(\log p_j + H)` for a ``(rows, B)`` block of logits
    ``x``, written over ``x`` (scratch) in :func:`row_slices`. ``a``, ``b``, ``lse``,
    ``entropy`` are per row; ``target``/``owned`` as in :func:`block` (no target term without
    ``target``). :math:`\log p` is floored at :data:`xentkit.reference.LOG_PROB_FLOOR` so that
    a masked class adds 0, not NaN."""
    for rows in row_slices(x):
        per_row = (None if t is None else t[rows] for t in (b, entropy, target, owned))
        _log_prob_grad(x[rows], lse[rows], a[rows], *per_row)
    return x


def _log_prob_grad(x, lse, a, b, entropy, target, owned) -> None:
    """:func:`log_prob_grad` of one slice of rows, in place."""
    log_p = x.sub_(lse.unsqueeze(-1))
    if b is None:
        grad = log_p.exp_().mul_(-a.unsqueeze(-1))
    else:
        p = torch.exp(log_p)
        grad = log_p.clamp_min_(reference.LOG_PROB_FLOOR).mul_(-b.unsqueeze(-1))
        grad.sub_((a + b * entropy).unsqueeze(-1)).mul_(p)
    if target is not None and x.shape[-1]:
        at_target = a if owned is None else torch.where(owned, a, 0.0)
        grad.scatter_add_(-1, target.unsqueeze(-1), at_target.unsqueeze(-1))


def loss_rows(x: Tensor, target: Tensor, counted: Tensor, triton_rows: bool = False):
    """``(lse, entropy, is_top1)`` of each row of ``(m, V)`` logits ``x`` (in the accumulation
    dtype, after any softcap): the per-row inputs of :func:`xentkit.reference.loss_stats`,
    computed by :func:`block` (or its Triton kernel) and :func:`finish`."""
    safe = torch.where(counted, target, 0)
    if triton_rows:
        from xentkit.kernels import triton as kernels

        stats = kernels.row_stats_block(x, safe, entropy=True, argmax=True)
    else:
        stats = block(x, safe, entropy=True, argmax=True)
    done = finish(stats, safe)
    return done.lse, done.entropy, done.is_top1


# Logits per chunk of rows when the statistics are read from logits that already exist.
STATS_CHUNK_ELEMENTS = 1 << 22


def logits_loss_rows(
    logits: Tensor,
    target: Tensor,
    ignore_index: int,
    softcap: float | None,
    triton_rows: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`loss_rows` of existing ``(M, V)`` logits, chunk by chunk of rows (so that the
    temporaries stay a few chunks' size), and the ``counted`` mask: one read of the logits, no
    gradient."""
    acc = reference.accumulation_dtype(logits.dtype)
    counted = target != ignore_index
    rows, num_classes = logits.shape
    step = (
        rows
        if torch.compiler.is_compiling()
        else max(1, STATS_CHUNK_ELEMENTS // max(1, num_classes))
    )
    parts = []
    with torch.no_grad():
        for start in range(0, max(rows, 1), step):
            chunk = slice(start, start + step)
            x = reference.apply_softcap(logits[chunk].to(acc), softcap)
            if triton_rows:
                x = x.contiguous()
            parts.append(loss_rows(x, target[chunk], counted[chunk], triton_rows))
    return (*(torch.cat(p) for p in zip(*parts, strict=True)), counted)


def cross_entropy_coefficients(
    counted: Tensor,
    w_t: Tensor,
    total_w: Tensor | float,
    num_classes: int,
    label_smoothing: float,
    z_loss: float,
    ce_scale: float | Tensor,
    z_scale: float | Tensor,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    r"""Per-row coefficients of the gradient of :math:`\sum_i a_i \mathrm{ce}_i + b_i z_i`.

    :math:`\partial/\partial x'_{ij} = p_{ij}(P_i + Z_i \mathrm{lse}_i) - T_i[j = t_i]
    - E_i w_j` with :math:`P = a((1-\varepsilon) w_t + \varepsilon W / C)`,
    :math:`T = a(1-\varepsilon) w_t`, :math:`E = a \varepsilon / C`, :math:`Z = 2 b z`
    (all 0 on ignored rows), differentiating the terms of
    :func:`xentkit.reference.cross_entropy_terms` through :math:`\partial \mathrm{lse} /
    \partial x' = p`.
    """
    eps = label_smoothing
    a = torch.where(counted, torch.as_tensor(ce_scale, dtype=w_t.dtype, device=w_t.device), 0.0)
    t_coef = (1 - eps) * a * w_t
    p_coef = t_coef + a * (eps * total_w / num_classes) if eps else t_coef
    s_coef = a * (eps / num_classes) if eps else None
    z_coef = None
    if z_loss:
        b = torch.as_tensor(z_scale, dtype=w_t.dtype, device=w_t.device)
        z_coef = torch.where(counted, 2 * z_loss * b, 0.0)
    return p_coef, t_coef, s_coef, z_coef
