r"""Per-token log-probabilities and entropy of the LM head over token chunks.

What RL fine-tuning (PPO, GRPO) takes from the head: for each token, with
:math:`s = (W h + b) / T`, :math:`\mathrm{lse} = \log \sum_j e^{s_j}` and
:math:`p = \mathrm{softmax}(s)`,

.. math:: \log p_t = s_t - \mathrm{lse}, \qquad H = -\sum_j p_j \log p_j

(:func:`xentkit.reference.token_log_probs` is the spec). The tokens are walked in chunks as in
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
the extra memory is one chunk of logits and its float32 working copies, plus the float32
weight gradient, whatever ``M`` is. Tokens whose target is ``ignore_index`` are dropped before
the first matrix product; their outputs and gradients are 0.

Matrix products run in the input dtype; everything else in float32 (float64 for float64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from xentkit import reference
from xentkit.kernels.linear_chunked import Problem, backward_over_chunks


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """``s = logits / T`` in the accumulation dtype, written over ``logits`` when they are
    already in it (the chunk buffer is scratch)."""
    s = logits.to(reference.accumulation_dtype(logits.dtype))
    return s if temperature == 1.0 else s.mul_(1 / temperature)


def _entropy(log_probs: Tensor) -> Tensor:
    r""":math:`-\sum_j p_j \log p_j` per row; floors ``log_probs`` in place (see
    :data:`xentkit.reference.LOG_PROB_FLOOR`: a masked class adds 0, not NaN)."""
    p = torch.exp(log_probs)
    return p.mul_(log_probs.clamp_min_(reference.LOG_PROB_FLOOR)).sum(-1).neg_()


def _forward(
    problem: Problem, temperature: float, return_entropy: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(log p_t, entropy, lse)`` per token (0 where ignored; an empty entropy when not
    asked for)."""
    zeros = problem.hidden.new_zeros(problem.target.shape[0], dtype=problem.acc)
    log_prob, lse = zeros, zeros.clone()
    entropy = zeros.clone() if return_entropy else zeros.new_empty(0)
    buffer = problem.buffer()
    for where, hidden, target in problem.chunks():
        s = _scaled(problem.logits(hidden, buffer), temperature)
        lse[where] = chunk_lse = torch.logsumexp(s, -1)
        log_prob[where] = s.gather(1, target.unsqueeze(1)).squeeze(1) - chunk_lse
        if return_entropy:
            entropy[where] = _entropy(s.sub_(chunk_lse.unsqueeze(1)))
    return log_prob, entropy, lse


