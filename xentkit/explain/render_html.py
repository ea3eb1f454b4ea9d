"""The notebook view: a styled HTML table, no JavaScript. Colours are translucent over the
page's own background and text inherits the page's colour, so one stylesheet reads on light and
dark themes alike."""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING, Any

from xentkit.explain.format import TopClasses, cell, number

if TYPE_CHECKING:
    from xentkit.explain.explanation import Explanation

STYLE = """
.xentkit-explain { font-family: ui-monospace, SFMono-Regular, Menlo, monospace;
  font-size: 12px; color: inherit; }
.xentkit-explain table { border-collapse: collapse; margin: 6px 0; }
.xentkit-explain th { text-align: left; padding: 2px 8px;
  border-bottom: 1px solid rgba(128, 128, 128, 0.6); }
.xentkit-explain td { padding: 2px 8px; white-space: nowrap; vertical-align: top; }
.xentkit-explain tbody tr:nth-child(even) { background: rgba(128, 128, 128, 0.10); }
.xentkit-explain .target { background: rgba(46, 160, 67, 0.30); font-weight: bold;
  border-radius: 3px; padding: 0 2px; }
.xentkit-explain .loss { font-weight: bold; }
.xentkit-explain .dim { opacity: 0.7; }
.xentkit-explain .stats { margin: 4px 0; padding: 4px 8px; border-left: 3px solid
  rgba(56, 139, 253, 0.8); background: rgba(56, 139, 253, 0.10); }
.xentkit-explain .finding { margin: 4px 0; padding: 4px 8px; border-left: 3px solid
  rgba(210, 153, 34, 0.9); background: rgba(210, 153, 34, 0.14); }
.xentkit-explain code { font-weight: bold; }
"""


def _vector(values: list[float], target: Any) -> str:
    """A full vector, the target's entry highlighted."""
    parts = []
    for c, v in enumerate(values):
        text = escape(number(v))
        parts.append(f'<span class="target">{text}</span>' if c == target else text)
    return "[" + " ".join(parts) + "]"


def _top(value: TopClasses) -> str:
    cells = " ".join(
        f"{c}:{escape(number(v))}" for c, v in zip(value.classes, value.values, strict=True)
    )
    tail = f' <span class="dim">… +{value.hidden}</span>' if value.hidden > 0 else ""
    target = ""
    if value.target is not None and value.target_value is not None:
        target = (
            f' <span class="target">target {value.target}:{escape(number(value.target_value))}'
            f" (rank {value.target_rank})</span>"
        )
    return f"[{cells}{tail}]{target}"


def _cell(e: Explanation, row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if isinstance(value, TopClasses):
        return _top(value)
    if isinstance(value, list) and isinstance(row.get("target"), int):
        return _vector(value, row["target"])
    return escape(cell(value, e.classes))


def render(e: Explanation) -> str:
    """Summary, notes, statistics, the table, reduction and value, then the findings."""
    out = [f"<div class='xentkit-explain'><style>{STYLE}</style>"]
    out.append(f"<div><b>{escape(e.summary)}</b></div>")
    out += [f"<div class='dim'>{escape(n)}</div>" for n in e.notes]
    if e.stats is not None:
        out.append("<div class='stats'>" + "<br>".join(map(escape, e.stats.lines())) + "</div>")
    head = "".join(f"<th>{escape(c)}</th>" for c in e.columns)
    out.append(f"<table><thead><tr>{head}</tr></thead><tbody>")
    for row in e.rows:
        cells = "".join(
            f"<td class='{'loss' if c == 'loss' else 'term'}'>{_cell(e, row, c)}</td>"
            for c in e.columns
        )
        out.append(f"<tr>{cells}</tr>")
    out.append("</tbody></table>")
    out += [f"<div class='dim'>{escape(line)}</div>" for line in e.elided()]
    out += [f"<div>{escape(line)}</div>" for line in e.footer()]
    out += [
        f"<div class='finding'><code>{escape(f.kind)}</code>: {escape(f.message)}</div>"
        for f in e.findings
    ]
    out.append("</div>")
    return "\n".join(out)
