"""Input validation: every bad input gets a clear error, never a silently wrong number.

Each check raises the exception type PyTorch raises for the same mistake (``ValueError``,
``RuntimeError``, ``IndexError``, ``TypeError``) with a message that names the argument, says
what was expected and what was given, and suggests the likely fix.
"""

from __future__ import annotations

import math
import sys
import warnings

import torch
from torch import Tensor

from xentkit.reference import REDUCTIONS


class InputDtypeError(NotImplementedError, TypeError):
    """A non-floating ``input``. PyTorch raises ``NotImplementedError`` from its kernels for
    this; it is also a ``TypeError``, which is what it is."""


def legacy_reduction(size_average: bool | None, reduce: bool | None, reduction: str) -> str:
    """Map the deprecated ``size_average``/``reduce`` pair to a reduction, as PyTorch does."""
    if size_average is None and reduce is None:
        return reduction
    warnings.warn(
        "size_average and reduce are deprecated; use reduction='mean'|'sum'|'none' instead.",
        UserWarning,
        stacklevel=3,
    )
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if not reduce:
        return "none"
    return "mean" if size_average else "sum"


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"{reduction} is not a valid value for reduction: expected one of "
            f"{', '.join(repr(r) for r in REDUCTIONS)}, got {reduction!r}."
        )


def check_floating_input(input: Tensor, name: str = "input") -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(input).__name__}.")
    if not input.is_floating_point():
        raise InputDtypeError(
            f"{name} must be a floating-point tensor (logits or probabilities), got dtype "
            f"{input.dtype}; convert it first, e.g. {name}.float()."
        )


def check_options(label_smoothing: float = 0.0, z_loss: float = 0.0, softcap=None) -> None:
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(
            f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}; "
            "0.1 is a common choice, 0.0 turns smoothing off."
        )
    if not z_loss >= 0.0:
        raise ValueError(
            f"z_loss must be >= 0 (the weight of the logsumexp**2 penalty), got {z_loss}; "
            "1e-4 is the PaLM value, 0.0 turns it off."
        )
    if softcap is not None and not softcap > 0.0:
        raise ValueError(
            f"softcap must be a positive float (logits become softcap * tanh(logits / softcap)) "
            f"or None, got {softcap}; Gemma 2 uses 30.0."
        )


def class_dim(input: Tensor) -> int:
    """The class dimension of an ``(C)``, ``(N, C)`` or ``(N, C, d1, ...)`` input."""
    if input.dim() == 0:
        raise RuntimeError(
            "input must have a class dimension: expected shape (C), (N, C) or (N, C, d1, ...), "
            "got a 0-dimensional tensor; for a single binary prediction use "
            "binary_cross_entropy_with_logits."
        )
    return 0 if input.dim() == 1 else 1


def check_index_target(input: Tensor, target: Tensor, ignore_index: int) -> None:
    """Shape, dtype and range of class-index targets, checked in PyTorch's order (batch size,
    then shape, then dtype, then range) so the same mistake raises the same exception type."""
    cdim = class_dim(input)
    expected = input.shape[:cdim] + input.shape[cdim + 1 :]
    if input.dim() == 1 and target.dim() == 1:
        if target.shape[0] != 1:
            raise ValueError(
                f"For 1D input, 1D target must have size 1, but got target size: "
                f"{target.shape[0]}: an unbatched input (C,) takes one class index; for a batch "
                "pass input of shape (N, C)."
            )
        target = target.reshape(())
    if input.dim() >= 2 and target.dim() >= 1 and target.shape[0] != input.shape[0]:
        raise ValueError(
            f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
            f"({target.shape[0]}): target must have shape {tuple(expected)} for input of shape "
            f"{tuple(input.shape)}."
        )
    one_hot_hint = ""
    if target.is_floating_point() and target.dim() == input.dim():
        one_hot_hint = (
            " A floating target with a class dimension is one-hot or probabilities: give it the "
            f"input's shape {tuple(input.shape)}, or turn it into indices with target.argmax(dim)."
        )
    if input.dim() <= 2 and target.dim() > 1:
        raise RuntimeError(
            f"0D or 1D target tensor expected, multi-target not supported: target has shape "
            f"{tuple(target.shape)} but must have shape {tuple(expected)} for input of shape "
            f"{tuple(input.shape)}; for multi-label targets use binary_cross_entropy_with_logits."
            + one_hot_hint
        )
    if target.shape != expected:
        raise RuntimeError(
            f"Expected target size {list(expected)}, got {list(target.shape)}: for input "
            f"(N, C, d1, ...) = {tuple(input.shape)} the target is (N, d1, ...); if the classes "
            "are the last dimension, move them with input.movedim(-1, 1)." + one_hot_hint
        )
    if target.dtype not in (torch.long, torch.uint8):
        raise RuntimeError(
            f"expected target dtype to be Long or Byte, but got {_dtype(target)}: class-index "
            "targets must be integers; target.long() converts them."
        )
    check_target_range(target, input.shape[cdim], ignore_index)


