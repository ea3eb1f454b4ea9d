"""The plain-text view: ``str(explanation)`` and ``xentkit explain`` outside a terminal."""

from __future__ import annotations

from typing import TYPE_CHECKING

from xentkit.explain.format import cell

if TYPE_CHECKING:
    from xentkit.explain.explanation import Explanation


def table(e: Explanation) -> list[str]:
    """The table's lines, columns padded to their widest cell."""
    cells = [e.columns] + [[cell(r.get(c), e.classes) for c in e.columns] for r in e.rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(e.columns))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def render(e: Explanation) -> str:
    """Summary, notes, statistics, table, reduction, value and findings."""
    lines = [e.summary, *e.notes]
    if e.stats is not None:
        lines += ["", "Stats:", *(f"  {line}" for line in e.stats.lines())]
    lines += ["", *table(e), *e.elided(), "", *e.footer()]
    if e.findings:
        lines += ["", "Findings:", *(f"- [{f.kind}] {f.message}" for f in e.findings)]
    return "\n".join(lines)