def _backward(
    problem: Problem,
    grad_log_prob: Tensor | None,
    grad_entropy: Tensor | None,
    lse: Tensor,
    entropy: Tensor,
    temperature: float,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``sum_i a_i log p_{t_i} + b_i H_i`` (a missing ``a`` or ``b`` is 0)."""
    # a / T and b / T: the 1 / T of ds/dz folded into the per-row scales.
    a = torch.zeros_like(lse) if grad_log_prob is None else grad_log_prob.to(problem.acc)
    a = a / temperature
    b = None if grad_entropy is None else grad_entropy.to(problem.acc) / temperature

    def chunk_grad(where: slice | Tensor, logits: Tensor, target: Tensor) -> Tensor:
        log_probs = _scaled(logits, temperature).sub_(lse[where].unsqueeze(1))
        a_rows = a[where].unsqueeze(1)
        if b is None:
            grad = log_probs.exp_().mul_(-a_rows)  # -a p / T
        else:
            # -(p / T)(a + b (log p + H)), log p floored as in the forward's entropy.
            b_rows = b[where].unsqueeze(1)
            p = torch.exp(log_probs)
            grad = log_probs.clamp_min_(reference.LOG_PROB_FLOOR).mul_(-b_rows)
            grad.sub_(a_rows + b_rows * entropy[where].unsqueeze(1)).mul_(p)
        grad.scatter_add_(1, target.unsqueeze(1), a_rows)  # + a / T at the target
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
    temperature: float,
    ignore_index: int,
    return_entropy: bool,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(log p_t, entropy, lse)`` per token; ``lse`` is kept for the backward. One opaque op,
    so that ``torch.compile`` of a caller neither unrolls nor re-traces the chunk loop."""
    problem = _problem(hidden, weight, target, bias, ignore_index, chunk_size)
    return _forward(problem, temperature, return_entropy)


@_log_probs_op.register_fake
def _(hidden, weight, target, bias, temperature, ignore_index, return_entropy, chunk_size):
    acc = reference.accumulation_dtype(hidden.dtype)
    rows = target.shape[0]
    entropy = hidden.new_empty(rows if return_entropy else 0, dtype=acc)
    return hidden.new_empty(rows, dtype=acc), entropy, hidden.new_empty(rows, dtype=acc)


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
    temperature: float,
    ignore_index: int,
    chunk_size: int | None,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients asked for by ``needs`` (hidden, weight, bias) in the parameters' dtypes,
    an empty tensor for each other one."""
    problem = _problem(hidden, weight, target, bias, ignore_index, chunk_size)
    grads = (grad_log_prob, grad_entropy, lse, entropy)
    return _backward(problem, *grads, temperature, tuple(needs))


@_log_probs_backward_op.register_fake
def _(grad_log_prob, grad_entropy, hidden, weight, target, bias, *options):
    needs = options[-1]
    params = (hidden, weight, bias)
    return tuple(
        torch.empty_like(p, memory_format=torch.contiguous_format) if need else hidden.new_empty(0)
        for p, need in zip(params, needs, strict=True)
    )


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, target, bias, temperature, ignore_index, return_entropy, chunk_size = inputs
    ctx.options = (temperature, ignore_index, chunk_size)
    ctx.return_entropy = return_entropy
    _, entropy, lse = output
    # Saved through autograd so that a backward which reads the inputs again notices in-place
    # changes to them.
    ctx.save_for_backward(hidden, weight, target, bias, lse, entropy)
    ctx.mark_non_differentiable(*output[1 if not return_entropy else 2 :])
    ctx.set_materialize_grads(False)


def _autograd_backward(ctx, grad_log_prob: Tensor | None, grad_entropy: Tensor | None, _lse):
    if not ctx.return_entropy:
        grad_entropy = None
    none = (None,) * 4
    needs = [ctx.needs_input_grad[i] for i in (0, 1, 3)]
    if (grad_log_prob is None and grad_entropy is None) or not any(needs):
        return None, None, None, None, *none
    hidden, weight, target, bias, lse, entropy = ctx.saved_tensors
    temperature, ignore_index, chunk_size = ctx.options
    grads = _log_probs_backward_op(
        grad_log_prob, grad_entropy, hidden, weight, target, bias, lse, entropy,
        temperature, ignore_index, chunk_size, needs,
    )  # fmt: skip
    gh, gw, gb = (g if need else None for g, need in zip(grads, needs, strict=True))
    return gh, gw, None, gb, *none


_log_probs_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def linear_log_probs(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    temperature: float,
    ignore_index: int,
    return_entropy: bool,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor | None]:
    r"""Fused ``log_softmax((hidden @ weight.T + bias) / T).gather(-1, target)`` and the
    entropy, over token chunks.

    .. math:: \log p_{i,t_i} = s_{i,t_i} - \mathrm{lse}(s_i), \quad
              H_i = -\sum_j p_{i,j} \log p_{i,j}, \qquad s_i = (W h_i + b) / T

    Args:
        hidden: ``(M, D)`` hidden states.
        weight: ``(V, D)`` classifier, the layout of ``nn.Linear(D, V).weight``.
        target: ``(M,)`` int64 class ids or ``ignore_index``.
        bias: optional ``(V,)``.
        temperature: :math:`T > 0`.
        ignore_index: targets whose outputs (and gradients) are 0.
        return_entropy: whether to compute :math:`H` too.
        chunk_size: tokens per chunk; :func:`~.linear_chunked.auto_chunk_size` when None.
    Returns:
        ``(log_prob, entropy)``, each ``(M,)`` in float32 (float64 for float64 input);
        ``entropy`` is None unless ``return_entropy``.

    Example:
        >>> h, w = torch.eye(2), torch.tensor([[1.0, 0.5], [0.5, 3.0], [2.0, 1.0]])
        >>> linear_log_probs(h, w, torch.tensor([2, 1]), None, 1.0, -100, True, None)
        (tensor([-0.4644, -0.1967]), tensor([0.9060, 0.5876]))
    """
    options = (temperature, ignore_index, return_entropy, chunk_size)
    log_prob, entropy, _ = _log_probs_op(hidden, weight, target, bias, *options)
    return log_prob, entropy if return_entropy else None