def _on_device(t: Tensor) -> bool:
    """Whether a data-dependent check must leave its verdict on the device: while compiling
    (reading it would break the graph) and on accelerators (reading it would synchronise)."""
    return torch.compiler.is_compiling() or t.device.type != "cpu"


def check_target_range(target: Tensor, num_classes: int, ignore_index: int) -> None:
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if _on_device(target):
        # An asynchronous assert: RuntimeError with this message when the graph runs (on CUDA
        # a device-side assert, as torch's own kernels raise for the same mistake).
        torch._assert_async(
            bad.logical_not().all(),
            "Target is out of bounds: target values must lie in [0, C) (the number of classes) "
            "or equal ignore_index; labels that start at 1 need target - 1.",
        )
        return
    if target.numel() and bool(bad.any()):
        value = int(target[bad].flatten()[0])
        raise IndexError(
            f"Target {value} is out of bounds: target values must lie in [0, {num_classes}) "
            f"(the number of classes) or equal ignore_index={ignore_index}; labels that start "
            "at 1 need target - 1."
        )


def check_probability_target(input: Tensor, target: Tensor, ignore_index: int) -> None:
    if not target.is_floating_point():
        raise RuntimeError(
            f"Expected floating point type for target with class probabilities, got "
            f"{_dtype(target)}: a target of the input's shape {tuple(input.shape)} is read as "
            "class probabilities; for class indices give it the input's shape without the "
            "class dimension."
        )
    if ignore_index >= 0:
        raise RuntimeError(
            f"ignore_index is not supported for floating point target (got ignore_index="
            f"{ignore_index}): with probability targets, give a row weight of 0 by zeroing its "
            "target row instead, or use class-index targets."
        )


def check_class_weight(
    weight: Tensor | None, num_classes: int, dtype: torch.dtype | None, name: str = "weight"
) -> None:
    """A ``(C,)`` weight; of dtype ``dtype`` unless it is None (then any floating dtype)."""
    if weight is None:
        return
    if weight.dim() != 1 or weight.shape[0] != num_classes:
        raise RuntimeError(
            f"{name} tensor should be defined either for all {num_classes} classes or no "
            f"classes but got {name} tensor of shape: {list(weight.shape)}; pass a 1-D tensor "
            f"of length {num_classes} or None."
        )
    if dtype is not None and weight.dtype != dtype:
        raise RuntimeError(
            f"expected scalar type {_DTYPE_NAMES.get(dtype, dtype)} but found {_dtype(weight)} "
            f"for {name}: pass {name}.to({dtype})."
        )


def check_same_shape(input: Tensor, target: Tensor, function: str) -> None:
    if target.shape != input.shape:
        raise ValueError(
            f"Target size ({target.shape}) must be the same as input size ({input.shape}) in "
            f"{function}: one target per prediction; reshape the target (no broadcasting)."
        )


def check_broadcastable(t: Tensor | None, input: Tensor, name: str) -> None:
    if t is None:
        return
    try:
        shape = torch.broadcast_shapes(t.shape, input.shape)
    except RuntimeError:
        shape = None
    if shape != input.shape:
        raise RuntimeError(
            f"{name} of shape {tuple(t.shape)} must broadcast to the input's shape "
            f"{tuple(input.shape)}; {name} of the classes (last dimension) has shape "
            f"({input.shape[-1] if input.dim() else 1},)."
        )


def check_unit_interval(t: Tensor, name: str) -> None:
    bad = (t < 0) | (t > 1) | torch.isnan(t)
    if _on_device(t):
        torch._assert_async(
            bad.logical_not().all(),
            f"all elements of {name} should be between 0 and 1: binary_cross_entropy takes "
            "probabilities; for logits use binary_cross_entropy_with_logits.",
        )
        return
    if t.numel() and bool(bad.any()):
        value = float(t.detach()[bad].flatten()[0])
        raise RuntimeError(
            f"all elements of {name} should be between 0 and 1, found {value}: binary_cross_"
            "entropy takes probabilities; for logits use binary_cross_entropy_with_logits."
        )


_DTYPE_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int64: "Long",
    torch.int32: "Int",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
}


