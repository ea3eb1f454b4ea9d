r"""Vocab-parallel cross entropy over ``torch.distributed``: each rank holds a slice of the classes.

When the vocabulary (or the classifier that makes it) is too large for one device, tensor-parallel
training gives each rank of a process group a contiguous slice of the classes:
``logits[:, vocab_start : vocab_start + V_r]`` or ``weight[vocab_start : vocab_start + V_r]``.
The slices may differ in size. Every rank holds the *same* rows (the full batch of targets and,
for :func:`linear_cross_entropy`, the full hidden states) and computes the same loss.

How the loss is split. Rank :math:`r` reduces its slice of each row to three numbers: its local
log-sum-exp :math:`\mathrm{lse}_r`, the target logit :math:`x_t` when it owns class :math:`t`
(0 otherwise) and, with label smoothing, :math:`\sum_{c \in r} w_c x_c`. One ``all_gather`` of
these ``(M, 2 or 3)`` numbers gives every rank the global
:math:`\mathrm{lse} = \log \sum_r e^{\mathrm{lse}_r}`, :math:`x_t` and
:math:`\sum_c w_c x_c`, from which :mod:`xentkit.reference`'s per-row terms follow
(``ce = (1 - eps) * nll + eps * smooth``, ``z = z_loss * lse**2``; the mean divides ``ce`` by the
sum of target weights and ``z`` by the number of counted rows). Label smoothing is exact over the
whole vocabulary, not per slice. The gradient of a slice is local:

.. math:: \frac{\partial \ell_i}{\partial x_c} = p_c \Big(a_i \big((1-\varepsilon) w_{t_i}
          + \varepsilon \tfrac{W}{V}\big) + 2 b_i z\,\mathrm{lse}_i\Big)
          - a_i (1-\varepsilon) w_{t_i} [c = t_i] - a_i \varepsilon \tfrac{w_c}{V}

with :math:`W = \sum_c w_c`, :math:`a_i, b_i` the incoming gradient of the row's
cross-entropy and z-loss parts, times :math:`1 - \tanh^2(x_c / s)` under a softcap :math:`s`.

Collectives per call (all on ``group``; the targets and class weights are identical on every
rank, so the mean's denominators need none):

* :func:`vocab_parallel_cross_entropy`: forward 2 (an ``all_gather`` of 18 integers that checks
  the inputs, one ``(M, k)`` ``all_gather``), backward 0;
* :func:`linear_cross_entropy`: forward ``1 + ceil(M / chunk_size)`` (the check, then one
  ``(chunk, k)`` ``all_gather`` per chunk of tokens: a chunk's gradient is written in the forward
  pass as soon as its global log-sum-exp is known, which costs one tiny collective per chunk
  instead of a second pass of logits matrix products), backward 1 (``all_reduce`` of the
  ``(M, D)`` gradient of the hidden states; 0 when they need none).

Bytes per rank and step for :func:`linear_cross_entropy` (``R`` ranks, ``s`` bytes per element):
``(R - 1) * M * k * 4`` gathered statistics ``+ 2 * (R - 1) / R * M * D * s`` for a ring
all-reduce of the hidden states' gradient; linear in ``M``, independent of ``V``.

Errors. Every rank first shares a small fixed-size report of its inputs (shapes, dtype, options,
a hash of the targets and class weights, the range of the targets); every check that could
differ between ranks is decided from that shared report, so all ranks raise the same error
instead of one raising while the others wait in a collective.

From a Megatron-style tensor-parallel model: pass the tensor-parallel group, the local rows of
the output layer (``ColumnParallelLinear``'s weight: rank ``r`` holds the ``r``-th slice, the
order :func:`linear_cross_entropy` assumes) and the replicated hidden states and labels. Its
backward already sums the hidden states' gradient over the group, so feed them through an op
whose backward sums nothing (not ``copy_to_tensor_model_parallel_region``; with sequence
parallelism, an all-gather whose backward keeps this rank's part of the sequence without a
reduce-scatter).

DTensor. :func:`xentkit.cross_entropy` and :func:`xentkit.linear_cross_entropy` given DTensor
arguments (``torch.distributed.tensor``, e.g. from ``parallelize_module``) run the functions
above over the process group of the mesh dim that splits the classes, read from the placements:

* ``linear_cross_entropy(h, head.weight, t, head.bias)`` with ``head`` parallelised by
  ``ColwiseParallel(use_local_output=False)``: weight and bias ``Shard(0)`` on one mesh dim and
  ``Replicate()`` on the others (on a ``(dp, tp)`` mesh, the ``tp`` sub-mesh's group), ``h``
  and ``t`` plain or replicated; the weight's and bias's gradients come back as DTensors in
  their placements (:func:`dtensor_linear_cross_entropy`);
* ``cross_entropy(logits, t)`` with the logits' class dim split (``Shard(1)`` of
  ``(N, C, ...)``, what ``loss_parallel()`` takes: flatten a ``(B, T, V)`` head output first):
  the values and gradients of ``F.cross_entropy`` under ``loss_parallel()``, with every option
  above (:func:`dtensor_cross_entropy`).

Uneven shards follow torch's layout (``torch.chunk``'s: the last ranks short, possibly empty).
Any other placement (split along the batch or along D, partial, over several mesh dims) raises
a ValueError that names the argument and the fix, on every rank and before any collective.
Under FSDP2 the loss sees, in forward, the weight FSDP has gathered (a plain tensor), so nothing
changes; an LM head that ``fully_shard`` split on its own, used outside its forward, is no
vocabulary-parallel weight (every rank has its own batch) and the shared check says so.
``examples/tensor_parallel.py`` trains a model parallelised this way.

Example (a one-process group; ``examples/vocab_parallel.py`` runs two):
    >>> import torch, torch.distributed as dist
    >>> from xentkit.distributed import vocab_parallel_cross_entropy
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> logits = torch.tensor([[1.0, 0.5, 2.0], [0.5, 3.0, 1.0]])
    >>> vocab_parallel_cross_entropy(logits, torch.tensor([2, 1]))
    tensor(0.3306)
    >>> dist.destroy_process_group()
"""

from __future__ import annotations

import math
import struct
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from xentkit import _autocast, _checks
from xentkit.kernels import row_stats
from xentkit.kernels._fused_op import scale_gradients
from xentkit.kernels.linear_log_probs import HeadOutputs, Outputs, Transform
from xentkit.reference import REDUCTIONS, LossStats, accumulation_dtype, loss_stats

__all__ = [
    "dtensor_cross_entropy",
    "dtensor_linear_cross_entropy",
    "linear_cross_entropy",
    "linear_head_outputs",
    "vocab_parallel_cross_entropy",
]

# Default rows per chunk of linear_cross_entropy: about this many logits (16 MiB in float32)
# per chunk, computed from the largest slice so every rank runs the same number of collectives.
CHUNK_ELEMENTS = 1 << 22

# The fields of the report every rank shares before any collective whose size depends on them.
_FIELDS = (
    "error", "rows", "shard", "dim", "dtype", "vocab_start", "target_hash", "target_min",
    "target_max", "ignore_index", "reduction", "label_smoothing", "z_loss", "softcap",
    "weight_len", "weight_hash", "backward", "chunk_size", "temperature", "logit_scale",
)  # fmt: skip
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Fields that must be equal on every rank, with what they mean to the user.
_SAME = {
    "rows": "rows (target elements): every rank passes the full batch",
    "dim": "hidden size D",
    "dtype": "dtype",
    "target_hash": "targets: every rank passes the same target tensor",
    "ignore_index": "ignore_index",
    "reduction": "reduction",
    "label_smoothing": "label_smoothing",
    "z_loss": "z_loss",
    "softcap": "softcap",
    "weight_len": "class_weight shape: the full (V,) vector on every rank",
    "weight_hash": "class_weight values: the same (V,) vector on every rank",
    "backward": "whether the hidden states require grad (the backward pass has a collective)",
    "chunk_size": "chunk_size: every rank must run the same number of chunks",
    "temperature": "temperature",
    "logit_scale": "logit_scale",
}


