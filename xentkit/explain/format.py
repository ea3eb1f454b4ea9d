"""How numbers and cells read, shared by every renderer (text, markdown, HTML, rich, JSON)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TopClasses:
    """A vector cell of a position with more classes than are shown: the classes with the
    highest probability, in that order, and the target with its rank (0 = the most probable).

    Attributes:
        classes: the shown classes, most probable first.
        values: this column's value at each of them (a logit, a probability, a gradient).
        hidden: how many classes are left out.
        target: the target class (None for probability targets or an ignored position).
        target_value: this column's value at the target.
        target_rank: how many classes score strictly higher than the target.
    """

    classes: list[int]
    values: list[float]
    hidden: int
    target: int | None = None
    target_value: float | None = None
    target_rank: int | None = None

    def text(self) -> str:
        """``"2:0.6285 0:0.2312 … +5 | target 1:0.1402 (rank 2)"``."""
        cells = " ".join(f"{c}:{number(v)}" for c, v in zip(self.classes, self.values, strict=True))
        tail = f" … +{self.hidden}" if self.hidden > 0 else ""
        target = ""
        if self.target is not None and self.target_value is not None:
            target = f" | target {self.target}:{number(self.target_value)}"
            target += f" (rank {self.target_rank})"
        return cells + tail + target

    def to_dict(self) -> dict[str, Any]:
        return {
            "classes": self.classes,
            "values": [json_value(v) for v in self.values],
            "hidden": self.hidden,
            "target": self.target,
            "target_value": json_value(self.target_value),
            "target_rank": self.target_rank,
        }


def number(v: float) -> str:
    """Four decimals for ordinary magnitudes, scientific notation for tiny or huge ones.

    Example:
        >>> number(0.33056), number(-0.0), number(2.5e-7), number(float("-inf"))
        ('0.3306', '0.0000', '2.500e-07', '-inf')
    """
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    v += 0.0  # -0.0 (an ignored position's -w * 0) prints as 0.0000
    if v == 0 or 1e-3 <= abs(v) < 1e6:
        return f"{v:.4f}"
    return f"{v:.3e}"


def count(n: int, noun: str) -> str:
    """``"1 position"``, ``"2 positions"``."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def json_value(v: Any) -> Any:
    """Plain JSON types; non-finite numbers become ``"nan"``, ``"inf"``, ``"-inf"``."""
    if isinstance(v, TopClasses):
        return v.to_dict()
    if isinstance(v, list):
        return [json_value(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return number(v)
    return v


def cell(value: Any, classes: int | None) -> str:
    """A table cell as text; full vectors say how many of ``classes`` they leave out."""
    if value is None:
        return "—"
    if isinstance(value, TopClasses):
        return "[" + value.text() + "]"
    if isinstance(value, list):
        hidden = (classes or 0) - len(value)
        tail = f" … +{hidden}" if hidden > 0 else ""
        return "[" + " ".join(number(v) for v in value) + tail + "]"
    if isinstance(value, float):
        return number(value)
    return str(value)
