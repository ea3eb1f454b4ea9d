"""Tables made from the results JSON: rich tables on the terminal and ``RESULTS.md``.

Times are ratios to the same case's reference provider (torch eager) and floor (``× torch``,
``× floor``: lower is better, ``0.33×`` is three times faster); every cell comes from the JSON,
so the report can be regenerated at any time without running anything.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.harness import split_backend
from benchmarks.machine import describe, kept_rows_lines

SUITE_ORDER = (
    "ce", "linear", "linear_grid", "scale", "explain", "log_probs", "distill", "trl_log_probs",
    "trl_distill",
)  # fmt: skip
# The GPU suite's own runner (benchmarks/bench_gpu.py) writes its tables as markdown, which
# RESULTS.md takes as they are under this header.
GPU_MARKDOWN = "gpu.md"
# Sections the standalone runners write as markdown: benchmarks/bench_paired.py (linear cross
# entropy against its floor in alternation; with --providers, its peers too) and
# benchmarks/bench_grad_filter.py (gradient filtering on the trained tiny LM).
MARKDOWN_SECTIONS = ("paired.md", "paired_peers.md", "paired_parts.md", "grad_filter.md")
GPU_HEADER = (
    "## GPU (CUDA): xentkit against torch, torch.compile, Liger Kernel and Cut Cross-Entropy"
)
GPU_HEADER += """

- command: `bash benchmarks/gpu.sh` on one H100 or H200 (a venv with pinned torch 2.13.0,
  triton 3.7.1, liger-kernel 0.8.5 and cut-cross-entropy 25.1.1, then
  `python benchmarks/run.py --suite gpu`: bfloat16, N in {8192, 32768}, D=4096,
  V in {128256, 256000}; under 8 minutes by its FLOP-based time budget)"""
GPU_NOT_RUN = """Not measured yet: no GPU has been lent to a session since the suite was
written. Its dry run (`python benchmarks/bench_gpu.py --dry-run`: CPU, `TRITON_INTERPRET=1`,
N=32 D=32 V=512) runs every xentkit row (chunked with Triton rows, fused Triton, plain CE, in
place), torch eager, torch.compile and the floor, with loss within 7e-4 and gradients within
3.2e-3 (norm-wise) of torch's float32 softmax of the same bfloat16 logits, and records Liger
and CCE as "not installed" (`tests/test_bench_gpu.py`); its times are the interpreter's and
mean nothing."""
PEER_LABELS = {
    "torch": "torch eager",
    "torch.compile": "torch.compile",
    "cce": "CCE torch_compile",
    "floor": "floor",
    "floor-copy": "resident copy_",
    "pass-max": "max pass",
    "pass-exp": "exp pass",
}


def load(out: Path) -> list[dict]:
    """The results of every known suite found in ``out``, in suite order."""
    found = []
    for name in SUITE_ORDER:
        path = out / f"{name}.json"
        if path.exists():
            found.append(json.loads(path.read_text()))
    return found


def provider_label(row: dict) -> str:
    """``xentkit [chunked]``, ``xentkit inplace [chunked]``, ``torch eager``, ...

    Example:
        >>> provider_label({"provider": "xentkit-inplace", "backend": "chunked"})
        'xentkit inplace [chunked]'
    """
    name, _ = split_backend(row["provider"])
    if name.startswith("xentkit"):
        backend = f" [{row['backend']}]" if row.get("backend") else ""
        return name.replace("-", " ") + backend
    return PEER_LABELS.get(name, name)


def format_time(ms: float | None) -> str:
    """Milliseconds as a short human reading.

    Example:
        >>> format_time(0.01234), format_time(12.345), format_time(123456.0)
        ('0.0123 ms', '12.3 ms', '123.5 s')
    """
    if ms is None:
        return "—"
    if ms >= 10_000:
        return f"{ms / 1000:.1f} s"
    if ms >= 10:
        return f"{ms:.1f} ms"
    return f"{ms:.3g} ms"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "—"
    return f"{value / base:.2f}×"


def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}"


def _groups(rows: Iterable[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["case"], row["dtype"]), []).append(row)
    return groups


def _median(rows: list[dict], provider: str | None) -> float | None:
    for row in rows:
        if row["provider"] == provider and row["status"] == "ok":
            return row["median"]
    return None


def full_table(data: dict) -> tuple[list[str], list[list[str]]]:
    """Every row of a suite: time, spread, ratios, peak memory, first call and status."""
    reference, floor = data["reference"], data.get("floor")
    headers = ["case", "dtype", "provider", "time (median)", "p20–p80", f"× {reference}"]
    headers += ["× floor"] if floor else []
    headers += ["peak MiB", "first call", "status"]
    cells = []
    for (case, dtype), rows in _groups(data["rows"]).items():
        ref_ms, floor_ms = _median(rows, reference), _median(rows, floor)
        for row in rows:
            ok = row["status"] == "ok"
            spread = f"{format_time(row['p20'])} – {format_time(row['p80'])}" if ok else "—"
            line = [case, dtype, provider_label(row), format_time(row["median"]), spread]
            line += [_ratio(row["median"], ref_ms)]
            line += [_ratio(row["median"], floor_ms)] if floor else []
            first = "—" if row["first_call_s"] is None else f"{row['first_call_s']:.2f} s"
            line += [_mib(row["peak_mib"]), first, row["status"]]
            cells.append(line)
    return headers, cells


def headline_table(data: dict) -> tuple[list[str], list[list[str]]]:
    """xentkit's rows only: its time as a ratio of each peer's, its peak next to torch's."""
    peers = [p for p in data["providers"] if not p.startswith("xentkit")]
    headers = ["case", "dtype", "xentkit", "time"] + [f"× {PEER_LABELS.get(p, p)}" for p in peers]
    headers += ["peak MiB", "torch peak MiB"]
    cells = []
    for (case, dtype), rows in _groups(data["rows"]).items():
        torch_peak = next(
            (r["peak_mib"] for r in rows if r["provider"] == "torch" and r["status"] == "ok"), None
        )
        for row in rows:
            if not row["provider"].startswith("xentkit"):
                continue
            line = [case, dtype, provider_label(row), format_time(row["median"])]
            line += [_ratio(row["median"], _median(rows, peer)) for peer in peers]
            line += [_mib(row["peak_mib"]), _mib(torch_peak)]
            cells.append(line)
    return headers, cells


