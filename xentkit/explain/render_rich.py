"""The terminal view (``rich.print(explanation)``, ``xentkit explain`` on a terminal): a table
when it fits the terminal's width, one block per position when it does not."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rich import box
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from xentkit.explain.format import cell

if TYPE_CHECKING:
    from xentkit.explain.explanation import Explanation


def render(e: Explanation, console: Any, options: Any) -> Iterator[Any]:
    """The renderables of ``e``, for rich's ``__rich_console__`` protocol."""
    yield Text(e.summary, style="bold")
    yield from (Text(n, style="dim") for n in e.notes)
    if e.stats is not None:
        yield from (Text(line, style="cyan") for line in e.stats.lines())
    # Text, not str: rich would read "log p[target]" and vectors "[...]" as markup
    cells = [[Text(cell(r.get(c), e.classes)) for c in e.columns] for r in e.rows]
    headers = [Text(c) for c in e.columns]
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), show_edge=False)
    for header in headers:
        table.add_column(header, no_wrap=True)
    for row in cells:
        table.add_row(*row)
    unbounded = options.update_width(1 << 20)  # Measurement clamps to the width it is given
    if Measurement.get(console, unbounded, table).maximum <= options.max_width:
        yield table
    else:  # too wide for the terminal: each position as a column-name / value list
        for row in cells:
            block = Table.grid(padding=(0, 2))
            block.add_column(style="cyan", no_wrap=True)
            block.add_column()
            for name, value in zip(headers[1:], row[1:], strict=True):
                block.add_row(name, value)
            yield Text(str(row[0]), style="bold")
            yield block
    yield from (Text(line, style="dim") for line in e.elided())
    yield from (Text(line, style="bold") for line in e.footer())
    if e.findings:
        yield Text("Findings:", style="bold yellow")
        yield from (Text(f"- [{f.kind}] {f.message}", style="yellow") for f in e.findings)
