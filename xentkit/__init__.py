"""xentkit: the cross-entropy family for PyTorch, exact, explainable, fused and lean.

Example:
    >>> import torch, xentkit
    >>> logits = torch.tensor([[1.0, 0.5, 2.0], [0.5, 3.0, 1.0]])
    >>> xentkit.cross_entropy(logits, torch.tensor([2, 1]))
    tensor(0.3306)
"""

from xentkit import nn
from xentkit.explain import explain
from xentkit.functional import (
    binary_cross_entropy,
    binary_cross_entropy_with_logits,
    cross_entropy,
    linear_cross_entropy,
    linear_distillation_loss,
    linear_log_probs,
    log_softmax,
    nll_loss,
    softmax,
)
from xentkit.kernels._memory import empty_cache
from xentkit.reference import LossStats

__version__ = "0.1.0"

__all__ = [
    "LossStats",
    "__version__",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "empty_cache",
    "explain",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "linear_log_probs",
    "log_softmax",
    "nll_loss",
    "nn",
    "softmax",
]
