r"""Distillation between two LM heads over token chunks: TRL's generalized Jensen-Shannon
divergence without either model's ``M x V`` logits.

For each token, with the student's and the teacher's logits at temperature :math:`T`,
:math:`s = (W_s h_s + b_s) / T` and :math:`t = (W_t h_t + b_t) / T`, and their softmaxes
:math:`p = \mathrm{softmax}(s)`, :math:`q = \mathrm{softmax}(t)`:

.. math:: D_\beta = \begin{cases}
          \mathrm{KL}(q \,\|\, p) = \sum_j q_j (\log q_j - \log p_j) & \beta = 0 \\
          \mathrm{KL}(p \,\|\, q) = \sum_j p_j (\log p_j - \log q_j) & \beta = 1 \\
          \beta\,\mathrm{KL}(q \,\|\, m) + (1-\beta)\,\mathrm{KL}(p \,\|\, m),
          \quad m = \beta q + (1-\beta) p & \text{otherwise}
          \end{cases}

(:func:`xentkit.reference.distillation_terms` is the spec). Only the student is trained, and
the gradient of the divergence with respect to its logits has a closed form in each regime
(:math:`\partial/\partial z = \frac{1}{T}\,\partial/\partial s`; :math:`\sum_j p_j = 1` makes
the terms that come from differentiating :math:`\log p` vanish):

.. math:: \frac{\partial D_0}{\partial s_j} = p_j - q_j, \qquad
          \frac{\partial D_1}{\partial s_j} = p_j (r_j - D_1),\ r = \log p - \log q, \qquad
          \frac{\partial D_\beta}{\partial s_j} = (1-\beta)\,p_j (u_j - K),\
          u = \log p - \log m,\ K = \sum_k p_k u_k = \mathrm{KL}(p \,\|\, m)

The last one comes from writing :math:`D_\beta = -\beta H(q) - (1-\beta) H(p) + H(m)`, whose
teacher term is a constant. With ``hard_weight`` :math:`\lambda > 0` the loss is
:math:`(1-\lambda) D_\beta + \lambda\,\mathrm{ce}(z, y)`, the cross entropy of the student's
*raw* logits :math:`z = W_s h_s + b_s` (temperature 1, as Liger Kernel's distillation losses
take it), whose gradient is :math:`\mathrm{softmax}(z) - e_y`.

The tokens are walked in chunks as in :mod:`xentkit.kernels.linear_chunked`, whose chunking
(:class:`~.linear_chunked.Problem`) and gradient accumulators this module reuses. Each chunk
computes both heads' logits (two matrix products), the per-token loss and, for
``reduction="mean"`` and ``"sum"``, the gradient of the student's logits, which is pushed
through the student's head at once (:math:`G W_s` and :math:`G^\top H_s`): four matrix products
in all, and the backward pass only multiplies the stored gradients by ``grad_output`` (for
``loss.backward()`` on the CPU with float32 or float64 parameters, not even that: the mean's
denominator is applied in the forward's row pass, as in :mod:`~.linear_chunked`). For
``reduction="none"`` the per-token ``grad_output`` is unknown in the forward pass, which then
computes the losses only; the backward walks the chunks again (six matrix products in all).
A chunk holds both heads' logits and one to three float32 working buffers of the same size
(see :func:`_divergence`), and the weight gradient is one float32 ``V x D`` accumulator, so the
extra memory does not grow with the number of tokens. Tokens whose target is ``ignore_index``
are dropped before the first matrix product; their losses and gradients are 0.

Matrix products run in the input dtype; everything else in float32 (float64 for float64).
Log-probabilities are floored at :data:`xentkit.reference.LOG_PROB_FLOOR`, so a class masked
in both heads (a ``-inf`` logit) adds :math:`0 \log 0 = 0`, not NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from xentkit import reference
from xentkit.kernels._fused_op import scale_gradients
from xentkit.kernels.linear_chunked import Problem, _gradient_buffers, _Gradients


class _Heads:
    """The student's :class:`Problem` (chunking and counted tokens) and the teacher beside it."""

    def __init__(
        self,
        student_input: Tensor,
        student_weight: Tensor,
        teacher_input: Tensor,
        teacher_weight: Tensor,
        target: Tensor | None,
        student_bias: Tensor | None,
        teacher_bias: Tensor | None,
        ignore_index: int,
        chunk_size: int | None,
    ) -> None:
        if target is None:
            # Every token counts: targets of 0 with an ignore_index no target equals.
            target = student_input.new_zeros(student_input.shape[0], dtype=torch.long)
            ignore_index = -1
        self.problem = Problem(
            student_input, student_weight, target, student_bias, None, ignore_index,
            0.0, 0.0, None, chunk_size,
        )  # fmt: skip
        self.teacher = (teacher_input, teacher_weight, teacher_bias)
        self.acc = self.problem.acc

    def chunks(self) -> Iterator[tuple[slice | Tensor, Tensor, Tensor, Tensor]]:
        """``(positions, student rows, teacher rows, targets)`` of each chunk of counted
        tokens."""
        teacher_input = self.teacher[0]
        for where, hidden, target in self.problem.chunks():
            if isinstance(where, slice):
                teacher_hidden = teacher_input[where]
            else:
                teacher_hidden = teacher_input.index_select(0, where)
            yield where, hidden, teacher_hidden, target

    def buffers(self, work: int) -> tuple[Tensor, Tensor, Tensor]:
        """The ``(m, V)`` buffers every chunk reuses: the student's and the teacher's logits
        (in their dtypes) and ``work`` float32 (float64) working buffers."""
        rows, classes = self.problem.rows, self.problem.weight.shape[0]
        student = self.problem.buffer()
        teacher = self.teacher[0].new_empty(rows, classes)
        scratch = student.new_empty(work, rows, classes, dtype=self.acc)
        return student, teacher, scratch


