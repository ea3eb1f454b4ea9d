"""``torch.autocast``'s cast policy for the cross-entropy family, applied as torch applies it.

Under autocast torch runs some ops in float32 whatever their inputs: it casts their floating
arguments on the autocast device (float64 excepted) to float32 first, so they compute and
return float32. Which ops, per device type (torch's ``autocast_mode.cpp`` lists):

* CPU: ``nll_loss``, ``cross_entropy``, ``binary_cross_entropy`` and
  ``binary_cross_entropy_with_logits`` (``softmax`` and ``log_softmax`` are left alone);
* CUDA (and every other device type): the same losses and ``softmax``/``log_softmax`` (unless
  a ``dtype`` is given), while ``binary_cross_entropy`` raises: it is unsafe to autocast.

Matrix products (``F.linear``) run in the autocast dtype instead, which is what
:func:`xentkit.linear_cross_entropy` does with its head before it computes a float32 loss.

Example:
    >>> import torch
    >>> x = torch.randn(2, 3, dtype=torch.bfloat16)
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     float32("cross_entropy", x)[0].dtype, lower(torch.randn(2, 3))[0].dtype
    (torch.float32, torch.bfloat16)
"""

from __future__ import annotations

import torch
from torch import Tensor

_LOSSES = frozenset({"nll_loss", "cross_entropy", "binary_cross_entropy_with_logits"})
# The functions autocast runs in float32, by device type ("cpu", or any other).
FLOAT32 = {
    "cpu": _LOSSES | {"binary_cross_entropy"},
    "other": _LOSSES | {"softmax", "log_softmax"},
}


def enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` here."""
    return torch.is_autocast_enabled(device_type)


def _eligible(t: Tensor | None, device_type: str) -> bool:
    """Autocast casts floating tensors of its device only, and never float64 ones."""
    return (
        isinstance(t, Tensor)
        and t.is_floating_point()
        and t.device.type == device_type
        and t.dtype != torch.float64
    )


def _device_type(tensors: tuple[Tensor | None, ...]) -> str | None:
    """The device type of the first tensor (None when there is none: nothing to cast)."""
    return next((t.device.type for t in tensors if isinstance(t, Tensor)), None)


def float32(function: str, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """``tensors`` as torch's ``function`` sees them under autocast: cast to float32 when autocast
    is on for their device and runs ``function`` in float32; unchanged otherwise.

    Raises ``RuntimeError`` for ``binary_cross_entropy`` under a non-CPU autocast, as torch does.
    """
    device_type = _device_type(tensors)
    if device_type is None or not enabled(device_type):
        return tensors
    if function == "binary_cross_entropy" and device_type != "cpu":
        raise RuntimeError(
            "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to "
            "autocast. Many models use a sigmoid layer right before the binary cross entropy "
            "layer. In this case, combine the two layers using "
            "torch.nn.functional.binary_cross_entropy_with_logits or torch.nn.BCEWithLogitsLoss. "
            "binary_cross_entropy_with_logits and BCEWithLogits are safe to autocast."
        )
    if function not in FLOAT32.get(device_type, FLOAT32["other"]):
        return tensors
    return tuple(t.float() if _eligible(t, device_type) else t for t in tensors)


def lower(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """``tensors`` as ``F.linear`` sees them under autocast: cast to the autocast dtype when
    autocast is on for their device; unchanged otherwise."""
    device_type = _device_type(tensors)
    if device_type is None or not enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if _eligible(t, device_type) else t for t in tensors)


def loss_dtype(input: Tensor) -> torch.dtype:
    """The dtype of a loss computed from ``input`` (logits, or hidden states that make them):
    float32 under autocast, whose policy runs the losses in float32; ``input``'s otherwise."""
    return torch.float32 if enabled(input.device.type) else input.dtype
