r"""Per-token log-probabilities and entropy of the LM head over token chunks.

What RL fine-tuning (PPO, GRPO) takes from the head: for each token, with
:math:`s = (W h + b) / T`, :math:`\mathrm{lse} = \log \sum_j e^{s_j}` and
:math:`p = \mathrm{softmax}(s)`,

.. math:: \log p_t = s_t - \mathrm{lse}, \qquad H = -\sum_j p_j \log p_j

(:func:`xentkit.reference.token_statistics` is the spec). The tokens are walked in chunks as in
:mod:`xentkit.kernels.linear_chunked`, whose chunking (:class:`~.linear_chunked.Problem`) and
backward walk (:func:`~.linear_chunked.backward_over_chunks`) this module reuses: the forward
computes each chunk's logits into one reused ``m x V`` buffer and keeps per token only
:math:`\log p_t`, :math:`H` and :math:`\mathrm{lse}` (one matrix product). The per-token
``grad_output`` :math:`a` of :math:`\log p_t` and :math:`b` of :math:`H` are known only in the
backward, which walks the chunks again, recomputes :math:`\log p = s - \mathrm{lse}` from the
saved :math:`\mathrm{lse}` and pushes

.. math:: G_j = \frac{1}{T}\Big(a\,([j = t] - p_j) - b\,p_j(\log p_j + H)\Big)

through the head: three matrix products (the logits again, :math:`G W` and
:math:`G^\top H`), four with the forward's, the least any path takes that keeps no ``M x V``
tensor between the two passes. Nothing of size ``M x V`` is ever built, so
the extra memory is one chunk of logits (and its float32 copy for half-precision input), plus
the float32 weight gradient, whatever ``M`` is: the row passes run slice by slice of rows
(:func:`~xentkit.kernels.row_stats.row_slices`), their temporaries a few MiB. Tokens whose
target is ``ignore_index`` are dropped before the first matrix product; their outputs and
gradients are 0.

Matrix products run in the input dtype; everything else in float32 (float64 for float64).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from xentkit import reference
from xentkit.kernels import row_stats
from xentkit.kernels.linear_chunked import Problem, backward_over_chunks

# The ``ignore_index`` of a call where every target is a class: no int64 class id equals it.
NO_IGNORE = -(2**63)


class Transform(NamedTuple):
    r"""What is done to the head's output :math:`z` before the softmax, in this order (TRL's
    convention): :math:`s = c \tanh(\lambda z / c) / T` (no tanh without a softcap :math:`c`)."""

    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: float | None = None

    def apply(self, logits: Tensor) -> tuple[Tensor, Tensor | None]:
        r"""``s`` in the accumulation dtype, written over ``logits`` when they are already in it
        (the chunk buffer is scratch), and :math:`\tanh(\lambda z / c)` (None without a
        softcap) for :meth:`chain`."""
        z = logits.to(reference.accumulation_dtype(logits.dtype))
        if self.logit_scale != 1.0:
            z = z.mul_(self.logit_scale)
        tanh = None
        if self.softcap is not None:
            tanh = torch.tanh(z.div_(self.softcap))
            z = z.copy_(tanh).mul_(self.softcap)
        return z if self.temperature == 1.0 else z.mul_(1 / self.temperature), tanh

    def chain(self, grad: Tensor, tanh: Tensor | None) -> Tensor:
        r"""``grad`` with respect to ``s`` turned into one with respect to ``z``, in place:
        times :math:`\lambda (1 - \tanh^2) / T`."""
        factor = self.logit_scale / self.temperature
        if tanh is not None:
            grad.mul_(tanh.square_().neg_().add_(1))
        return grad if factor == 1.0 else grad.mul_(factor)


class Outputs(NamedTuple):
    """Which optional per-token outputs a call computes."""

    entropy: bool = False
    log_sum_sq_probs: bool = False
    mean_logits: bool = False
    is_top1: bool = False


def _rows(triton_rows: bool):
    """The row passes of a chunk: :func:`row_stats.block` and :func:`row_stats.log_prob_grad`
    in torch ops (slice by slice of rows), or their Triton kernels (one program per row, on
    CUDA; the matrix products stay cuBLAS's)."""
    if triton_rows:
        from xentkit.kernels import triton as kernels

        return kernels.row_stats_block, kernels.log_prob_grad
    return row_stats.block, row_stats.log_prob_grad


def _forward(
    problem: Problem, transform: Transform, outputs: Outputs, triton_rows: bool
) -> list[Tensor]:
    """``[log p_t, lse, entropy, log sum p^2, mean logit, is_top1]`` per token (0 / False where
    ignored; an empty tensor for an output not asked for)."""
    block, _ = _rows(triton_rows)
    rows = problem.target.shape[0]
    zeros = problem.hidden.new_zeros(rows, dtype=problem.acc)
    results = [zeros, zeros.clone()]
    for asked in outputs[:3]:
        results.append(zeros.clone() if asked else zeros.new_empty(0))
    flag = torch.zeros(rows if outputs.is_top1 else 0, dtype=torch.bool, device=zeros.device)
    results.append(flag)
    log_prob, lse, entropy, log_sum_sq, mean, top1 = results
    with problem.workspace() as buffer:
        for where, hidden, target in problem.chunks():
            s, _ = transform.apply(problem.logits(hidden, buffer))
            stats = block(
                s,
                target,
                entropy=outputs.entropy,
                sum_sq=outputs.log_sum_sq_probs,
                sum_x=outputs.mean_logits,
                argmax=outputs.is_top1,
            )
            done = row_stats.finish(stats, target, s.shape[-1])
            log_prob[where], lse[where] = done.log_prob, done.lse
            for name, out in zip(Outputs._fields, (entropy, log_sum_sq, mean, top1), strict=True):
                if getattr(outputs, name):
                    out[where] = getattr(done, name)
    return results


def _backward(
    problem: Problem,
    grad_log_prob: Tensor | None,
    grad_entropy: Tensor | None,
    lse: Tensor,
    entropy: Tensor,
    transform: Transform,
    needs: tuple[bool, bool, bool],
    triton_rows: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``sum_i a_i log p_{t_i} + b_i H_i`` (a missing ``a`` or ``b`` is 0)."""
    _, log_prob_grad = _rows(triton_rows)
    a = torch.zeros_like(lse) if grad_log_prob is None else grad_log_prob.to(problem.acc)
    b = None if grad_entropy is None else grad_entropy.to(problem.acc)

    def chunk_grad(where: slice | Tensor, logits: Tensor, target: Tensor) -> Tensor:
        s, tanh = transform.apply(logits)
        b_rows = None if b is None else b[where]
        h_rows = None if b is None else entropy[where]
        grad = log_prob_grad(s, lse[where], a[where], b_rows, h_rows, target)
        grad = transform.chain(grad, tanh)
        # The matrix products take the gradient in the input dtype.
        return grad if grad.dtype == logits.dtype else logits.copy_(grad)

    return backward_over_chunks(problem, needs, chunk_grad)


def _problem(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    chunk_size: int | None,
) -> Problem:
    """The chunking of one call: no class weight, smoothing, z-loss or softcap here."""
    return Problem(hidden, weight, target, bias, None, ignore_index, 0.0, 0.0, None, chunk_size)


@torch.library.custom_op("xentkit::linear_log_probs", mutates_args=())
def _log_probs_op(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    transform: list[float],
    ignore_index: int,
    outputs: list[bool],
    chunk_size: int | None,
    triton_rows: bool,
) -> list[Tensor]:
    """``[log p_t, lse, entropy, log sum p^2, mean logit, is_top1]`` per token (see
    :func:`_forward`); ``lse`` is kept for the backward. ``transform`` is ``(T, scale,
    softcap or 0)``. One opaque op, so that ``torch.compile`` of a caller neither unrolls nor
    re-traces the chunk loop."""
    problem = _problem(hidden, weight, target, bias, ignore_index, chunk_size)
    return _forward(problem, _transform(transform), Outputs(*outputs), triton_rows)


def _transform(values: list[float]) -> Transform:
    temperature, scale, softcap = values
    return Transform(temperature, scale, softcap or None)


@_log_probs_op.register_fake
def _(hidden, weight, target, bias, transform, ignore_index, outputs, chunk_size, triton_rows):
    acc = reference.accumulation_dtype(hidden.dtype)
    rows = target.shape[0]
    results = [hidden.new_empty(rows, dtype=acc), hidden.new_empty(rows, dtype=acc)]
    results += [hidden.new_empty(rows if asked else 0, dtype=acc) for asked in outputs[:3]]
    results.append(hidden.new_empty(rows if outputs[3] else 0, dtype=torch.bool))
    return results


@torch.library.custom_op("xentkit::linear_log_probs_backward", mutates_args=())
def _log_probs_backward_op(
    grad_log_prob: Tensor | None,
    grad_entropy: Tensor | None,
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    lse: Tensor,
    entropy: Tensor,
    transform: list[float],
    ignore_index: int,
    chunk_size: int | None,
    needs: list[bool],
    triton_rows: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients asked for by ``needs`` (hidden, weight, bias) in the parameters' dtypes,
    an empty tensor for each other one."""
    problem = _problem(hidden, weight, target, bias, ignore_index, chunk_size)
    grads = (grad_log_prob, grad_entropy, lse, entropy)
    return _backward(problem, *grads, _transform(transform), tuple(needs), triton_rows)


@_log_probs_backward_op.register_fake
def _(grad_log_prob, grad_entropy, hidden, weight, target, bias, *options):
    needs = options[-2]
    params = (hidden, weight, bias)
    return tuple(
        torch.empty_like(p, memory_format=torch.contiguous_format) if need else hidden.new_empty(0)
        for p, need in zip(params, needs, strict=True)
    )


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, target, bias, transform, ignore_index, outputs, chunk_size, triton_rows = inputs
    ctx.options = (transform, ignore_index, chunk_size, triton_rows)
    ctx.return_entropy = outputs[0]
    _, lse, entropy, *statistics = output
    # Saved through autograd so that a backward which reads the inputs again notices in-place
    # changes to them.
    ctx.save_for_backward(hidden, weight, target, bias, lse, entropy)
    ctx.mark_non_differentiable(lse, *statistics, *(() if outputs[0] else (entropy,)))
    ctx.set_materialize_grads(False)


def _autograd_backward(ctx, grads: list[Tensor | None]):
    grad_log_prob, _, grad_entropy, *_ = grads
    if not ctx.return_entropy:
        grad_entropy = None
    none = (None,) * 4
    needs = [ctx.needs_input_grad[i] for i in (0, 1, 3)]
    if (grad_log_prob is None and grad_entropy is None) or not any(needs):
        return None, None, None, None, *none, None
    hidden, weight, target, bias, lse, entropy = ctx.saved_tensors
    transform, ignore_index, chunk_size, triton_rows = ctx.options
    grads = _log_probs_backward_op(
        grad_log_prob, grad_entropy, hidden, weight, target, bias, lse, entropy,
        transform, ignore_index, chunk_size, needs, triton_rows,
    )  # fmt: skip
    gh, gw, gb = (g if need else None for g, need in zip(grads, needs, strict=True))
    return gh, gw, None, gb, *none, None


_log_probs_op.register_autograd(_autograd_backward, setup_context=_setup_context)


class HeadOutputs(NamedTuple):
    """Per-token outputs of the LM head (None where not asked for)."""

    log_probs: Tensor  # log p(target), differentiable
    entropy: Tensor | None  # differentiable
    log_sum_sq_probs: Tensor | None  # log sum_j p_j^2, no gradient
    mean_logits: Tensor | None  # mean_j s_j, no gradient
    is_top1: Tensor | None  # bool: the target is the first argmax


def head_outputs(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    transform: Transform,
    ignore_index: int,
    outputs: Outputs,
    chunk_size: int | None,
    triton_rows: bool = False,
) -> HeadOutputs:
    r"""The LM head's per-token outputs over token chunks, never building the logits:

    .. math:: \log p_{i,t_i} = s_{i,t_i} - \mathrm{lse}(s_i), \quad
              H_i = -\sum_j p_{i,j} \log p_{i,j}, \quad \log \sum_j p_{i,j}^2, \quad
              \frac{1}{V} \sum_j s_{i,j}, \quad [t_i = \operatorname{argmax}_j s_{i,j}]

    with :math:`s_i` = ``transform`` of :math:`W h_i + b` and the sums of
    :mod:`xentkit.kernels.row_stats`.

    Args:
        hidden: ``(M, D)`` hidden states.
        weight: ``(V, D)`` classifier, the layout of ``nn.Linear(D, V).weight``.
        target: ``(M,)`` int64 class ids or ``ignore_index``.
        bias: optional ``(V,)``.
        transform: temperature, logit scale and softcap (:class:`Transform`).
        ignore_index: targets whose outputs (and gradients) are 0 (False for ``is_top1``).
        outputs: which optional outputs to compute (:class:`Outputs`).
        chunk_size: tokens per chunk; :func:`~.linear_chunked.auto_chunk_size` when None.
        triton_rows: run the row passes as Triton kernels (CUDA, or ``TRITON_INTERPRET=1``).
    Returns:
        :class:`HeadOutputs` of ``(M,)`` tensors in float32 (float64 for float64 input).

    Example:
        >>> h, w = torch.eye(2), torch.tensor([[1.0, 0.5], [0.5, 3.0], [2.0, 1.0]])
        >>> out = head_outputs(h, w, torch.tensor([2, 1]), None, Transform(), -100,
        ...                    Outputs(entropy=True, is_top1=True), None)
        >>> out.log_probs, out.entropy, out.is_top1
        (tensor([-0.4644, -0.1967]), tensor([0.9060, 0.5876]), tensor([True, True]))
    """
    values = [transform.temperature, transform.logit_scale, transform.softcap or 0.0]
    log_prob, _, entropy, log_sum_sq, mean, top1 = _log_probs_op(
        hidden, weight, target, bias, values, ignore_index, list(outputs), chunk_size,
        triton_rows,
    )  # fmt: skip
    return HeadOutputs(
        log_prob,
        entropy if outputs.entropy else None,
        log_sum_sq if outputs.log_sum_sq_probs else None,
        mean if outputs.mean_logits else None,
        top1 if outputs.is_top1 else None,
    )