def _scaled_logits(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    buffer: Tensor,
    temperature: float,
    acc: torch.dtype,
) -> Tensor:
    """``(hidden @ weight.T + bias) / T`` of one chunk in the accumulation dtype: computed into
    ``buffer`` and scaled there when it is in that dtype, else a converted copy."""
    out = buffer[: hidden.shape[0]]
    if bias is None:
        torch.mm(hidden, weight.T, out=out)
    else:
        torch.addmm(bias, hidden, weight.T, out=out)
    s = out if out.dtype == acc else out.to(acc)
    return s if temperature == 1.0 else s.mul_(1 / temperature)


def _log_softmax_(x: Tensor) -> Tensor:
    """``log_softmax(x)`` per row, written over ``x``, floored at
    :data:`~xentkit.reference.LOG_PROB_FLOOR` (a masked class's ``0 * log 0`` is 0, not NaN)."""
    return x.sub_(torch.logsumexp(x, -1, keepdim=True)).clamp_min_(reference.LOG_PROB_FLOOR)


def _divergence(
    log_p: Tensor, log_q: Tensor, work: Tensor, beta: float, want_grad: bool
) -> tuple[Tensor, Tensor | None, float]:
    r"""``(D, G, c)``: per row the divergence :math:`D_\beta` between the student's ``log_p``
    and the teacher's ``log_q`` (both ``(m, V)``, overwritten) and, with ``want_grad``, ``G``
    with :math:`\partial D / \partial s = c\,G` (written over one of the buffers).

    ``work`` holds one working buffer for :math:`\beta \in \{0, 1\}`, two otherwise."""
    if beta == 0.0:  # KL(q || p): G = p - q
        q = torch.exp(log_q, out=work[0])
        loss = log_q.sub_(log_p).mul_(q).sum(-1)
        return loss, log_p.exp_().sub_(q) if want_grad else None, 1.0
    if beta == 1.0:  # KL(p || q): G = p (r - D), r = log p - log q
        p = torch.exp(log_p, out=work[0])
        p_r = torch.mul(p, log_p.sub_(log_q), out=log_q)
        loss = p_r.sum(-1)
        return loss, p_r.addcmul_(p, loss.unsqueeze(1), value=-1) if want_grad else None, 1.0
    # log m = logaddexp(log p + log(1 - beta), log q + log beta), never log(sum): no underflow.
    log_m = torch.add(log_p, math.log1p(-beta), out=work[0])
    torch.logaddexp(log_m, torch.add(log_q, math.log(beta), out=work[1]), out=log_m)
    log_q_over_m = torch.sub(log_q, log_m, out=work[1])
    teacher = log_q.exp_().mul_(log_q_over_m).sum(-1)  # KL(q || m)
    p = torch.exp(log_p, out=log_q)
    p_u = torch.mul(p, log_p.sub_(log_m), out=work[0])  # p (log p - log m)
    student = p_u.sum(-1)  # K = KL(p || m)
    loss = beta * teacher + (1 - beta) * student
    # G = p (u - K), c = 1 - beta.
    return loss, p_u.addcmul_(p, student.unsqueeze(1), value=-1) if want_grad else None, 1 - beta


