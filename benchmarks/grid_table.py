"""The README's table of issue 10's grid, made from three runs' JSON: per shape, xentkit's time
over its floor measured in alternation (``paired.json``, :mod:`benchmarks.bench_paired`), and
xentkit's time over each peer's with everyone's extra memory, each provider in its own process
(``linear_grid.json``, ``python benchmarks/run.py --suite linear_grid``). Where a peer also
ran in alternation with xentkit (``paired_peers.json``, ``bench_paired --providers``), its
ratio comes from there, marked ``†``: one call per process says less on a VM with slow spells.
The floor ratio is the latest of the two paired runs' at each shape, and the last column names
the commit it was measured at. Where the floor was also timed with the logits laid out ``V x N``
(``--vocab-major-floor``), the floor is the faster layout's and its cell names that layout;
"× N x V floor" is then xentkit's median time over the median time of the floor in xentkit's
own layout (the floor ratio's median where only that layout was timed): a per-round minimum
over two layouts whose products take about as long is pulled down by the noise. "× floor,
fastest" is xentkit's fastest round over the floor's fastest in either layout (a step's cost
when no neighbour slows it; runs before the rounds' times were kept read ``—``). "× floor, CPU
time" is the median per-round ratio of the process's CPU time (both cores' busy time, which
leaves out the time the process waited, not running) over the faster floor's.

A cloud VM can be another host from one session to the next: ``--l3 MIB`` keeps only the rows
measured on a CPU whose L3 cache (as :func:`benchmarks.machine.cache_kib` recorded it) has that
size, so one table never mixes hosts' times. The extra memory is each provider's latest
measurement on any host: a peak of allocated memory does not depend on the host's speed.

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


def _machine(row: dict, data: dict) -> dict:
    """The machine (and commit, date) ``row`` was measured on: its own where an ``--update``
    run kept it, else its run's."""
    return row.get("machine", data.get("machine", {}))


def _rows(data: dict | None, l3_mib: float | None) -> list[tuple[dict, dict]]:
    """``data``'s rows, each with its :func:`_machine`; with ``l3_mib``, only those measured
    where the L3 was that many MiB."""
    if data is None:
        return []

    def l3(machine: dict) -> float | None:
        kib = machine.get("cache_kib", {}).get("L3")
        return None if kib is None else kib / 1024

    rows = [(row, _machine(row, data)) for row in data["rows"]]
    return [(row, m) for row, m in rows if l3_mib is None or l3(m) == l3_mib]


def _floor(wall: dict) -> str:
    """The floor's time, with its layout when both were timed."""
    layouts = wall.get("floor_layouts_s")
    text = _seconds(wall["floor_s"])
    return text if not layouts else f"{text} ({min(layouts, key=layouts.get)})"


