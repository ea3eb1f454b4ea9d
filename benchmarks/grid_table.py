"""The README's table of issue 10's grid, made from three runs' JSON: per shape, xentkit's time
over its floor measured in alternation (``paired.json``, :mod:`benchmarks.bench_paired`), and
xentkit's time over each peer's with everyone's extra memory, each provider in its own process
(``linear_grid.json``, ``python benchmarks/run.py --suite linear_grid``). Where a peer also
ran in alternation with xentkit (``paired_peers.json``, ``bench_paired --providers``), its
ratio comes from there, marked ``†``: one call per process says less on a VM with slow spells.

``python -m benchmarks.grid_table [--out DIR]`` prints the markdown; nothing is measured. A
shape one run did not measure reads ``—``; a provider that ran out of memory ``OOM``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.run import DEFAULT_OUT

PEERS = ("torch", "torch.compile", "cce")
PEER_NAMES = {"torch": "torch eager", "torch.compile": "torch.compile", "cce": "CCE"}


def _shape(row: dict) -> tuple[int, int, int]:
    return row["n"], row["d"], row["v"]


def _seconds(value: float) -> str:
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


def table(paired: dict | None, grid: dict | None, peers: dict | None = None) -> str:
    """The markdown table and, under it, the command of each run it is made from.

    Example:
        >>> paired = {"command": "P", "rows": [{"n": 1, "d": 2, "v": 3, "provider": "xentkit",
        ...     "chunk_size": "auto", "wall": {"ratio": 1.02, "p20": 1.01, "p80": 1.03,
        ...     "time_s": 1.02, "floor_s": 1.0}}]}
        >>> grid = {"command": "G", "rows": [
        ...     {"n": 1, "d": 2, "v": 3, "provider": "xentkit", "status": "ok",
        ...      "median": 1000.0, "peak_mib": 10.0},
        ...     {"n": 1, "d": 2, "v": 3, "provider": "torch", "status": "OOM"}]}
        >>> peers = {"command": "Q", "rows": [{"n": 1, "d": 2, "v": 3, "provider": "cce",
        ...     "wall": {"xentkit_ratio": 0.9}}]}
        >>> print(table(paired, grid, peers))  # doctest: +NORMALIZE_WHITESPACE
        | N, D, V | xentkit | floor | × floor (p20–p80) | xentkit ÷ torch eager
          | xentkit ÷ torch.compile | xentkit ÷ CCE | extra MiB: xentkit / torch eager
          / torch.compile / CCE |
        |---|---:|---:|---:|---:|---:|---:|---:|
        | 1, 2, 3 | 1.02 s | 1.00 s | 1.020× (1.010–1.030) | OOM | — | 0.900׆ | 10 / OOM / — / — |
        <BLANKLINE>
        × floor: `P`; the peers and memory: `G`; † in alternation: `Q`
    """
    floor_rows = {
        _shape(row): row["wall"]
        for row in (paired or {}).get("rows", [])
        if row["provider"] == "xentkit" and row["chunk_size"] == "auto"
    }
    alternating = {
        (_shape(row), row["provider"]): row["wall"]["xentkit_ratio"]
        for row in (peers or {}).get("rows", [])
        if "xentkit_ratio" in row["wall"]
    }
    grid_rows: dict[tuple[int, int, int], dict[str, dict]] = {}
    for row in (grid or {}).get("rows", []):
        grid_rows.setdefault(_shape(row), {})[row["provider"]] = row
    names = " / ".join(["xentkit", *(PEER_NAMES[p] for p in PEERS)])
    lines = [
        "| N, D, V | xentkit | floor | × floor (p20–p80) | "
        + " | ".join(f"xentkit ÷ {PEER_NAMES[p]}" for p in PEERS)
        + f" | extra MiB: {names} |",
        "|---|---:|---:|---:|" + "---:|" * (len(PEERS) + 1),
    ]
    for shape in sorted(floor_rows.keys() | grid_rows.keys() | {s for s, _ in alternating}):
        wall = floor_rows.get(shape)
        cells = [", ".join(map(str, shape))]
        if wall is None:
            cells += ["—"] * 3
        else:
            cells += [
                _seconds(wall["time_s"]),
                _seconds(wall["floor_s"]),
                f"{wall['ratio']:.3f}× ({wall['p20']:.3f}–{wall['p80']:.3f})",
            ]
        rows = grid_rows.get(shape, {})
        ours = rows.get("xentkit", {})
        for peer in PEERS:
            row = rows.get(peer)
            if (shape, peer) in alternating:
                cells.append(f"{alternating[shape, peer]:.3f}׆")
            elif row is None or ours.get("status") != "ok":
                cells.append("—")
            elif row["status"] != "ok":
                cells.append(row["status"])
            else:
                cells.append(f"{ours['median'] / row['median']:.3f}×")
        memory = []
        for provider in ("xentkit", *PEERS):
            row = rows.get(provider)
            ok = row is not None and row["status"] == "ok"
            memory.append(f"{row['peak_mib']:.0f}" if ok else row["status"] if row else "—")
        cells.append(" / ".join(memory))
        lines.append("| " + " | ".join(cells) + " |")
    sources = []
    if paired:
        sources.append(f"× floor: `{paired['command']}`")
    if grid:
        sources.append(f"the peers and memory: `{grid['command']}`")
    if alternating:
        sources.append(f"† in alternation: `{peers['command']}`")
    return "\n".join(lines) + "\n\n" + "; ".join(sources)


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.grid_table")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    args = p.parse_args(argv)
    runs = ("paired.json", "linear_grid.json", "paired_peers.json")
    print(table(*(_load(args.out / name) for name in runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