def _chunk(
    s: Tensor,
    t: Tensor,
    target: Tensor,
    work: Tensor,
    beta: float,
    temperature: float,
    hard_weight: float,
    want_grad: bool,
    unit: float = 1.0,
) -> tuple[Tensor, Tensor | None]:
    r"""Per-row loss :math:`(1-\lambda) D_\beta + \lambda\,\mathrm{ce}` of one chunk from the
    scaled logits ``s`` (student) and ``t`` (teacher), both ``(m, V)`` in the accumulation
    dtype and overwritten, and with ``want_grad`` its gradient with respect to the student's
    raw logits :math:`z = T s` (written over a buffer), times ``unit``."""
    log_p, log_q = _log_softmax_(s), _log_softmax_(t)
    hard = grad_hard = None
    if hard_weight > 0:
        # T log p = z - const: the log-softmax of the raw logits is that of T log p.
        z = torch.mul(log_p, temperature, out=work[-1])
        lse = torch.logsumexp(z, -1, keepdim=True)
        hard = (lse - z.gather(1, target.unsqueeze(1))).squeeze(1)
        if want_grad:  # softmax(z) - one_hot(y)
            minus_one = z.new_full((z.shape[0], 1), -1.0)
            grad_hard = z.sub_(lse).exp_().scatter_add_(1, target.unsqueeze(1), minus_one)
    soft, grad, c = _divergence(log_p, log_q, work, beta, want_grad)
    loss = soft if hard is None else (1 - hard_weight) * soft + hard_weight * hard
    if grad is not None:
        scale = (1 - hard_weight) * c / temperature * unit  # d/dz = (1 / T) d/ds
        if scale != 1.0:
            grad.mul_(scale)
        if grad_hard is not None:
            grad.add_(grad_hard, alpha=hard_weight * unit)
    return loss, grad


def _work_buffers(beta: float, hard_weight: float) -> int:
    """Working buffers a chunk needs: one or two for the divergence, one for the hard term."""
    return (1 if beta in (0.0, 1.0) else 2) + (hard_weight > 0)


def _walk(
    heads: _Heads,
    options: tuple[float, float, float],
    grads: _Gradients,
    losses: Tensor | None,
    grad_output: Tensor | None = None,
    triton_rows: bool = False,
    unit: float = 1.0,
) -> Tensor:
    """Walk the chunks: each row's loss into ``losses`` (when given) and the gradient of
    ``sum_i g_i loss_i`` (``g = grad_output``, else ``unit``) through the student's head into
    ``grads``; returns the summed loss. ``triton_rows`` runs each chunk's row passes as one
    Triton kernel (:func:`xentkit.kernels.triton.distill_rows`, ``unit`` 1) instead of
    :func:`_chunk`."""
    beta, temperature, hard_weight = options
    problem, acc = heads.problem, heads.acc
    teacher_weight, teacher_bias = heads.teacher[1:]
    student_buffer, teacher_buffer, scratch = heads.buffers(_work_buffers(beta, hard_weight))
    total = torch.zeros((), dtype=acc, device=problem.hidden.device)
    for where, hidden, teacher_hidden, target in heads.chunks():
        m = hidden.shape[0]
        s = _scaled_logits(hidden, problem.weight, problem.bias, student_buffer, temperature, acc)
        t = _scaled_logits(teacher_hidden, teacher_weight, teacher_bias, teacher_buffer,
                           temperature, acc)  # fmt: skip
        if triton_rows:
            from xentkit.kernels import triton as kernels

            labels = target if target is not None else s.new_zeros(m, dtype=torch.long)
            loss, grad = kernels.distill_rows(
                s, t, labels, beta, temperature, hard_weight, grads.any
            )
        else:
            work = scratch[:, :m]
            loss, grad = _chunk(s, t, target, work, beta, temperature, hard_weight, grads.any, unit)
        if losses is not None:
            losses[where] = loss
        total += loss.sum()
        if grad is not None:
            if grad_output is not None:
                grad.mul_(grad_output[where].unsqueeze(1))
            # The matrix products take the gradient in the input dtype.
            if grad.dtype != student_buffer.dtype:
                grad = student_buffer[:m].copy_(grad)
            grads.add(where, hidden, grad)
    return total