def _dtype(t: Tensor) -> str:
    """PyTorch's short dtype name, e.g. ``Float`` or ``Long``, as in its own messages."""
    return _DTYPE_NAMES.get(t.dtype, str(t.dtype))


def check_target_dtype(input: Tensor, target: Tensor, function: str, exact: bool) -> None:
    """Binary targets are floating point; ``binary_cross_entropy`` also wants the input's dtype."""
    if not target.is_floating_point() or (exact and target.dtype != input.dtype):
        want = _dtype(input) if exact else "a floating dtype"
        raise RuntimeError(
            f"Found dtype {_dtype(target)} but expected {want} for target in {function}: "
            f"targets are probabilities in [0, 1]; pass target.to(input.dtype)."
        )


def check_linear(input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None) -> None:
    """Shapes and dtypes of ``linear_cross_entropy``'s hidden states, classifier and targets."""
    check_floating_input(input)
    if input.dim() < 1 or weight.dim() != 2 or input.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"input (..., D) and weight (V, D) must share D: got input {tuple(input.shape)} and "
            f"weight {tuple(weight.shape)}; weight is laid out as nn.Linear(D, V).weight "
            "(pass lm_head.weight, not its transpose)."
        )
    if weight.dtype != input.dtype:
        raise RuntimeError(
            f"weight dtype {_dtype(weight)} must match input dtype {_dtype(input)}: pass "
            "weight.to(input.dtype) or run both under the same autocast."
        )
    if bias is not None and (bias.shape != weight.shape[:1] or bias.dtype != input.dtype):
        raise RuntimeError(
            f"bias must have shape ({weight.shape[0]},) and dtype {_dtype(input)}, got shape "
            f"{tuple(bias.shape)} and dtype {_dtype(bias)}."
        )
    if target.shape != input.shape[:-1]:
        raise ValueError(
            f"Expected target of shape {tuple(input.shape[:-1])} (input's shape without D), got "
            f"{tuple(target.shape)}."
        )
    if target.dtype not in (torch.long, torch.uint8):
        raise RuntimeError(
            f"expected target dtype to be Long or Byte, but got {_dtype(target)}: pass "
            "target.long() (class indices)."
        )


def check_dim(input: Tensor, dim: int) -> None:
    ndim = max(input.dim(), 1)
    if not -ndim <= dim < ndim:
        raise IndexError(
            f"Dimension out of range: dim={dim} for an input with {input.dim()} dimensions "
            f"(shape {tuple(input.shape)}); expected dim in [{-ndim}, {ndim - 1}]."
        )


def check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(
            f"chunk_size must be a positive int (tokens per chunk) or None (chosen from V and "
            f"D), got {chunk_size!r}."
        )


def check_filter_eps(
    filter_eps: float | None, reduction: str, label_smoothing: float, backend: str
) -> None:
    """Gradient filtering's options: a non-negative ``filter_eps`` on the chunked backend (the
    one that computes its backward products itself, ``backend`` the one resolved) with a
    reduction over the tokens and no label smoothing (whose gradient spreads ``eps / V`` over
    every class: filtering would drop it all)."""
    if filter_eps is None:
        return
    if isinstance(filter_eps, bool) or not isinstance(filter_eps, int | float):
        raise ValueError(f"filter_eps must be a float >= 0 or None, got {filter_eps!r}.")
    if not 0.0 <= filter_eps < math.inf:
        raise ValueError(
            f"filter_eps must be a float >= 0 (e.g. 2**-12) or None (no filtering), got "
            f"{filter_eps!r}."
        )
    if backend != "chunked":
        raise ValueError(
            f"filter_eps (gradient filtering) runs on the chunked backend only, got backend "
            f"{backend!r}: pass backend='chunked' (and no class_weight that requires grad, "
            "which needs the reference), or filter_eps=None."
        )
    if reduction == "none":
        raise ValueError(
            "filter_eps (gradient filtering) needs reduction='mean' or 'sum': with "
            "reduction='none' each token's gradient scale is only known in the backward; "
            "reduce the loss or pass filter_eps=None."
        )
    if label_smoothing:
        raise ValueError(
            "filter_eps (gradient filtering) cannot be combined with label_smoothing: the "
            "smoothing term's gradient of label_smoothing / V on every class would be dropped; "
            "pass filter_eps=None or label_smoothing=0.0."
        )


def check_temperature(temperature: float) -> None:
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not (0.0 < temperature < float("inf"))
    ):
        raise ValueError(
            f"temperature must be a positive finite float (the logits are divided by it), got "
            f"{temperature!r}; 1.0 leaves the distribution as it is, and for greedy decoding "
            "take the argmax of the logits instead of a temperature of 0."
        )


