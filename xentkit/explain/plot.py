"""The picture of an explanation: :meth:`Explanation.plot`. matplotlib is optional
(``pip install 'xentkit[plot]'``); the figure is a bare ``matplotlib.figure.Figure``, never
registered with pyplot, so it neither shows twice in a notebook nor leaks between calls."""

from __future__ import annotations

import math
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from xentkit.explain.format import number

if TYPE_CHECKING:
    from xentkit.explain.explanation import Explanation

TARGET, OTHER = "#2ea043", "#8c959f"  # green for the target, grey for the other classes


def _figure(**kwargs: Any) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "Explanation.plot() needs matplotlib: pip install 'xentkit[plot]' (or pip install "
            "matplotlib)."
        ) from error
    return Figure(**kwargs)


def plot(e: Explanation, max_positions: int = 8) -> Any:
    """Softmax bars per position when every position is in the table and its vectors are full;
    otherwise the distributions of the per-position loss and of the target's rank."""
    bars = [r for r in e.rows if isinstance(r.get("softmax", r.get("probs")), list) and e.classes]
    if e.order == "all" and bars and len(e.rows) <= max_positions:
        return _bars(e)
    return _histograms(e)


def _bars(e: Explanation) -> Any:
    column = "softmax" if "softmax" in e.columns else "probs"
    n = len(e.rows)
    figure = _figure(figsize=(min(3.2 * n, 13), 2.8), layout="constrained")
    axes = figure.subplots(1, n, squeeze=False)[0]
    for ax, row in zip(axes, e.rows, strict=True):
        probs, target = row[column], row.get("target")
        colors = [TARGET if c == target else OTHER for c in range(len(probs))]
        ax.bar(range(len(probs)), probs, color=colors)
        ax.set_ylim(0, 1)
        ax.set_xticks(range(len(probs)))
        ax.set_xlabel("class")
        ax.set_title(f"{row['position']}: target {target}\nloss {number(row['loss'])}", fontsize=9)
    axes[0].set_ylabel(column)
    figure.suptitle(f"{e.loss} = {e.value_text()}", fontsize=10)
    return figure


def _histograms(e: Explanation) -> Any:
    ranks = e.ranks
    panels = 2 if ranks is not None and ranks.numel() else 1
    figure = _figure(figsize=(5.5 * panels, 3.4), layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False)[0]
    losses = e.losses.detach().double()
    losses = losses[losses.isfinite()]
    axes[0].hist(losses.numpy(), bins=50, color=OTHER)
    axes[0].set_xlabel("loss per position")
    axes[0].set_ylabel("positions")
    if e.classes:  # the binary losses have no C; ln 2 is their coin flip
        uniform, label = math.log(e.classes), f"ln C = {number(math.log(e.classes))}"
    else:
        uniform, label = math.log(2), f"ln 2 = {number(math.log(2))}"
    axes[0].axvline(uniform, color="#d29922", ls="--", label=f"uniform guess: {label}")
    axes[0].axvline(
        float(losses.mean()), color=TARGET, label=f"mean {number(float(losses.mean()))}"
    )
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"{e.loss}: {e.positions} positions", fontsize=9)
    if panels == 2:
        top = int(ranks.max()) + 1
        edges = [0, 1, 2, 5, 10, 100, 1000, 10000, 100000, math.inf]
        edges = [b for b in edges if b < top] + [top]
        counts = [int(((ranks >= lo) & (ranks < hi)).sum()) for lo, hi in pairwise(edges)]
        labels = [str(lo) if hi - lo == 1 else f"{lo}–{hi - 1}" for lo, hi in pairwise(edges)]
        axes[1].bar(range(len(counts)), counts, color=TARGET)
        axes[1].set_xticks(range(len(counts)), labels, rotation=30, fontsize=8)
        axes[1].set_xlabel("target rank (0 = the most probable class)")
        axes[1].set_ylabel("positions")
        axes[1].set_title("where the target ranks", fontsize=9)
    return figure