@torch.library.custom_op("xentkit::linear_distillation_loss", mutates_args=())
def _distill_op(
    student_input: Tensor,
    student_weight: Tensor,
    teacher_input: Tensor,
    teacher_weight: Tensor,
    target: Tensor | None,
    student_bias: Tensor | None,
    teacher_bias: Tensor | None,
    beta: float,
    temperature: float,
    hard_weight: float,
    ignore_index: int,
    reduction: str,
    chunk_size: int | None,
    needs: list[bool],
    triton_rows: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, unit, grad_input, grad_weight, grad_bias)`` of the student: for the mean and
    the sum the gradients asked for by ``needs``, which the backward multiplies by
    ``grad_output * unit``; empty tensors for the others. They are the reduced loss's own
    (``unit`` 1) where the row pass can apply the mean's denominator (float32 or float64
    parameters, the torch row pass), so that ``loss.backward()`` on the CPU makes no pass over
    them; else the summed loss's (``unit`` 1 / count, for the reason in
    :mod:`~xentkit.kernels.linear_chunked`'s docstring). One opaque op, so that
    ``torch.compile`` of a caller neither unrolls nor re-traces the chunk loop."""
    heads = _Heads(
        student_input, student_weight, teacher_input, teacher_weight, target, student_bias,
        teacher_bias, ignore_index, chunk_size,
    )  # fmt: skip
    problem = heads.problem
    early = tuple(needs) if reduction != "none" else (False, False, False)
    grads = _Gradients(problem, early)
    losses = problem.hidden.new_zeros(problem.target.shape[0], dtype=heads.acc)
    per_token = 1.0  # what the reduction multiplies each token's loss by
    if reduction == "mean":
        # A mean over no counted token is 0 / 0 = NaN, as in PyTorch's cross_entropy; its
        # gradients are zero, which 1 / 0 must not turn into NaN.
        per_token = 1 / problem.count if problem.count else 0.0
    # Applied by the row pass where it can be (see above), else by the backward through unit.
    in_rows = per_token != 1.0 and problem.normalised and not triton_rows
    options = (beta, temperature, hard_weight)
    total = _walk(heads, options, grads, losses, None, triton_rows, per_token if in_rows else 1.0)
    loss = {"none": losses, "sum": total, "mean": total / problem.count}[reduction]
    unit = torch.full((), 1.0 if in_rows else per_token, dtype=heads.acc, device=total.device)
    return loss, unit, *grads.tensors()


@_distill_op.register_fake
def _(student_input, student_weight, teacher_input, teacher_weight, target, *options):
    reduction, needs = options[-4], options[-2]
    acc = reference.accumulation_dtype(student_input.dtype)
    rows = student_input.shape[0]
    loss = student_input.new_empty((rows,) if reduction == "none" else (), dtype=acc)
    early = needs if reduction != "none" else (False, False, False)
    grads = _gradient_buffers(student_input, student_weight, early, zero_hidden=False)
    grads = tuple(student_input.new_empty(0) if g is None else g for g in grads)
    return loss, student_input.new_empty((), dtype=acc), *grads


@torch.library.custom_op("xentkit::linear_distillation_loss_backward", mutates_args=())
def _distill_backward_op(
    grad_output: Tensor,
    student_input: Tensor,
    student_weight: Tensor,
    teacher_input: Tensor,
    teacher_weight: Tensor,
    target: Tensor | None,
    student_bias: Tensor | None,
    teacher_bias: Tensor | None,
    beta: float,
    temperature: float,
    hard_weight: float,
    ignore_index: int,
    chunk_size: int | None,
    needs: list[bool],
    triton_rows: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The student's gradients of ``sum_i grad_output_i * loss_i`` (``reduction="none"``) in
    the parameters' dtypes, an empty tensor for each one not asked for."""
    heads = _Heads(
        student_input, student_weight, teacher_input, teacher_weight, target, student_bias,
        teacher_bias, ignore_index, chunk_size,
    )  # fmt: skip
    grads = _Gradients(heads.problem, tuple(needs))
    options = (beta, temperature, hard_weight)
    _walk(heads, options, grads, None, grad_output.to(heads.acc), triton_rows)
    params = (student_input, student_weight, student_bias)
    return tuple(
        g.to(p.dtype) if need else g
        for g, p, need in zip(grads.tensors(), params, needs, strict=True)
    )


@_distill_backward_op.register_fake
def _(grad_output, student_input, student_weight, *options):
    needs, bias = options[-2], options[3]
    params = (student_input, student_weight, bias)
    return tuple(
        torch.empty_like(p, memory_format=torch.contiguous_format)
        if need
        else student_input.new_empty(0)
        for p, need in zip(params, needs, strict=True)
    )


