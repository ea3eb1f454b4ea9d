"""The markdown view: :meth:`Explanation.to_markdown`, a notebook's ``_repr_markdown_`` and
``xentkit explain --format markdown``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from xentkit.explain.format import cell

if TYPE_CHECKING:
    from xentkit.explain.explanation import Explanation


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def render(e: Explanation) -> str:
    """A bold summary, the notes and statistics as lists, the table, the reduction and value,
    then the findings."""
    lines = [f"**{e.summary}**", ""]
    lines += [f"- {n}" for n in e.notes]
    if e.stats is not None:
        lines += ["", "**Stats**", "", *(f"- {line}" for line in e.stats.lines())]
    lines += ["", _row(e.columns), _row(["---"] * len(e.columns))]
    lines += [_row([cell(r.get(c), e.classes) for c in e.columns]) for r in e.rows]
    lines += ["", *(f"*{line}*" for line in e.elided())]
    lines += [f"{line}  " for line in e.footer()]
    if e.findings:
        lines += ["", "**Findings**", "", *(f"- `{f.kind}`: {f.message}" for f in e.findings)]
    return "\n".join(lines)