class _Plan(NamedTuple):
    """What every rank agreed on in the check: where its slice lies and the loss's options."""

    group: Any
    world_size: int
    vocab_start: int
    num_classes: int  # V, the global vocabulary
    chunk_size: int
    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss: float
    softcap: float | None


class _Targets(NamedTuple):
    """Per-row facts about the targets, computed locally (the targets are the same everywhere)."""

    counted: Tensor  # (M,) bool: not ignore_index
    weight: Tensor  # (M,) w of the target class, 0 where ignored
    owned: Tensor  # (M,) bool: the target class is in this rank's slice
    local: Tensor  # (M,) the target's column in the slice (0 where not owned)
    total_weight: float  # W = sum of all class weights (V without weights)


def _float_bits(x: float) -> int:
    """A float as the int64 with the same bits, so it travels exactly in an integer tensor."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _rank(group) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; a clear error when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group("
            "'gloo' or 'nccl', ...) on every rank first (torchrun sets the environment); in a "
            "single process use xentkit.cross_entropy or xentkit.linear_cross_entropy without a "
            "group."
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError(
            "this process is not a member of the given process group: pass the tensor-parallel "
            "group this rank belongs to (or None for the default group)."
        )
    return rank, dist.get_world_size(group)


def _report(
    target: Tensor,
    shard: int,
    dim: int,
    dtype: torch.dtype,
    vocab_start: int | None,
    weight: Tensor | None,
    options: tuple[int, str, float, float, float | None],
    backward: int = 0,
    chunk_size: int | None = None,
    transform: tuple[float, float] = (0.0, 0.0),
) -> dict[str, int]:
    """This rank's inputs, summarised in integers (``transform``: the temperature and logit
    scale of :func:`linear_head_outputs`, 0 for the losses)."""
    ignore_index, reduction, label_smoothing, z_loss, softcap = options
    flat = target.reshape(-1)
    counted = flat[flat != ignore_index]
    # A position-weighted sum: any difference in the targets between ranks changes it.
    position = torch.arange(flat.numel(), device=flat.device) % 65521 + 1
    weight_hash = 0
    if weight is not None:
        index = torch.arange(1, weight.numel() + 1, device=weight.device, dtype=torch.float64)
        weight_hash = _float_bits(float((weight.double() * index).sum()))
    return {
        "error": 0,
        "rows": flat.numel(),
        "shard": shard,
        "dim": dim,
        "dtype": _DTYPES.index(dtype),
        "vocab_start": -1 if vocab_start is None else vocab_start,
        "target_hash": int((flat * position).sum()),
        "target_min": int(counted.min()) if counted.numel() else 0,
        "target_max": int(counted.max()) if counted.numel() else -1,
        "ignore_index": ignore_index,
        "reduction": REDUCTIONS.index(reduction),
        "label_smoothing": _float_bits(label_smoothing),
        "z_loss": _float_bits(z_loss),
        "softcap": _float_bits(-1.0 if softcap is None else softcap),
        "weight_len": -1 if weight is None else weight.numel(),
        "weight_hash": weight_hash,
        "backward": backward,
        "chunk_size": chunk_size or 0,
        "temperature": _float_bits(transform[0]),
        "logit_scale": _float_bits(transform[1]),
    }


def _agree(check, report, group, rank: int, world_size: int, device) -> dict[str, list[int]]:
    """Run this rank's local ``check`` (which builds its report), share the reports with one
    ``all_gather`` and raise on every rank if any rank failed its check.

    A failed local check is not raised at once: the other ranks would wait in the gather.
    """
    error = None
    try:
        check()
        mine = report()
    except Exception as exc:
        error, mine = exc, {"error": 1}
    local = torch.tensor([mine.get(f, 0) for f in _FIELDS], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered).cpu().T.tolist()
    reports = dict(zip(_FIELDS, table, strict=True))
    if error is not None:
        raise error
    failed = [r for r, e in enumerate(reports["error"]) if e]
    if failed:
        raise RuntimeError(
            f"rank(s) {failed} of the process group rejected their inputs (see the error raised "
            f"there); rank {rank} stops too, so that no rank waits in a collective."
        )
    return reports


def _plan(
    reports, rank: int, world_size: int, group, options, chunk_size: int | None, hint: str = ""
) -> _Plan:
    """Check, from the shared reports only (so every rank reaches the same verdict), that the
    ranks agree and that their slices tile the vocabulary; then lay out this rank's slice.
    ``hint`` ends the message of a disagreement (the caller knows where the group came from)."""
    for field, meaning in _SAME.items():
        values = reports[field]
        if len(set(values)) > 1:
            raise ValueError(
                f"the ranks disagree on the {meaning}; per rank: {_shown(field, values)}. "
                f"Pass the same value on every rank of the group.{hint}"
            )
    shards, starts = reports["shard"], reports["vocab_start"]
    num_classes = sum(shards)
    if all(s < 0 for s in starts):
        vocab_start = sum(shards[:rank])
    elif any(s < 0 for s in starts):
        raise ValueError(
            f"vocab_start is given on some ranks only (per rank: {starts}, -1 = None): give it on "
            "every rank or on none (then slices follow the ranks' order)."
        )
    else:
        slices = sorted(zip(starts, shards, strict=True))
        ends = [0] + [s + n for s, n in slices]
        if any(s != e for (s, _), e in zip(slices, ends, strict=False)):
            raise ValueError(
                f"the slices [vocab_start, vocab_start + V_r) must tile [0, {num_classes}) "
                f"without gaps or overlaps; got starts {starts} and sizes {shards} per rank."
            )
        vocab_start = starts[rank]
    low, high = min(reports["target_min"]), max(reports["target_max"])
    if low < 0 or high >= num_classes:
        value = low if low < 0 else high
        raise IndexError(
            f"Target {value} is out of bounds: targets are global class ids in [0, {num_classes}) "
            f"(the sum of the ranks' slices {shards}) or ignore_index={options[0]}."
        )
    if reports["weight_len"][0] not in (-1, num_classes):
        raise RuntimeError(
            f"class_weight must be the full (V,) vector, V = {num_classes} (the sum of the "
            f"slices {shards}), on every rank; got length {reports['weight_len'][0]}."
        )
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // max(1, *shards))
    return _Plan(group, world_size, vocab_start, num_classes, chunk, *options)


def _shown(field: str, values: list[int]) -> list:
    """Report values as the user wrote them (hashes only as equal to rank 0's or not)."""
    if field.endswith("_hash"):
        return ["as rank 0" if v == values[0] else "differs" for v in values]
    if field in ("label_smoothing", "z_loss", "softcap"):
        return [struct.unpack("<d", struct.pack("<q", v))[0] for v in values]
    if field == "dtype":
        return [_DTYPES[v] for v in values]
    if field == "reduction":
        return [REDUCTIONS[v] for v in values]
    return values


def _check_options(reduction: str, label_smoothing: float, z_loss: float, softcap) -> None:
    _checks.check_reduction(reduction)
    _checks.check_options(label_smoothing, z_loss, softcap)


def _check_target(target: Tensor, rows_shape: tuple[int, ...], name: str) -> None:
    if not isinstance(target, Tensor) or target.dtype not in (torch.long, torch.uint8):
        raise RuntimeError(
            f"expected target to be a Long or Byte tensor of global class ids, got "
            f"{getattr(target, 'dtype', type(target).__name__)}: pass target.long()."
        )
    if tuple(target.shape) != rows_shape:
        raise ValueError(
            f"Expected target of shape {rows_shape} ({name}'s shape without its last dimension), "
            f"got {tuple(target.shape)}."
        )


def _check_weight(weight: Tensor | None, dtype: torch.dtype, name: str) -> None:
    if weight is None:
        return
    if weight.dim() != 1 or weight.dtype != dtype:
        raise RuntimeError(
            f"{name} must be a 1-D tensor of dtype {dtype} holding the weight of every class of "
            f"the global vocabulary (the same on every rank), got shape {tuple(weight.shape)} "
            f"and dtype {weight.dtype}."
        )
    if weight.requires_grad and torch.is_grad_enabled():
        # The autograd functions below differentiate the logits (and the head) only: a class
        # weight's gradient would silently be missing.
        raise ValueError(
            f"{name} requires grad, but vocab-parallel cross entropy does not differentiate the "
            f"class weights: pass {name}.detach()."
        )


def _targets(target: Tensor, weight: Tensor | None, plan: _Plan, shard: int, dtype) -> _Targets:
    counted = target != plan.ignore_index
    safe = torch.where(counted, target, 0)
    local = safe - plan.vocab_start
    owned = counted & (local >= 0) & (local < shard)
    local = torch.where(owned, local, 0)
    if weight is None:
        return _Targets(counted, counted.to(dtype), owned, local, float(plan.num_classes))
    w = weight.to(dtype)
    return _Targets(counted, torch.where(counted, w[safe], 0.0), owned, local, float(w.sum()))


def _capped(logits: Tensor, softcap: float | None, dtype, owned: bool):
    """Logits in the accumulation dtype after the softcap, in a buffer the caller may overwrite
    (``logits`` itself when ``owned``), and ``tanh(logits / softcap)`` (for the softcap's
    derivative ``1 - tanh**2``) or None."""
    x = logits.to(dtype, copy=not owned)
    if softcap is None:
        return x, None
    t = x.div_(softcap).tanh_()
    return t * softcap, t


def _exp_shifted(x: Tensor) -> tuple[Tensor, Tensor]:
    """Row maxima ``m`` (0 for an all ``-inf`` row, as reference.logsumexp, or for an empty
    slice) and ``exp(x - m)`` written over ``x``."""
    # A slice may hold no class (DTensor's uneven Shard leaves the last ranks short, even empty);
    # its lse_r = log(0) = -inf then weighs nothing in the global log-sum-exp.
    m = x.amax(dim=-1) if x.shape[-1] else x.new_zeros(x.shape[:-1])
    m = torch.where(m == float("-inf"), 0.0, m)
    return m, x.sub_(m.unsqueeze(-1)).exp_()


def _slice_stats(x: Tensor, rows: _Targets, w_local: Tensor | None, plan: _Plan, stats: bool):
    """This slice's :class:`~xentkit.kernels.row_stats.RowStats` (the weighted logit sum with
    label smoothing; the entropy sum and argmax with ``stats``), gathered from every rank and
    merged: the global statistics of each row."""
    local = row_stats.block(
        x, rows.local, owned=rows.owned, class_weight=w_local, offset=plan.vocab_start,
        sum_x=plan.label_smoothing > 0, entropy=stats, argmax=stats,
    )  # fmt: skip
    return row_stats.merge(_gather_row_stats(local, plan))


def _row_losses(lse, target_logit, weighted_sum, rows: _Targets, plan: _Plan):
    """Per-row cross-entropy and z-loss parts, as ``reference.cross_entropy_terms``."""
    eps = plan.label_smoothing
    nll = torch.where(rows.counted, -rows.weight * (target_logit - lse), 0.0)
    ce = nll
    if eps > 0:
        smooth = -(weighted_sum - lse * rows.total_weight) / plan.num_classes
        ce = (1 - eps) * nll + eps * torch.where(rows.counted, smooth, 0.0)
    if not plan.z_loss:
        return ce, torch.zeros_like(ce)
    return ce, torch.where(rows.counted, plan.z_loss * lse * lse, 0.0)


def _reduce(ce: Tensor, z: Tensor, rows: _Targets, reduction: str) -> Tensor:
    """As ``reference.reduce_cross_entropy``: the mean divides ``ce`` by the sum of target
    weights and ``z`` by the number of counted rows."""
    if reduction == "none":
        return ce + z
    if reduction == "sum":
        return (ce + z).sum()
    return ce.sum() / rows.weight.sum() + z.sum() / rows.counted.sum()


def _row_scales(grad: Tensor, rows: _Targets, reduction: str) -> tuple[Tensor, Tensor]:
    """The incoming gradient of each row's cross-entropy part ``a`` and z-loss part ``b``
    (0 on rows that are not counted)."""
    if reduction == "mean":
        a, b = grad / rows.weight.sum(), grad / rows.counted.sum()
    else:
        a = b = grad
    zero = torch.zeros((), dtype=rows.weight.dtype, device=rows.weight.device)
    return torch.where(rows.counted, a, zero), torch.where(rows.counted, b, zero)


def _unit_scales(rows: _Targets, reduction: str, normalised: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Row scales for gradients written before the incoming gradient is known, ``a`` and ``b``,
    and the factor ``unit`` that backward applies with the incoming gradient. Where
    ``normalised`` (every gradient kept in float32 or float64) those of the loss itself and
    ``unit`` 1, so that ``loss.backward()`` on the CPU scales nothing. Else, for the mean, those
    of the *sum* of the cross-entropy parts and the z parts times ``den / z_den`` (the z-loss in
    the cross-entropy part's units) and ``unit`` ``1 / den``: gradients kept in half precision
    until then stay clear of underflow."""
    one = torch.ones((), dtype=rows.weight.dtype, device=rows.weight.device)
    if normalised or reduction != "mean":
        return *_row_scales(one, rows, reduction), one
    a = rows.counted.to(rows.weight.dtype)
    den = rows.weight.sum()
    # With every row ignored the gradients are 0 (not 0 / 0), as in the reference.
    unit = torch.where(rows.counted.any(), 1 / den, 0.0)
    return a, torch.where(rows.counted, den / rows.counted.sum(), 0.0), unit


def _slice_grad(x: Tensor, t, lse, a, b, rows: _Targets, w_local, plan: _Plan) -> Tensor:
    """The gradient of the loss with respect to this slice's logits ``x`` (the module
    docstring's formula, with the coefficients of
    :func:`xentkit.kernels.row_stats.cross_entropy_coefficients`), written over ``x``."""
    p_coef, t_coef, s_coef, z_coef = row_stats.cross_entropy_coefficients(
        rows.counted, rows.weight, rows.total_weight, plan.num_classes, plan.label_smoothing,
        plan.z_loss, a, b,
    )  # fmt: skip
    coef = p_coef if z_coef is None else p_coef + z_coef * lse
    m, e = _exp_shifted(x)
    # p = e * exp(m - lse); rows that are not counted get 0 even where lse is -inf.
    e.mul_(torch.where(rows.counted, torch.exp(m - lse) * coef, 0.0).unsqueeze(-1))
    hit = rows.owned.nonzero().squeeze(-1)
    e.index_put_((hit, rows.local[hit]), -t_coef[hit].to(e.dtype), accumulate=True)
    if s_coef is not None:
        w = torch.ones(e.shape[-1], dtype=e.dtype, device=e.device) if w_local is None else w_local
        e.addr_(s_coef, w, alpha=-1)
    if t is not None:
        e.mul_(t.square_().neg_().add_(1))
    return e


def _weights_slice(weight: Tensor | None, plan: _Plan, shard: int, dtype) -> Tensor | None:
    if weight is None:
        return None
    return weight[plan.vocab_start : plan.vocab_start + shard].to(dtype)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross entropy of ``(M, V_r)`` logit slices: forward gathers the per-row statistics once;
    backward recomputes ``exp`` from the saved logits and needs no collective. With ``stats``
    it also returns each row's ``(lse, entropy, is_top1)`` (no gradient)."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, weight: Tensor | None, plan: _Plan, stats):
        dtype = accumulation_dtype(logits.dtype)
        rows = _targets(target, weight, plan, logits.shape[-1], dtype)
        w_local = _weights_slice(weight, plan, logits.shape[-1], dtype)
        x, _ = _capped(logits, plan.softcap, dtype, owned=False)
        merged = _slice_stats(x, rows, w_local, plan, stats)
        del x
        lse = row_stats.finish(merged).lse
        ce, z = _row_losses(lse, merged.target, merged.sum_x, rows, plan)
        ctx.save_for_backward(logits, lse)
        ctx.rows, ctx.w_local, ctx.plan = rows, w_local, plan
        per_row = _per_row_stats(merged, target, stats)
        ctx.mark_non_differentiable(*per_row)
        return _reduce(ce, z, rows, plan.reduction), *per_row

    @staticmethod
    def backward(ctx, grad: Tensor, *_):
        logits, lse = ctx.saved_tensors
        rows, plan = ctx.rows, ctx.plan
        a, b = _row_scales(grad.to(lse.dtype), rows, plan.reduction)
        x, t = _capped(logits, plan.softcap, lse.dtype, owned=False)
        grad_logits = _slice_grad(x, t, lse, a, b, rows, ctx.w_local, plan)
        return grad_logits.to(logits.dtype), None, None, None, None


def _per_row_stats(merged: row_stats.RowStats | None, target: Tensor, stats: bool) -> tuple:
    """``(lse, entropy, is_top1)`` of merged statistics for ``return_stats`` (empty tensors
    without it). Every rank holds the global argmax and the targets: no collective."""
    if not stats:
        empty = torch.empty(0, device=target.device)
        return empty, empty, empty.bool()
    done = row_stats.finish(merged, target)
    return done.lse, done.entropy, done.is_top1


def vocab_parallel_cross_entropy(
    logits_shard: Tensor,
    target: Tensor,
    *,
    group=None,
    vocab_start: int | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_stats: bool = False,
):
    r"""Cross entropy of logits whose classes are split over the ranks of ``group``.

    Equals ``xentkit.cross_entropy(full_logits, target, ...)`` on the logits concatenated over
    the ranks along the class dimension, with the gradient of this rank's slice:

    .. math:: \ell_i = (1-\varepsilon)\big(-w_{t_i}(x_{i,t_i} - \mathrm{lse}_i)\big)
              + \varepsilon\big(-\tfrac1V \textstyle\sum_c w_c (x_{i,c} - \mathrm{lse}_i)\big)
              + z\,\mathrm{lse}_i^2,
              \qquad \mathrm{lse}_i = \log \textstyle\sum_r \sum_{c \in r} e^{x_{i,c}}

    Two collectives per forward (a small check, then one ``all_gather`` of ``(M, 2 or 3)``
    statistics), none in backward.

    Args:
        logits_shard: ``(..., V_r)`` this rank's classes ``[vocab_start, vocab_start + V_r)``
            of the logits; ``V_r`` may differ between ranks (and be 0).
        target: ``(...)`` global class ids in ``[0, V)`` or ``ignore_index``, the same on
            every rank.
        group: the process group holding the slices; None for the default group.
        vocab_start: this rank's first class; None places the slices in rank order
            (``sum`` of the lower ranks' ``V_r``). Give it on every rank or on none.
        weight: optional ``(V,)`` weights of *all* classes, the same on every rank.
        ignore_index, reduction, label_smoothing, z_loss, softcap, return_stats: as in
            :func:`xentkit.cross_entropy`; the same on every rank.
    Returns:
        the target's shape for ``reduction="none"``, else a scalar; in the logits' dtype and
        equal on every rank; ``(loss, stats)`` with ``return_stats``.

    Raises:
        on every rank alike when the ranks disagree (rows, targets, options, dtype, weights),
        when the slices do not tile the vocabulary or a target lies outside it, or when one
        rank's inputs are invalid; RuntimeError when ``torch.distributed`` is not initialised.

    See also :func:`linear_cross_entropy` (which never makes the logits) and the module
    docstring for an example.
    """
    rank, world_size = _rank(group)
    options = (ignore_index, reduction, label_smoothing, z_loss, softcap)

    def check() -> None:
        _checks.check_floating_input(logits_shard, "logits_shard")
        if logits_shard.dim() < 1 or logits_shard.dtype not in _DTYPES:
            raise ValueError(
                f"logits_shard must be (..., V_r) float16/bfloat16/float32/float64, got shape "
                f"{tuple(logits_shard.shape)} and dtype {logits_shard.dtype}."
            )
        _check_target(target, tuple(logits_shard.shape[:-1]), "logits_shard")
        _check_weight(weight, logits_shard.dtype, "weight")
        _check_options(reduction, label_smoothing, z_loss, softcap)
        _check_vocab_start(vocab_start)

    def report() -> dict[str, int]:
        shard, dtype = logits_shard.shape[-1], logits_shard.dtype
        return _report(target, shard, 0, dtype, vocab_start, weight, options)

    device = logits_shard.device if isinstance(logits_shard, Tensor) else "cpu"
    reports = _agree(check, report, group, rank, world_size, device)
    plan = _plan(reports, rank, world_size, group, options, None)
    # Rows counted from the shape: -1 is ambiguous for an empty slice (V_r = 0).
    rows = logits_shard.reshape(math.prod(logits_shard.shape[:-1]), logits_shard.shape[-1])
    labels = target.reshape(-1).long()
    loss, *per_row = _VocabParallelCrossEntropy.apply(rows, labels, weight, plan, return_stats)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    loss = loss.to(logits_shard.dtype)
    return (loss, _loss_stats(per_row, labels, plan, target.shape)) if return_stats else loss


def _loss_stats(per_row, labels: Tensor, plan: _Plan, shape) -> LossStats:
    """:func:`xentkit.reference.loss_stats` of the gathered per-row statistics, per-position
    fields in the target's ``shape``."""
    stats = loss_stats(*per_row, labels != plan.ignore_index, plan.z_loss, plan.reduction)
    z = stats.z_loss.reshape(shape) if stats.z_loss.dim() else stats.z_loss
    return stats._replace(lse=stats.lse.reshape(shape), z_loss=z)


def _check_vocab_start(vocab_start: int | None) -> None:
    if vocab_start is not None and (not isinstance(vocab_start, int) or vocab_start < 0):
        raise ValueError(
            f"vocab_start must be a non-negative int (this rank's first class) or None, got "
            f"{vocab_start!r}."
        )


def _chunks(rows: _Targets, size: int):
    """``(slice, the rows' targets)`` for each chunk of ``size`` rows."""
    for start in range(0, len(rows.counted), size):
        chunk = slice(start, start + size)
        yield chunk, _Targets(*(f[chunk] for f in rows[:4]), rows.total_weight)


def _grad_buffers(hidden: Tensor, weight: Tensor, needs, dtype) -> list[Tensor | None]:
    """Zeroed gradients of the hidden states (their dtype: each chunk writes its own rows), the
    weight slice and the bias slice (accumulated over chunks in ``dtype``)."""
    gh = torch.zeros_like(hidden) if needs[0] else None
    gw = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if needs[1] else None
    gb = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if needs[2] else None
    return [gh, gw, gb]


def _accumulate(grads, d: Tensor, h: Tensor, weight: Tensor, chunk: slice) -> None:
    """Add one chunk's share, given the gradient ``d`` of its logits, to the three gradients."""
    gh, gw, gb = grads
    if gh is not None:
        gh[chunk] = d @ weight
    if gw is not None:
        if gw.dtype == d.dtype:
            gw.addmm_(d.T, h)
        else:
            gw.add_(d.T @ h)
    if gb is not None:
        gb.add_(d.sum(0, dtype=gb.dtype))


def _chunk_logits(hidden, weight, bias, rows_all: _Targets, plan: _Plan, dtype):
    """``(chunk, its rows' targets, x, t)`` per chunk of tokens: ``x`` the chunk's softcapped
    logits in ``dtype`` (the only ``chunk x V_r`` buffers alive) and ``t`` as :func:`_capped`."""
    for chunk, rows in _chunks(rows_all, plan.chunk_size):
        x, t = _capped(F.linear(hidden[chunk], weight, bias), plan.softcap, dtype, owned=True)
        yield chunk, rows, x, t


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """The LM head and the loss over vocabulary slices of the classifier, chunked over tokens.

    For ``mean`` and ``sum`` the gradients are written in the forward pass (three matrix
    products per chunk and nothing recomputed); backward scales them by the incoming gradient
    and all-reduces the hidden states' share. For ``none`` each row's incoming gradient is only
    known in backward, which recomputes each chunk's logits from the saved global log-sum-exp.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, class_weight, plan: _Plan, needs, stats):
        dtype = accumulation_dtype(hidden.dtype)
        rows_all = _targets(target, class_weight, plan, weight.shape[0], dtype)
        w_local = _weights_slice(class_weight, plan, weight.shape[0], dtype)
        early = plan.reduction != "none" and any(needs)
        if early:
            grads = _grad_buffers(hidden, weight, needs, dtype)
            # Half-precision hidden-state gradients are kept unnormalised (_unit_scales).
            normalised = hidden.dtype == dtype
            a_all, b_all, unit = _unit_scales(rows_all, plan.reduction, normalised)
        ce_all = torch.zeros(target.shape[0], dtype=dtype, device=hidden.device)
        z_all, lse_all = torch.zeros_like(ce_all), torch.zeros_like(ce_all)
        per_row = [[], [], []]
        for chunk, rows, x, t in _chunk_logits(hidden, weight, bias, rows_all, plan, dtype):
            merged = _slice_stats(x, rows, w_local, plan, stats)
            lse = row_stats.finish(merged).lse
            ce_all[chunk], z_all[chunk] = _row_losses(lse, merged.target, merged.sum_x, rows, plan)
            lse_all[chunk] = lse
            chunk_stats = _per_row_stats(merged, target[chunk], stats)
            for part, value in zip(per_row, chunk_stats, strict=True):
                part.append(value)
            if early:
                d = _slice_grad(x, t, lse, a_all[chunk], b_all[chunk], rows, w_local, plan)
                _accumulate(grads, d.to(hidden.dtype), hidden[chunk], weight, chunk)
        ctx.plan, ctx.needs, ctx.rows, ctx.w_local = plan, needs, rows_all, w_local
        ctx.dtype, ctx.early = hidden.dtype, early
        # Saved through autograd, which drops them once backward has read them: the gradients
        # it returns are then referenced nowhere else and become the parameters' .grad as they
        # are, not copies.
        if early:
            ctx.save_for_backward(*grads, unit)
        else:
            ctx.save_for_backward(hidden, weight, bias, lse_all)
        empty = _per_row_stats(None, target, False)
        per_row = [torch.cat(p) if p else e for p, e in zip(per_row, empty, strict=True)]
        ctx.mark_non_differentiable(*per_row)
        return _reduce(ce_all, z_all, rows_all, plan.reduction), *per_row

    @staticmethod
    def backward(ctx, grad: Tensor, *_):
        if ctx.early:
            *grads, unit = ctx.saved_tensors
            kept = scale_gradients([g for g in grads if g is not None], grad.to(unit.dtype) * unit)
            gh, gw, gb = (None if g is None else kept.pop(0) for g in grads)
        else:
            gh, gw, gb = _recomputed_grads(ctx, grad)
        if gh is not None and gh.shape[0]:
            # The one collective of backward: each rank holds its slice's share of dL/dh.
            dist.all_reduce(gh, group=ctx.plan.group)
        gw = None if gw is None else gw.to(ctx.dtype)
        gb = None if gb is None else gb.to(ctx.dtype)
        return gh, gw, gb, None, None, None, None, None


def _recomputed_grads(ctx, grad: Tensor) -> list[Tensor | None]:
    """Backward of ``reduction="none"``: each chunk's logits again, the gradient of each row
    scaled by its incoming gradient; no collective (the log-sum-exp was saved)."""
    hidden, weight, bias, lse_all = ctx.saved_tensors
    plan, rows_all, dtype = ctx.plan, ctx.rows, lse_all.dtype
    grads = _grad_buffers(hidden, weight, ctx.needs, dtype)
    a_all, b_all = _row_scales(grad.to(dtype), rows_all, plan.reduction)
    for chunk, rows, x, t in _chunk_logits(hidden, weight, bias, rows_all, plan, dtype):
        lse, a, b = lse_all[chunk], a_all[chunk], b_all[chunk]
        d = _slice_grad(x, t, lse, a, b, rows, ctx.w_local, plan)
        _accumulate(grads, d.to(hidden.dtype), hidden[chunk], weight, chunk)
    return grads


def linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    class_weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    *,
    process_group=None,
    return_stats: bool = False,
):
    r"""The LM head and the loss with the classifier's rows (the vocabulary) split over ranks.

    Equals ``xentkit.linear_cross_entropy(input, full_weight, target, full_bias, ...)`` where
    ``full_weight`` stacks the ranks' slices in rank order; no rank ever holds more than
    ``chunk_size x V_r`` logits. :func:`xentkit.linear_cross_entropy` with
    ``process_group=group`` calls this.

    .. math:: \ell_i = \mathrm{CE}\big([\,W_0 h_i + b_0;\ \dots;\ W_{R-1} h_i + b_{R-1}\,],
              t_i\big)

    Forward runs ``1 + ceil(M / chunk_size)`` collectives (a small check, then one
    ``all_gather`` of ``(chunk, 2 or 3)`` statistics per chunk); backward runs one
    ``all_reduce`` of the ``(M, D)`` gradient of ``input`` (none when it needs no gradient),
    so do not all-reduce that gradient again (e.g. with Megatron's
    ``copy_to_tensor_model_parallel_region``). The weight and bias gradients are local.

    Args:
        input: ``(..., D)`` hidden states, the same on every rank.
        weight: ``(V_r, D)`` this rank's rows of the classifier, rank ``r`` holding classes
            ``[sum of lower ranks' V_r, ... + V_r)``; ``V_r`` may differ between ranks (and be 0).
        target: ``(...)`` global class ids in ``[0, V)`` or ``ignore_index``, the same on
            every rank.
        bias: optional ``(V_r,)`` slice of the bias.
        class_weight: optional ``(V,)`` weights of *all* classes, the same on every rank.
        ignore_index, reduction, label_smoothing, z_loss, softcap: as in
            :func:`xentkit.cross_entropy`; the same on every rank.
        chunk_size: tokens per chunk, the same on every rank; None gives about
            ``CHUNK_ELEMENTS`` logits per chunk on the rank with the largest slice.
        process_group: the tensor-parallel group; None for the default group.
        return_stats: also return :class:`xentkit.reference.LossStats`, from the statistics
            the forward gathers anyway (no extra collective).
    Returns:
        the target's shape for ``reduction="none"``, else a scalar; in ``input``'s dtype and
        equal on every rank (float32 under autocast, which runs the head in its dtype);
        ``(loss, stats)`` with ``return_stats``.

    See also :func:`vocab_parallel_cross_entropy` for logits that already exist.
    """
    options = (ignore_index, reduction, label_smoothing, z_loss, softcap)
    args = (input, weight, target, bias, class_weight, options, chunk_size, process_group)
    loss = _linear(*args, stats=return_stats)
    if return_stats:
        return loss[0].to(_autocast.loss_dtype(input)), loss[1]
    return loss.to(_autocast.loss_dtype(input))


def _linear(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    class_weight: Tensor | None,
    options: tuple[int, str, float, float, float | None],
    chunk_size: int | None,
    group,
    vocab_start: int | None = None,
    hint: str = "",
    stats: bool = False,
):
    """:func:`linear_cross_entropy` with the loss left in the accumulation dtype (float32,
    float64 for float64 input), this rank's slice at ``vocab_start`` (in rank order when None)
    and ``hint`` at the end of any error about ranks that disagree. Under autocast the head
    runs in the autocast dtype and class weights are float32, as in the single-process path.
    With ``stats``, ``(loss, LossStats)``."""
    logits_dtype = _autocast.loss_dtype(input) if isinstance(input, Tensor) else None
    input, weight, bias = _autocast.lower(input, weight, bias)
    (class_weight,) = _autocast.float32("cross_entropy", class_weight)
    rank, world_size = _rank(group)
    reduction, label_smoothing, z_loss, softcap = options[1:]
    grad_on = torch.is_grad_enabled()

    def check() -> None:
        _checks.check_linear(input, weight, target, bias)
        if input.dtype not in _DTYPES:
            raise ValueError(f"input must be float16/bfloat16/float32/float64, got {input.dtype}.")
        _check_weight(class_weight, logits_dtype, "class_weight")
        _check_options(reduction, label_smoothing, z_loss, softcap)
        _checks.check_chunk_size(chunk_size)

    def report() -> dict[str, int]:
        backward = int(grad_on and input.requires_grad)
        shard, dim = weight.shape[0], input.shape[-1]
        return _report(
            target, shard, dim, input.dtype, vocab_start, class_weight, options, backward,
            chunk_size,
        )  # fmt: skip

    device = input.device if isinstance(input, Tensor) else "cpu"
    reports = _agree(check, report, group, rank, world_size, device)
    plan = _plan(reports, rank, world_size, group, options, chunk_size, hint)
    needs = tuple(grad_on and t is not None and t.requires_grad for t in (input, weight, bias))
    hidden, labels = input.reshape(-1, input.shape[-1]), target.reshape(-1).long()
    loss, *per_row = _VocabParallelLinearCrossEntropy.apply(
        hidden, weight, bias, labels, class_weight, plan, needs, stats
    )
    loss = loss.reshape(target.shape) if reduction == "none" else loss
    return (loss, _loss_stats(per_row, labels, plan, target.shape)) if stats else loss


# ---------------------------------------------------------------- per-token head outputs


def _gather_row_stats(stats: row_stats.RowStats, plan: _Plan) -> row_stats.RowStats:
    """Every rank's statistics of its slice, stacked in rank order (one ``all_gather``): the
    blocks :func:`row_stats.merge` takes. The argmax travels as a float (exact below 2^24)."""
    fields = [(i, f) for i, f in enumerate(stats) if f is not None]
    local = torch.stack([f.to(stats.sum_exp.dtype) for _, f in fields], dim=-1)
    parts = [torch.empty_like(local) for _ in range(plan.world_size)]
    dist.all_gather(parts, local.contiguous(), group=plan.group)
    every = torch.stack(parts)  # (R, rows, k)
    values: list[Tensor | None] = [None] * len(stats)
    for column, (i, _) in enumerate(fields):
        values[i] = every[..., column]
    argmax = stats._fields.index("argmax")
    if values[argmax] is not None:
        values[argmax] = values[argmax].long()
    return row_stats.RowStats(*values)


class _VocabParallelHeadOutputs(torch.autograd.Function):
    """:func:`xentkit.linear_head_outputs` over vocabulary slices of the head, chunked over
    tokens: each rank's :class:`~xentkit.kernels.row_stats.RowStats` of its slice, one
    ``all_gather`` per chunk, :func:`~xentkit.kernels.row_stats.merge`; backward recomputes each
    chunk's logits from the saved log-sum-exp and entropy (no collective but the hidden states'
    ``all_reduce``)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, plan: _Plan, transform, outputs, needs):
        dtype = accumulation_dtype(hidden.dtype)
        rows_all = _targets(target, None, plan, weight.shape[0], dtype)
        zeros = torch.zeros(target.shape[0], dtype=dtype, device=hidden.device)
        log_prob, lse_all, entropy, log_sum_sq, mean = (zeros.clone() for _ in range(5))
        top1 = torch.zeros(target.shape[0], dtype=torch.bool, device=hidden.device)
        for chunk, rows in _chunks(rows_all, plan.chunk_size):
            s, _ = transform.apply(F.linear(hidden[chunk], weight, bias))
            stats = row_stats.block(
                s, rows.local, owned=rows.owned, offset=plan.vocab_start,
                entropy=outputs.entropy, sum_sq=outputs.log_sum_sq_probs,
                sum_x=outputs.mean_logits, argmax=outputs.is_top1,
            )  # fmt: skip
            merged = row_stats.merge(_gather_row_stats(stats, plan))
            # Every rank holds the global argmax and the targets: is_top1 needs no collective.
            done = row_stats.finish(merged, target[chunk], plan.num_classes)
            kept = rows.counted
            log_prob[chunk] = torch.where(kept, done.log_prob, 0.0)
            lse_all[chunk] = done.lse
            fields = zip(Outputs._fields, (entropy, log_sum_sq, mean, top1), strict=True)
            for name, out in fields:
                if getattr(outputs, name):
                    out[chunk] = getattr(done, name).masked_fill(~kept, 0)
        ctx.save_for_backward(hidden, weight, bias, lse_all, entropy)
        ctx.plan, ctx.transform, ctx.rows, ctx.needs = plan, transform, rows_all, needs
        ctx.return_entropy = outputs.entropy
        ctx.mark_non_differentiable(lse_all, log_sum_sq, mean, top1)
        return log_prob, entropy, log_sum_sq, mean, top1

    @staticmethod
    def backward(ctx, grad_log_prob, grad_entropy, *_):
        hidden, weight, bias, lse_all, entropy = ctx.saved_tensors
        plan, rows_all, dtype = ctx.plan, ctx.rows, lse_all.dtype
        grads = _grad_buffers(hidden, weight, ctx.needs, dtype)
        zero = torch.zeros((), dtype=dtype, device=lse_all.device)
        a_all = torch.where(rows_all.counted, grad_log_prob.to(dtype), zero)
        b_all = None
        if ctx.return_entropy and grad_entropy is not None:
            b_all = torch.where(rows_all.counted, grad_entropy.to(dtype), zero)
        for chunk, rows in _chunks(rows_all, plan.chunk_size):
            s, tanh = ctx.transform.apply(F.linear(hidden[chunk], weight, bias))
            b = None if b_all is None else b_all[chunk]
            d = row_stats.log_prob_grad(
                s, lse_all[chunk], a_all[chunk], b, entropy[chunk], rows.local, rows.owned
            )
            d = ctx.transform.chain(d, tanh)
            _accumulate(grads, d.to(hidden.dtype), hidden[chunk], weight, chunk)
        gh, gw, gb = grads
        if gh is not None and gh.shape[0]:
            dist.all_reduce(gh, group=plan.group)
        gw = None if gw is None else gw.to(weight.dtype)
        gb = None if gb is None else gb.to(weight.dtype)
        return gh, gw, gb, None, None, None, None, None


def linear_head_outputs(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    outputs: tuple[str, ...] = ("entropy",),
    ignore_index: int | None = -100,
    chunk_size: int | None = None,
    group=None,
) -> HeadOutputs:
    r""":func:`xentkit.functional.linear_head_outputs` (and so :func:`xentkit.linear_log_probs`)
    with the head's rows split over the ranks of ``group``, as :func:`linear_cross_entropy`:
    each rank reduces its slice of every row to the statistics of
    :mod:`xentkit.kernels.row_stats`, one ``all_gather`` per chunk of tokens merges them (one
    more ``all_reduce`` of a flag per row for ``is_top1``), backward runs one ``all_reduce`` of
    the hidden states' gradient. Values and gradients equal the single-process call on the
    full head; ``input`` and ``target`` are the same on every rank.
    """
    from xentkit.functional import HEAD_OUTPUTS
    from xentkit.kernels.linear_log_probs import NO_IGNORE

    if _checks.is_dtensor(input, weight, target, bias):
        raise NotImplementedError(
            "linear_log_probs / linear_head_outputs do not take DTensor arguments yet: pass the "
            "local shard (weight.to_local(), bias.to_local()) with process_group= the group of "
            "the mesh dim that splits the vocabulary (mesh.get_group(dim))."
        )
    out_dtype = _autocast.loss_dtype(input)
    input, weight, bias = _autocast.lower(input, weight, bias)
    ignore = NO_IGNORE if ignore_index is None else ignore_index
    options = (ignore, "none", 0.0, 0.0, softcap)
    rank, world_size = _rank(group)
    grad_on = torch.is_grad_enabled()

    def check() -> None:
        _checks.check_linear(input, weight, target, bias)
        if input.dtype not in _DTYPES:
            raise ValueError(f"input must be float16/bfloat16/float32/float64, got {input.dtype}.")

    def report() -> dict[str, int]:
        backward = int(grad_on and input.requires_grad)
        shard, dim = weight.shape[0], input.shape[-1]
        return _report(
            target, shard, dim, input.dtype, None, None, options, backward, chunk_size,
            (temperature, logit_scale),
        )  # fmt: skip

    reports = _agree(check, report, group, rank, world_size, input.device)
    plan = _plan(reports, rank, world_size, group, options, chunk_size)
    needs = tuple(grad_on and t is not None and t.requires_grad for t in (input, weight, bias))
    hidden, labels = input.reshape(-1, input.shape[-1]), target.reshape(-1).long()
    wanted = Outputs(*(field in outputs for field in HEAD_OUTPUTS))
    transform = Transform(temperature, logit_scale, softcap)
    results = _VocabParallelHeadOutputs.apply(
        hidden, weight, bias, labels, plan, transform, wanted, needs
    )
    shaped = [
        value.reshape(target.shape).to(torch.bool if value.dtype == torch.bool else out_dtype)
        for value in results
    ]
    return HeadOutputs(
        shaped[0], *(v if on else None for v, on in zip(shaped[1:], wanted, strict=True))
    )


# ---------------------------------------------------------------- DTensor arguments

# Ends an error about ranks that disagree when the group came from a DTensor weight: the usual
# cause is a weight split by FSDP (over data-parallel ranks, each with its own batch).
_ROWS_SPLIT_HINT = (
    " weight is a DTensor split along its rows over mesh dim {mesh_dim}, which xentkit reads "
    "as a vocabulary-parallel (tensor-parallel) LM head: every rank of that mesh dim must hold "
    "the same input and target. A weight that FSDP's fully_shard split over data-parallel "
    "ranks is not one: compute the loss while FSDP has gathered it (in the forward of a module "
    "whose FSDP group owns the weight) or pass weight.full_tensor()."
)


def _mesh(**tensors: Tensor | None):
    """The device mesh that the DTensor arguments share; a clear error when they differ."""
    from torch.distributed.tensor import DTensor

    named = [(name, t.device_mesh) for name, t in tensors.items() if isinstance(t, DTensor)]
    first, mesh = named[0]
    for name, other in named[1:]:
        if other != mesh:
            raise ValueError(
                f"{first} and {name} are DTensors on different device meshes ({mesh} and "
                f"{other}): build them on one mesh, or pass {name} as a plain tensor."
            )
    return mesh


def _split_mesh_dim(name: str, tensor, dim: int, layout: str) -> int | None:
    """The mesh dim over which the DTensor ``tensor`` is split along its dim ``dim`` (the
    classes), None when it is replicated. Any other placement is an error ending in ``layout``
    (what is supported and how to get there): a silently wrong loss is never an option."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(tensor.placements)
    split = []
    for mesh_dim, placement in enumerate(placements):
        # `type(...) is Shard`: a _StridedShard (FSDP over TP) is a Shard whose slices interleave.
        if type(placement) is Shard and placement.dim == dim:
            split.append(mesh_dim)
        elif not isinstance(placement, Replicate):
            raise ValueError(
                f"{name} has placement {placement!r} on mesh dim {mesh_dim} (placements "
                f"{placements}): {layout}"
            )
    if len(split) > 1:
        raise ValueError(
            f"{name} is split along dim {dim} over mesh dims {split} (placements {placements}), "
            f"so no one process group holds its classes: {layout}"
        )
    return split[0] if split else None


def _whole(name: str, tensor: Tensor | None, fix: str) -> Tensor | None:
    """This rank's tensor for an argument that every rank holds whole: a plain tensor as it is,
    a DTensor replicated on every mesh dim as its local tensor (differentiably)."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(tensor, DTensor):
        return tensor
    if not all(isinstance(p, Replicate) for p in tensor.placements):
        raise ValueError(
            f"{name} must be a plain tensor or a DTensor replicated on every mesh dim, got "
            f"placements {tuple(tensor.placements)}: {fix}"
        )
    return tensor.to_local()


def _slice_start(tensor, dim: int) -> int:
    """The global index of this rank's first element along ``dim`` of the DTensor ``tensor``.

    torch lays out an uneven ``Shard`` as ``torch.chunk`` does (``ceil(V / R)`` per rank, the
    last ranks short or empty), which is not the even split a caller might assume; passing the
    start explicitly also lets :func:`_plan` check that the slices tile the vocabulary."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = tensor.device_mesh, tensor.placements
    return compute_local_shape_and_global_offset(tensor.shape, mesh, placements)[1][dim]


def _replicated(loss: Tensor, mesh) -> Tensor:
    """``loss``, equal on every rank, as a DTensor replicated on ``mesh`` (differentiably)."""
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(loss, mesh, [Replicate()] * mesh.ndim, run_check=False)


def dtensor_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> Tensor:
    r"""Cross entropy of DTensor logits split along their classes (tensor-parallel logits).

    What :func:`xentkit.cross_entropy` runs when an argument is a DTensor. ``input`` is
    ``(C)``, ``(N, C)`` or ``(N, C, d1, ...)`` as in torch, with its class dim (1; 0 for
    ``(C)``) split over one mesh dim (``Shard(1)``, the layout
    ``torch.distributed.tensor.parallel.loss_parallel`` expects) and replicated on the others.
    Each rank moves its slice's classes last and runs :func:`vocab_parallel_cross_entropy` over
    that mesh dim's process group, at the slice's offset in torch's (possibly uneven) layout:

    .. math:: \ell_n = (1-\varepsilon)\big(-w_{t_n}(x_{n,t_n} - \mathrm{lse}_n)\big)
              + \varepsilon\big(-\tfrac1C \textstyle\sum_c w_c (x_{n,c} - \mathrm{lse}_n)\big)
              + z\,\mathrm{lse}_n^2

    with the log-sum-exp over all ranks' classes (after the softcap). Value and gradient equal
    ``F.cross_entropy`` under ``loss_parallel()`` (which has no label smoothing, z-loss or
    softcap) and :func:`xentkit.cross_entropy` on ``input.full_tensor()``, without gathering the
    logits: two collectives in forward, none in backward.

    Args:
        input: DTensor logits, split along their class dim on exactly one mesh dim.
        target: class indices, ``input``'s shape without the class dim: a plain tensor (the
            same on every rank) or a DTensor replicated on every mesh dim.
        weight: optional ``(C,)`` class weights, plain or replicated; not differentiated.
        ignore_index, reduction, label_smoothing, z_loss, softcap: as in
            :func:`xentkit.cross_entropy` (``reduction`` already validated).
    Returns:
        a DTensor replicated on ``input``'s mesh, as ``loss_parallel`` returns: the target's
        shape for ``reduction="none"``, else a scalar; in ``input``'s dtype (float32 under
        autocast). The gradient of ``input`` is a DTensor with ``input``'s placements.

    Raises:
        TypeError when ``input`` is a plain tensor; ValueError, on every rank and before any
        collective, for placements it does not support (logits split along the batch, or
        not at all, or over several mesh dims; a split or partial target or weight; DTensors
        on different meshes), naming the argument and the fix.
    """
    from torch.distributed.tensor import DTensor

    if not isinstance(input, DTensor):
        raise TypeError(
            "cross_entropy got a DTensor target or weight with plain logits: pass the logits as "
            "a DTensor split along their classes (a ColwiseParallel head's output with "
            "use_local_output=False), or plain tensors throughout (target.full_tensor())."
        )
    mesh = _mesh(input=input, target=target, weight=weight)
    cdim = 0 if input.dim() == 1 else 1
    layout = (
        f"cross entropy of DTensor logits needs their class dim {cdim} split (Shard({cdim}), "
        "as loss_parallel() expects) over exactly one mesh dim and Replicate() on the others. "
        "(B, T, V) logits of a ColwiseParallel head are Shard(2): pass input.flatten(0, 1) and "
        "target.flatten(0, 1). For logits split along the batch, compute each rank's loss "
        "from input.to_local() and its own targets, or redistribute input first."
    )
    mesh_dim = _split_mesh_dim("input", input, cdim, layout)
    if mesh_dim is None:
        raise ValueError(
            f"input is replicated (placements {tuple(input.placements)}), not split along its "
            "classes: every rank holds all the logits, so pass input.to_local() to compute the "
            f"same loss on every rank without a DTensor. Otherwise, {layout}"
        )
    target = _whole("target", target, "pass target.full_tensor() (every rank needs all targets).")
    weight = _whole("weight", weight, "pass weight.full_tensor() (the weights of all classes).")
    logits, weight = _autocast.float32("cross_entropy", input.to_local(), weight)
    loss = vocab_parallel_cross_entropy(
        logits.movedim(cdim, -1),
        target,
        group=mesh.get_group(mesh_dim),
        vocab_start=_slice_start(input, cdim),
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
    )
    return _replicated(loss, mesh)


def dtensor_linear_cross_entropy(
    input: Tensor,
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
) -> Tensor:
    r"""The fused LM head and loss with a DTensor classifier split along the vocabulary.

    What :func:`xentkit.linear_cross_entropy` runs when an argument is a DTensor: ``weight`` is
    ``(V, D)`` split along its rows (``Shard(0)``, the layout of an LM head parallelised with
    ``ColwiseParallel``) over one mesh dim and replicated on the others (on a ``(dp, tp)`` mesh:
    ``(Replicate(), Shard(0))``); ``bias``, if any, is split the same way. Each rank runs
    :func:`linear_cross_entropy` on its local rows over that mesh dim's process group, at their
    offset in torch's (possibly uneven) layout:

    .. math:: \ell_i = \mathrm{CE}\big([\,W_0 h_i + b_0;\ \dots;\ W_{R-1} h_i + b_{R-1}\,],
              t_i\big)

    Value and gradients equal :func:`xentkit.linear_cross_entropy` on the full weight; no rank
    holds more than ``chunk_size x V_r`` logits. The gradient of ``weight`` (and ``bias``) is a
    DTensor with its placements; that of ``input`` is all-reduced over the vocabulary's group
    (plain for plain input, a replicated DTensor for a replicated one). On mesh dims other than
    the vocabulary's, every rank computes the loss of its own ``input`` (e.g. its
    data-parallel batch): averaging those gradients is the data-parallel wrapper's job.

    Args:
        input: ``(..., D)`` hidden states, the same on every rank of the vocabulary's mesh dim:
            a plain tensor or a DTensor replicated on every mesh dim.
        weight: ``(V, D)`` DTensor split along its rows on exactly one mesh dim.
        target: ``(...)`` class indices, plain or replicated.
        bias: optional ``(V,)`` DTensor with ``weight``'s placements.
        class_weight: optional ``(V,)`` class weights, plain or replicated; not differentiated.
        ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size: as in
            :func:`xentkit.linear_cross_entropy` (``reduction`` already validated).
    Returns:
        the target's shape for ``reduction="none"``, else a scalar, in float32 (float64 for
        float64 input) for the caller to cast; a DTensor replicated on the mesh when ``input``
        is a DTensor, else a plain tensor. Under autocast the head runs in the autocast dtype.

    Raises:
        ValueError (TypeError for a plain weight), on every rank and before any collective,
        for placements it does not support (a weight split along D, replicated or split over
        several mesh dims; a bias split unlike the weight; split or partial hidden states or
        targets; DTensors on different meshes), naming the argument and the fix.
    """
    from torch.distributed.tensor import DTensor

    mesh = _mesh(input=input, weight=weight, target=target, bias=bias, class_weight=class_weight)
    if not isinstance(weight, DTensor):
        raise TypeError(
            "linear_cross_entropy got a DTensor argument with a plain weight: pass the LM head's "
            "weight as a DTensor split along its rows (parallelize_module(head, mesh, "
            "ColwiseParallel())), or plain tensors throughout (input.full_tensor())."
        )
    layout = (
        "the fused head needs weight (V, D) split along its rows, the vocabulary (Shard(0), the "
        "layout ColwiseParallel gives an LM head), over exactly one mesh dim and Replicate() on "
        "the others. A weight split along D (Shard(1), RowwiseParallel) is not supported: "
        "parallelize the LM head with ColwiseParallel, or pass weight.full_tensor()."
    )
    mesh_dim = _split_mesh_dim("weight", weight, 0, layout)
    if mesh_dim is None:
        raise ValueError(
            f"weight is replicated (placements {tuple(weight.placements)}), not split along "
            "its rows: every rank holds all of it, so pass weight.to_local() (and plain "
            f"input) for the single-process loss. Otherwise, {layout}"
        )
    if bias is not None and (not isinstance(bias, DTensor) or bias.placements != weight.placements):
        got = tuple(bias.placements) if isinstance(bias, DTensor) else "a plain tensor"
        raise ValueError(
            f"bias must be a DTensor split like weight (placements {tuple(weight.placements)}, "
            f"as ColwiseParallel splits both), got {got}."
        )
    hidden = _whole(
        "input",
        input,
        "every rank of the vocabulary's mesh dim needs all the hidden states: pass "
        "input.full_tensor() (e.g. after sequence parallelism) or plain hidden states.",
    )
    target = _whole("target", target, "pass target.full_tensor() (every rank needs all targets).")
    class_weight = _whole("class_weight", class_weight, "pass class_weight.full_tensor().")
    local_weight = weight.to_local()
    local_bias = None if bias is None else bias.to_local()
    loss = _linear(
        hidden,
        local_weight,
        target,
        local_bias,
        class_weight,
        (ignore_index, reduction, label_smoothing, z_loss, softcap),
        chunk_size,
        mesh.get_group(mesh_dim),
        vocab_start=_slice_start(weight, 0),
        hint=_ROWS_SPLIT_HINT.format(mesh_dim=mesh_dim),
    )
    return _replicated(loss, mesh) if isinstance(input, DTensor) else loss