def table(
    paired: dict | None,
    grid: dict | None,
    peers: dict | None = None,
    l3_mib: float | None = None,
) -> str:
    """The markdown table and, under it, the command of each run it is made from.

    Example:
        >>> paired = {"command": "P", "machine": {"commit": "abc1234", "date": "2026-12-03"},
        ...     "rows": [{"n": 1, "d": 2, "v": 3, "provider": "xentkit",
        ...     "chunk_size": "auto", "wall": {"ratio": 1.02, "p20": 1.01, "p80": 1.03,
        ...     "fastest": 1.015, "time_s": 1.02, "floor_s": 1.0}, "cpu": {"ratio": 1.01}}]}
        >>> grid = {"command": "G", "rows": [
        ...     {"n": 1, "d": 2, "v": 3, "provider": "xentkit", "status": "ok",
        ...      "median": 1000.0, "peak_mib": 10.0},
        ...     {"n": 1, "d": 2, "v": 3, "provider": "torch", "status": "OOM"}]}
        >>> peers = {"command": "Q", "rows": [{"n": 1, "d": 2, "v": 3, "provider": "cce",
        ...     "wall": {"xentkit_ratio": 0.9}}]}
        >>> print(table(paired, grid, peers))  # doctest: +NORMALIZE_WHITESPACE
        | N, D, V | xentkit | floor | × floor (p20–p80) | × N x V floor | × floor, fastest
          | × floor, CPU time | xentkit ÷ torch eager | xentkit ÷ torch.compile | xentkit ÷ CCE
          | extra MiB: xentkit / torch eager / torch.compile / CCE | code |
        |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|
        | 1, 2, 3 | 1.02 s | 1.00 s | 1.020× (1.010–1.030) | 1.020× | 1.015× | 1.010× | OOM | —
          | 0.900׆ | 10 / OOM / — / — | abc1234 |
        <BLANKLINE>
        × floor: `P`; the peers and memory: `G`; † in alternation (and × floor where measured
        later): `Q`
    """
    # Per shape, the latest floor ratio of xentkit's automatic chunks in either run.
    floor_rows: dict[tuple[int, int, int], tuple[dict, dict]] = {}  # shape: row, machine
    for row, machine in _rows(paired, l3_mib) + _rows(peers, l3_mib):
        if row["provider"] != "xentkit" or row["chunk_size"] != "auto":
            continue
        kept = floor_rows.get(_shape(row))
        if kept is None or machine.get("date", "") > kept[1].get("date", ""):
            floor_rows[_shape(row)] = row, machine
    alternating = {
        (_shape(row), row["provider"]): row["wall"]["xentkit_ratio"]
        for row, _ in _rows(peers, l3_mib)
        if "xentkit_ratio" in row["wall"]
    }
    grid_rows: dict[tuple[int, int, int], dict[str, dict]] = {}
    for row, _ in _rows(grid, l3_mib):
        grid_rows.setdefault(_shape(row), {})[row["provider"]] = row
    memory_rows: dict[tuple[int, int, int], dict[str, dict]] = {}
    for row, _ in _rows(grid, None):
        memory_rows.setdefault(_shape(row), {})[row["provider"]] = row
    names = " / ".join(["xentkit", *(PEER_NAMES[p] for p in PEERS)])
    lines = [
        "| N, D, V | xentkit | floor | × floor (p20–p80) | × N x V floor | × floor, fastest "
        "| × floor, CPU time | "
        + " | ".join(f"xentkit ÷ {PEER_NAMES[p]}" for p in PEERS)
        + f" | extra MiB: {names} | code |",
        "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * (len(PEERS) + 1) + "---|",
    ]
    for shape in sorted(floor_rows.keys() | grid_rows.keys() | {s for s, _ in alternating}):
        floor_row, machine = floor_rows.get(shape, (None, {}))
        cells = [", ".join(map(str, shape))]
        if floor_row is None:
            cells += ["—"] * 6
        else:
            wall, cpu = floor_row["wall"], floor_row.get("cpu")
            row_major = wall.get("floor_layouts_s", {}).get("N x V", wall["floor_s"])
            cells += [
                _seconds(wall["time_s"]),
                _floor(wall),
                f"{wall['ratio']:.3f}× ({wall['p20']:.3f}–{wall['p80']:.3f})",
                f"{wall['time_s'] / row_major:.3f}×",
                f"{wall['fastest']:.3f}×" if "fastest" in wall else "—",
                "—" if cpu is None else f"{cpu['ratio']:.3f}×",
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
            row = memory_rows.get(shape, {}).get(provider)
            ok = row is not None and row["status"] == "ok"
            memory.append(f"{row['peak_mib']:.0f}" if ok else row["status"] if row else "—")
        cells.append(" / ".join(memory))
        cells.append(machine.get("commit", "—"))
        lines.append("| " + " | ".join(cells) + " |")
    sources = []
    if paired:
        sources.append(f"× floor: `{paired['command']}`")
    if grid:
        sources.append(f"the peers and memory: `{grid['command']}`")
    if alternating:
        sources.append(f"† in alternation (and × floor where measured later): `{peers['command']}`")
    return "\n".join(lines) + "\n\n" + "; ".join(sources)


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.grid_table")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    p.add_argument(
        "--l3",
        type=float,
        help="only rows measured on a CPU whose L3 cache had this many MiB",
    )
    args = p.parse_args(argv)
    runs = ("paired.json", "linear_grid.json", "paired_peers.json")
    print(table(*(_load(args.out / name) for name in runs), l3_mib=args.l3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