def check_positive(name: str, value: float) -> None:
    """A positive finite float option (a scale, a softcap)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive finite float, got {value!r}.")


def _check_fraction(value: float, name: str, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a float in [0, 1] ({meaning}), got {value!r}.")


def check_distillation_options(beta: float, hard_weight: float, target: Tensor | None) -> None:
    """``beta`` and ``hard_weight`` of ``linear_distillation_loss``, and the target the hard
    term needs."""
    _check_fraction(
        beta,
        "beta",
        "0 is the forward KL(teacher || student), 1 the reverse KL(student || teacher), values "
        "in between the generalized Jensen-Shannon divergence; TRL's GKD default is 0.5",
    )
    _check_fraction(
        hard_weight,
        "hard_weight",
        "the weight of the cross entropy against target, the divergence getting "
        "1 - hard_weight; 0.0 turns the hard term off",
    )
    if hard_weight > 0 and target is None:
        raise ValueError(
            f"hard_weight={hard_weight} needs target (the labels of the hard cross-entropy "
            "term): pass target, with ignore_index where a token does not count, or "
            "hard_weight=0.0 for the divergence alone."
        )


def _check_head(input: Tensor, weight: Tensor, bias: Tensor | None, model: str) -> None:
    """One model's hidden states ``(..., D)``, head ``(V, D)`` and bias ``(V,)``."""
    names = f"{model}_input", f"{model}_weight", f"{model}_bias"
    check_floating_input(input, names[0])
    check_floating_input(weight, names[1])
    if input.dim() < 1 or weight.dim() != 2 or input.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{names[0]} (..., D) and {names[1]} (V, D) must share D: got {names[0]} "
            f"{tuple(input.shape)} and {names[1]} {tuple(weight.shape)}; the weight is laid "
            "out as nn.Linear(D, V).weight (pass lm_head.weight, not its transpose)."
        )
    if weight.dtype != input.dtype:
        raise RuntimeError(
            f"{names[1]} dtype {_dtype(weight)} must match {names[0]} dtype {_dtype(input)}: "
            f"pass {names[1]}.to({names[0]}.dtype) or run both under the same autocast."
        )
    if bias is not None and (bias.shape != weight.shape[:1] or bias.dtype != input.dtype):
        raise RuntimeError(
            f"{names[2]} must have shape ({weight.shape[0]},) and dtype {_dtype(input)}, got "
            f"shape {tuple(bias.shape)} and dtype {_dtype(bias)}."
        )


def check_distillation_heads(
    student_input: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    teacher_input: Tensor,
    teacher_weight: Tensor,
    teacher_bias: Tensor | None,
    target: Tensor | None,
) -> None:
    """Shapes and dtypes of ``linear_distillation_loss``'s two heads and targets: each model's
    own D, a shared vocabulary V, the same tokens."""
    _check_head(student_input, student_weight, student_bias, "student")
    _check_head(teacher_input, teacher_weight, teacher_bias, "teacher")
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(
            f"student_weight (V, D) and teacher_weight (V, D') must share the vocabulary V: got "
            f"{tuple(student_weight.shape)} and {tuple(teacher_weight.shape)}; both heads must "
            "score the same tokenizer's vocabulary (slice or pad the larger one to match)."
        )
    if teacher_input.shape[:-1] != student_input.shape[:-1]:
        raise ValueError(
            f"student_input and teacher_input must hold the same tokens: got leading shapes "
            f"{tuple(student_input.shape[:-1])} and {tuple(teacher_input.shape[:-1])}; pass the "
            "teacher's hidden states of the same batch (the same (B, T))."
        )
    if target is None:
        return
    if target.shape != student_input.shape[:-1]:
        raise ValueError(
            f"Expected target of shape {tuple(student_input.shape[:-1])} (student_input's shape "
            f"without D), got {tuple(target.shape)}."
        )
    if target.dtype not in (torch.long, torch.uint8):
        raise RuntimeError(
            f"expected target dtype to be Long or Byte, but got {_dtype(target)}: pass "
            "target.long() (class indices)."
        )


def is_dtensor(*tensors: Tensor | None) -> bool:
    """Whether any argument is a ``torch.distributed.tensor.DTensor`` (those run vocab-parallel
    over their device mesh, :mod:`xentkit.distributed`). A DTensor exists only once its module
    is imported, so this never imports it (seconds on a first call)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and any(isinstance(t, module.DTensor) for t in tensors)
