"""Suite ``explain``: ``xentkit.explain`` of a language-model batch, against one forward of
``torch.nn.functional.cross_entropy`` on the same ``(N, V)`` logits (the floor: the least that
reads the logits to compute the loss). The target: explain within 15x the floor.

Providers:

- ``xentkit``: ``xentkit.explain(logits, target)``: the value, every position's terms, the
  batch statistics, the worst positions' table and the findings;
- ``torch``: ``F.cross_entropy(logits, target)``, forward only (no gradient is asked).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import xentkit
from benchmarks.harness import Bench, Shape, Suite, split_backend


def case_label(shape: Shape) -> str:
    """``N=2048 V=32000``: the hidden size plays no part."""
    return f"N={shape.n} V={shape.v}"


def build(provider: str, shape: Shape, dtype: torch.dtype, compile_backend: str) -> Bench:
    """Random logits and targets, and the step of ``provider`` on them."""
    name, _ = split_backend(provider)
    logits = torch.randn(shape.n, shape.v, dtype=dtype)
    target = torch.randint(shape.v, (shape.n,))
    inputs_bytes = logits.nbytes + target.nbytes
    if name == "xentkit":
        return Bench(lambda: xentkit.explain(logits, target), inputs_bytes)
    if name == "torch":
        return Bench(lambda: F.cross_entropy(logits, target), inputs_bytes)
    raise ValueError(f"unknown provider {provider!r} for suite explain")


SUITE = Suite(
    name="explain",
    title="explain of an LM batch against one cross-entropy forward",
    function="cross_entropy",
    build=build,
    case_label=case_label,
    providers=("xentkit", "torch"),
    shapes=(Shape(2048, 1, 32000),),
    quick_shapes=(Shape(64, 1, 1000),),
    dtypes=("float32",),
    repeats=5,
    floor="torch",
    floor_text="one F.cross_entropy forward (no backward) of the same logits",
)
