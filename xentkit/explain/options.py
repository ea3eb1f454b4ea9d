"""The losses :func:`xentkit.explain` knows, by every spelling, and each one's options."""

from __future__ import annotations

from typing import Any

# Accepted spellings of each loss (the CLI's short names included).
LOSSES = {
    "cross_entropy": "cross_entropy",
    "ce": "cross_entropy",
    "nll_loss": "nll_loss",
    "nll": "nll_loss",
    "binary_cross_entropy": "binary_cross_entropy",
    "bce": "binary_cross_entropy",
    "binary_cross_entropy_with_logits": "binary_cross_entropy_with_logits",
    "bce-logits": "binary_cross_entropy_with_logits",
}

# Each function's own options, with the defaults that keep PyTorch's behaviour.
OPTIONS: dict[str, dict[str, Any]] = {
    "cross_entropy": {
        "weight": None,
        "ignore_index": -100,
        "reduction": "mean",
        "label_smoothing": 0.0,
        "z_loss": 0.0,
        "softcap": None,
    },
    "nll_loss": {"weight": None, "ignore_index": -100, "reduction": "mean"},
    "binary_cross_entropy": {"weight": None, "reduction": "mean"},
    "binary_cross_entropy_with_logits": {"weight": None, "reduction": "mean", "pos_weight": None},
}