def _setup_context(ctx, inputs, output) -> None:
    s_in, s_w, t_in, t_w, target, s_b, t_b, *options, needs, triton_rows = inputs
    beta, temperature, hard_weight, ignore_index, reduction, chunk_size = options
    ctx.reduction, ctx.needs = reduction, needs
    ctx.dtypes = tuple(None if p is None else p.dtype for p in (s_in, s_w, s_b))
    if reduction == "none":
        ctx.options = (
            beta, temperature, hard_weight, ignore_index, chunk_size, needs, triton_rows
        )  # fmt: skip
        # Saved through autograd so that a backward which reads the inputs again notices
        # in-place changes to them.
        ctx.save_for_backward(s_in, s_w, t_in, t_w, target, s_b, t_b)
    else:
        ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss: Tensor | None, *_unused):
    none = (None,) * 9
    if grad_loss is None:
        return None, None, None, None, None, None, *none
    if ctx.reduction == "none":
        grads = _distill_backward_op(grad_loss, *ctx.saved_tensors, *ctx.options)
    else:
        unit, *grads = ctx.saved_tensors
        grads = scale_gradients(grads, grad_loss * unit)
    gh, gw, gb = (
        g.to(dtype) if need else None
        for g, dtype, need in zip(grads, ctx.dtypes, ctx.needs, strict=True)
    )
    return gh, gw, None, None, None, gb, *none


_distill_op.register_autograd(_backward, setup_context=_setup_context)


def linear_distillation_loss(
    student_input: Tensor,
    student_weight: Tensor,
    teacher_input: Tensor,
    teacher_weight: Tensor,
    target: Tensor | None,
    student_bias: Tensor | None,
    teacher_bias: Tensor | None,
    beta: float,
    temperature: float,
    hard_weight: float,
    ignore_index: int,
    reduction: str,
    chunk_size: int | None,
    triton_rows: bool = False,
) -> Tensor:
    r"""Fused generalized JSD between the student's and the teacher's heads, over token chunks.

    .. math:: \ell_i = (1-\lambda)\,D_\beta\big(\mathrm{softmax}(s_i), \mathrm{softmax}(t_i)\big)
              + \lambda\,\mathrm{ce}(T s_i, y_i), \qquad
              s_i = (W_s h_i + b_s) / T, \quad t_i = (W_t h'_i + b_t) / T

    (:math:`D_\beta` in the module docstring). Only the student's tensors get gradients; pass
    the teacher's detached.

    Args:
        student_input: ``(M, D)`` student hidden states.
        student_weight: ``(V, D)`` student head, the layout of ``nn.Linear(D, V).weight``.
        teacher_input: ``(M, D')`` teacher hidden states of the same tokens.
        teacher_weight: ``(V, D')`` teacher head.
        target: ``(M,)`` int64 labels or ``ignore_index``; None counts every token.
        student_bias, teacher_bias: optional ``(V,)``.
        beta: :math:`\beta \in [0, 1]`.
        temperature: :math:`T > 0`.
        hard_weight: :math:`\lambda \in [0, 1]` (needs ``target`` when above 0).
        ignore_index: targets whose tokens count for nothing.
        reduction: ``"mean"`` (over counted tokens), ``"sum"`` or ``"none"``.
        chunk_size: tokens per chunk; :func:`~.linear_chunked.auto_chunk_size` when None.
        triton_rows: run each chunk's row passes as one Triton kernel (CUDA, or
            ``TRITON_INTERPRET=1``); the matrix products are the same either way.
    Returns:
        ``(M,)`` for ``reduction="none"``, else a scalar; float32 (float64 for float64 input).

    Example:
        >>> h, w = torch.eye(2), torch.tensor([[1.0, 0.5], [0.5, 3.0], [2.0, 1.0]])
        >>> linear_distillation_loss(h, w, h, w.flip(0), None, None, None, 0.5, 1.0, 0.0,
        ...                          -100, "none", None)
        tensor([0.0954, 0.0054])
    """
    grad_on = torch.is_grad_enabled()
    params = (student_input, student_weight, student_bias)
    needs = [grad_on and p is not None and p.requires_grad for p in params]
    options = (beta, temperature, hard_weight, ignore_index, reduction, chunk_size)
    return _distill_op(
        student_input, student_weight, teacher_input, teacher_weight, target, student_bias,
        teacher_bias, *options, needs, triton_rows,
    )[0]  # fmt: skip
