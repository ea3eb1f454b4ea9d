"""A fused cross-entropy kernel as a ``torch.library`` custom op: gradient in the forward pass,
backward a scale.

Every fused cross-entropy backend (the chunked torch kernel, the Triton kernel) computes the
loss and, when asked, the gradient of the reduced loss with respect to the logits in one
forward call. :func:`fused_cross_entropy` turns such a forward into the op users call:

* ``xentkit::<name>``: loss and gradient buffer, with a fake (meta) implementation and a
  registered backward that multiplies the buffer by ``grad_output``, so ``torch.compile`` of a
  caller traces it as one opaque node (no graph break, no recompilation for a new batch size);
* ``xentkit::<name>_inplace_``: the same with the gradient written over the logits
  (``inplace_backward=True``); a mutating op carries no autograd formula of its own, so a small
  ``autograd.Function`` holds it.

The backward has no second derivative: it only scales what the forward stored.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from xentkit import reference

# forward(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
#         compute_grad, out) -> (loss, gradient or None); ``out`` is where the gradient goes
# (the logits themselves in place), allocated by the forward when None.
Forward = Callable[..., tuple[Tensor, Tensor | None]]


def graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``): a stored gradient
    may then be needed again and must not be scaled in place. True while tracing, where the
    scaling is functional anyway, and on torch versions that cannot tell."""
    keeps = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return torch.compiler.is_compiling() or keeps is None or keeps()


def is_one(scale: Tensor) -> bool:
    """Whether the scalar ``scale`` (a backward's ``grad_output``) is known to be 1, as
    ``loss.backward()`` passes it, so that a stored gradient needs no pass to scale it: read
    on the CPU only (on an accelerator reading it would synchronise) and never while tracing
    (its value is unknown there)."""
    return not torch.compiler.is_compiling() and scale.device.type == "cpu" and bool(scale == 1)


def scale_gradients(grads: list[Tensor], scale: Tensor) -> list[Tensor]:
    """Gradients a forward stored, times the backward's ``scale``: in place where the graph is
    not kept (no second copy of a V x D weight gradient), untouched where ``scale`` is known to
    be 1 (:func:`is_one`)."""
    if graph_is_kept():
        return [g * scale for g in grads]
    if is_one(scale):
        return grads
    return [g.mul_(scale) for g in grads]


def no_class_weight_derivative(needed: bool) -> None:
    """Raise, as PyTorch's cross_entropy does, when the class weights ask for a gradient."""
    if needed:
        raise RuntimeError(
            "the derivative for 'weight' (the class weights) is not implemented, as in "
            "PyTorch's cross_entropy: pass weight.detach(), or use backend='reference'."
        )


def scale_gradient(grad: Tensor, grad_output: Tensor | None, reduction: str) -> Tensor | None:
    """The stored gradient times ``grad_output``: in place unless the graph is kept, so the
    backward pass needs no second (M, C) buffer."""
    if grad_output is None:
        return None
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            "xentkit's fused cross-entropy kernel has no second derivative (the backward pass "
            "only scales the gradient it stored); pass backend='reference' to "
            "xentkit.cross_entropy to differentiate twice (create_graph=True)."
        )
    if reduction == "none":
        grad_output = grad_output.unsqueeze(1)
    elif is_one(grad_output):
        return grad  # loss.backward(): nothing to scale
    if graph_is_kept():
        return (grad * grad_output).to(grad.dtype)
    return grad.mul_(grad_output)


def _fake_loss(logits: Tensor, reduction: str) -> Tensor:
    """The loss a fused op returns, as a fake tensor: per row for ``"none"``, else a scalar, in
    the accumulation dtype."""
    shape = logits.shape[:1] if reduction == "none" else ()
    return logits.new_empty(shape, dtype=reference.accumulation_dtype(logits.dtype))


def fused_cross_entropy(name: str, forward: Forward) -> Callable[..., Tensor]:
    """The differentiable ``cross_entropy(logits, target, weight, ignore_index, reduction,
    label_smoothing, z_loss, softcap, inplace_backward=False)`` of a backend's ``forward``,
    registered as the custom ops ``xentkit::<name>`` and ``xentkit::<name>_inplace_``."""

    @torch.library.custom_op(f"xentkit::{name}", mutates_args=())
    def op(
        logits: Tensor,
        target: Tensor,
        weight: Tensor | None,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
        z_loss: float,
        softcap: float | None,
        compute_grad: bool,
    ) -> tuple[Tensor, Tensor]:
        options = (weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
        loss, grad = forward(logits, target, *options, compute_grad, None)
        return loss, logits.new_empty(0) if grad is None else grad

    @op.register_fake
    def _(logits, target, weight, ignore_index, reduction, *options):
        compute_grad = options[-1]
        grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
        return _fake_loss(logits, reduction), grad

    def setup_context(ctx, inputs, output) -> None:
        ctx.reduction = inputs[4]
        ctx.save_for_backward(output[1])
        # Without this autograd would fill an (M, C) zero gradient for the unused buffer output.
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss: Tensor, _grad_buffer: Tensor):
        no_class_weight_derivative(ctx.needs_input_grad[2])
        (grad,) = ctx.saved_tensors
        return scale_gradient(grad, grad_loss, ctx.reduction), *(None,) * 8

    op.register_autograd(backward, setup_context=setup_context)

    @torch.library.custom_op(f"xentkit::{name}_inplace_", mutates_args=("logits",))
    def inplace_op(
        logits: Tensor,
        target: Tensor,
        weight: Tensor | None,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
        z_loss: float,
        softcap: float | None,
    ) -> Tensor:
        options = (weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
        return forward(logits, target, *options, True, logits)[0]

    @inplace_op.register_fake
    def _(logits, target, weight, ignore_index, reduction, *_options):
        return _fake_loss(logits, reduction)

    class InplaceCrossEntropy(torch.autograd.Function):
        """Cross entropy whose gradient lives in the logits' own storage."""

        @staticmethod
        def forward(ctx, logits: Tensor, target: Tensor, *options) -> Tensor:
            loss = inplace_op(logits, target, *options)
            ctx.reduction = options[2]
            ctx.save_for_backward(logits)
            return loss

        @staticmethod
        def backward(ctx, grad_loss: Tensor):
            no_class_weight_derivative(ctx.needs_input_grad[2])
            (grad,) = ctx.saved_tensors
            return scale_gradient(grad, grad_loss, ctx.reduction), *(None,) * 7

    def cross_entropy(
        logits: Tensor,
        target: Tensor,
        weight: Tensor | None,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
        z_loss: float,
        softcap: float | None,
        inplace_backward: bool = False,
    ) -> Tensor:
        options = (weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
        compute_grad = logits.requires_grad and torch.is_grad_enabled()
        if inplace_backward and compute_grad:
            return InplaceCrossEntropy.apply(logits, target, *options)
        return op(logits, target, *options, compute_grad)[0]

    return cross_entropy