def _notes(data: dict) -> list[str]:
    """What the run left out, then one line per distinct reason a row did not finish."""
    seen: dict[str, None] = dict.fromkeys(data.get("notes", []))
    for row in data["rows"]:
        if row["status"] != "ok" and row.get("note"):
            seen[f"{row['provider']} {row['status']}: {row['note']}"] = None
    return list(seen)


def rich_table(data: dict) -> Table:
    """The full table of a suite for the terminal."""
    headers, cells = full_table(data)
    table = Table(title=data["title"], caption=describe(data["machine"]), title_justify="left")
    for header in headers:
        numeric = header.startswith(("time", "×", "peak", "first"))
        table.add_column(header, justify="right" if numeric else "left")
    for line in cells:
        style = None if line[-1] == "ok" else "red" if "OOM" in line[-1] else "yellow"
        table.add_row(*line, style=style)
    return table


def print_suite(data: dict, console: Console) -> None:
    """Prints a suite's table and its notes."""
    console.print(rich_table(data))
    for note in _notes(data):
        console.print(f"[yellow]note[/yellow] {note}")


def _markdown_table(headers: list[str], cells: list[list[str]]) -> str:
    right = [h.startswith(("time", "×", "peak", "first", "torch peak")) for h in headers]
    lines = ["| " + " | ".join(headers) + " |"]
    lines.append("|" + "|".join("---:" if r else "---" for r in right) + "|")
    for line in cells:
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |")
    return "\n".join(lines)


HOW_TO_READ = """\
Each row is one provider on one case, measured in its own forked process: a first call
(forward + backward; it includes any compilation: *first call*), a warm-up call whose peak
resident memory over the inputs is recorded (*peak MiB*: `VmHWM` after the call minus `VmRSS`
before it, with the high-water mark reset through `/proc/self/clear_refs`), then the timed
repeats: *time* is their median, *p20–p80* their spread. *× torch* and *× floor* divide the
time by torch eager's and by the floor's on the same case (lower is better: 0.33× is three
times faster). The scale suite runs each provider once, under an address-space cap, and
reports that call; `OOM` means an allocation failed under the cap."""


def markdown(results: list[dict], plots: dict[str, Path], report: Path) -> str:
    """``RESULTS.md``: for each suite its command, machine, headline, full table and plot."""
    parts = [
        "# xentkit benchmarks",
        "",
        "Generated by `benchmarks/run.py` from the JSON files next to the plots; do not edit by "
        "hand: rerun the command of a suite (`xentkit bench ARGS` is "
        "`python benchmarks/run.py ARGS`; `make bench` runs the full default suite).",
        "",
        HOW_TO_READ,
    ]
    for data in results:
        settings = data["settings"]
        parts += ["", f"## {data['title']}", ""]
        parts += [f"- command: `{data['command']}`"]
        parts += [f"- machine: {describe(data['machine'])}"]
        parts += kept_rows_lines(data)
        if data.get("floor_text"):
            parts += [f"- floor: {data['floor_text']}"]
        parts += [f"- repeats: {settings['repeats']}, warm-up calls: {settings['warmup']}"]
        if settings.get("mem_limit_gib") is not None:
            cap = settings["mem_limit_gib"]
            parts += [f"- address space of each provider's process capped at {cap} GiB"]
        parts += ["", "xentkit against each peer:", ""]
        parts += [_markdown_table(*headline_table(data)), "", "All rows:", ""]
        parts += [_markdown_table(*full_table(data))]
        notes = _notes(data)
        if notes:
            parts += [""] + [f"- {note}" for note in notes]
        if data["suite"] in plots:
            image = os.path.relpath(plots[data["suite"]], report.parent)
            parts += ["", f"![{data['title']}]({image})"]
    gpu = report.parent / "results" / GPU_MARKDOWN
    if gpu.parent.is_dir():  # the project's RESULTS.md beside results/, not a scratch report
        # Sections written as markdown by their own runners, taken as they are.
        for section in (gpu.parent / name for name in MARKDOWN_SECTIONS):
            if section.exists():
                parts += ["", section.read_text().strip()]
        parts += ["", GPU_HEADER, "", gpu.read_text().strip() if gpu.exists() else GPU_NOT_RUN]
    return "\n".join(parts) + "\n"
