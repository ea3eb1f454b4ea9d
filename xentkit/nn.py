"""``nn.Module`` wrappers with PyTorch's constructor arguments plus xentkit's extensions.

Class weights and ``pos_weight`` are registered buffers, as in ``torch.nn``, so ``.to()``,
``.half()`` and ``state_dict()`` behave the same.

Example:
    >>> import torch, xentkit
    >>> loss_fn = xentkit.nn.CrossEntropyLoss(label_smoothing=0.1)
    >>> loss_fn(torch.tensor([[1.0, 0.5, 2.0], [0.5, 3.0, 1.0]]), torch.tensor([2, 1]))
    tensor(0.4472)
"""

from __future__ import annotations

from torch import Tensor, nn

from xentkit import functional as F
from xentkit._checks import legacy_reduction


class _Loss(nn.Module):
    def __init__(self, size_average=None, reduce=None, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = legacy_reduction(size_average, reduce, reduction)


class _WeightedLoss(_Loss):
    weight: Tensor | None

    def __init__(
        self, weight: Tensor | None = None, size_average=None, reduce=None, reduction="mean"
    ) -> None:
        super().__init__(size_average, reduce, reduction)
        self.register_buffer("weight", weight)


class NLLLoss(_WeightedLoss):
    """Module form of :func:`xentkit.nll_loss`."""

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.nll_loss(
            input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction
        )


class CrossEntropyLoss(_WeightedLoss):
    """Module form of :func:`xentkit.cross_entropy`, with ``z_loss``, ``softcap``, ``backend``
    and ``inplace_backward`` as keyword-only extensions."""

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        backend: str | None = None,
        inplace_backward: bool = False,
    ) -> None:
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.backend = backend
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            backend=self.backend,
            inplace_backward=self.inplace_backward,
        )


class BCELoss(_WeightedLoss):
    """Module form of :func:`xentkit.binary_cross_entropy`."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy(input, target, self.weight, reduction=self.reduction)


class BCEWithLogitsLoss(_Loss):
    """Module form of :func:`xentkit.binary_cross_entropy_with_logits`."""

    weight: Tensor | None
    pos_weight: Tensor | None

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average=None,
        reduce=None,
        reduction: str = "mean",
        pos_weight: Tensor | None = None,
    ) -> None:
        super().__init__(size_average, reduce, reduction)
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(
            input, target, self.weight, reduction=self.reduction, pos_weight=self.pos_weight
        )


class LinearCrossEntropyLoss(_Loss):
    """Module form of :func:`xentkit.linear_cross_entropy`: ``forward(input, weight, target,
    bias=None)`` takes the classifier's parameters (e.g. ``lm_head.weight``) so that the
    ``N x V`` logits are never built."""

    class_weight: Tensor | None

    def __init__(
        self,
        class_weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
        process_group=None,
        backend: str | None = None,
        filter_eps: float | None = None,
    ) -> None:
        super().__init__(reduction=reduction)
        self.register_buffer("class_weight", class_weight)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.process_group = process_group
        self.backend = backend
        self.filter_eps = filter_eps

    def forward(
        self, input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None
    ) -> Tensor:
        return F.linear_cross_entropy(
            input,
            weight,
            target,
            bias,
            class_weight=self.class_weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            chunk_size=self.chunk_size,
            process_group=self.process_group,
            backend=self.backend,
            filter_eps=self.filter_eps,
        )


class LinearDistillationLoss(nn.Module):
    """Module form of :func:`xentkit.linear_distillation_loss`: ``forward(student_input,
    student_weight, teacher_input, teacher_weight, target=None, student_bias=None,
    teacher_bias=None)`` takes both heads' parameters (e.g. ``student.lm_head.weight`` and
    ``teacher.lm_head.weight``) so that neither model's ``N x V`` logits are built; only the
    student's tensors get gradients.

    Example:
        >>> import torch, xentkit
        >>> h, w = torch.eye(2), torch.tensor([[1.0, 0.5], [0.5, 3.0], [2.0, 1.0]])
        >>> loss_fn = xentkit.nn.LinearDistillationLoss(beta=0.5, temperature=2.0)
        >>> loss_fn(h, w, h, torch.tensor([[2.0, 0.5], [0.5, 3.0], [1.0, 1.0]]))
        tensor(0.0117)
    """

    def __init__(
        self,
        beta: float = 0.0,
        temperature: float = 1.0,
        hard_weight: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        chunk_size: int | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.beta = beta
        self.temperature = temperature
        self.hard_weight = hard_weight
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.chunk_size = chunk_size
        self.backend = backend

    def forward(
        self,
        student_input: Tensor,
        student_weight: Tensor,
        teacher_input: Tensor,
        teacher_weight: Tensor,
        target: Tensor | None = None,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
    ) -> Tensor:
        return F.linear_distillation_loss(
            student_input,
            student_weight,
            teacher_input,
            teacher_weight,
            target,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            beta=self.beta,
            temperature=self.temperature,
            hard_weight=self.hard_weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            chunk_size=self.chunk_size,
            backend=self.backend,
        )


__all__ = [
    "BCELoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "LinearDistillationLoss",
    "NLLLoss",
]
