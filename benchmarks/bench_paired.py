"""xentkit's ``linear_cross_entropy`` against its floor, measured in alternation.

A shared 2-core VM has slow spells (other tenants, steal time) that last seconds to minutes,
longer than one row of the ``linear`` suites, which runs each provider in its own process one
after the other: a ratio of two rows can then say more about the spell than about the code.
Here the two steps of each shape, xentkit's forward + backward and the floor (the three matrix
products ``h @ W.T``, ``g @ W`` and ``g.T @ h`` into resident buffers,
:func:`benchmarks.bench_linear_cross_entropy.gemm_floor`), run in one process taking turns,
round after round, and each round gives one ratio: a spell slows both halves of a round alike.
Every step uses the same inputs, and the floor writes its logits over ``g`` as xentkit writes
its gradient over its logits (one ``N x V`` buffer, not two), so that N=8192, D=4096,
V=256000 fits a 24 GiB machine.
Reported per shape: the median ratio over the rounds and its spread (p20-p80), of wall time
and of the process's CPU time, with both medians in seconds; the ratio of the fastest rounds
(xentkit's fastest step over the floor's fastest, in either layout where both were timed), what
a step costs when no neighbour slows it; and every round's times.

``--chunk-sizes auto,1024,...`` adds xentkit with those tokens per chunk to the same rounds
(one row each; ``auto`` is the default choice), to measure what the chunk size trades;
``--providers torch,torch.compile,cce`` adds the peers, each row then also giving the median
per-round ratio of xentkit's time to the peer's (one process holds every provider's inputs,
so a peer that runs out of memory ends the run: pick shapes that fit).

``--parts`` adds, instead, where xentkit's time over the floor goes, each part a step of its
own in the same rounds (:data:`PARTS`): the three products in xentkit's automatic chunks into
resident buffers and its row pass over those chunks, whose ratios to the floor add up to about
xentkit's; and the page faults of a fresh float32 weight gradient, which xentkit would pay on
top were its gradient's mapping not kept between calls
(:func:`xentkit.kernels._memory.cached_empty`).

``--min-seconds S`` adds rounds to the shapes whose ``R`` rounds would take under ``S``
seconds (the short ones, where a slow spell weighs most on few rounds). ``--update`` keeps the
rows of the last run of the same kind and replaces those of the shapes it measures (its
command is recorded after that run's), to measure some shapes of a long run again.

``python -m benchmarks.bench_paired [--shapes NxDxV,...] [--rounds R] [--min-seconds S]
[--chunk-sizes ...] [--providers ... | --parts]``
writes ``benchmarks/results/paired.{json,png,md}`` (``paired_peers.*`` with ``--providers``,
``paired_parts.*`` with ``--parts``; the markdown goes into RESULTS.md as it is), after every
shape; ``--quick`` runs tiny shapes into ``benchmarks/results-quick`` instead.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import bench_linear_cross_entropy as linear
from benchmarks.harness import Shape, Skip
from benchmarks.machine import describe, kept_rows_lines, machine_info
from benchmarks.run import DEFAULT_OUT, QUICK_OUT, _shapes, write_section
from xentkit.kernels import chunked, linear_chunked

# The step of the floor with its logits laid out vocabulary-major (``--vocab-major-floor``).
VOCAB_MAJOR = "floor V x N"

SHAPES = [Shape(2048, d, v) for d in (512, 1024) for v in (32768, 128256, 256000)]
QUICK_SHAPES = [Shape(64, 32, 256), Shape(37, 24, 1000)]


PARTS = {
    "products in chunks": "the three products in xentkit's automatic chunks, into resident "
    "buffers (the weight gradient accumulated chunk by chunk; the logits from the weight packed "
    "once, as xentkit computes them)",
    "row pass": "the row kernel over those chunks, each gradient written over its logits",
    "weight-gradient page faults": "a fresh float32 V x D tensor, one element per 4 KiB page "
    "written: what a fresh weight gradient costs, which xentkit's kept mapping saves",
}


def _part(
    name: str, shape: Shape, inputs: tuple[torch.Tensor, ...], g: torch.Tensor
) -> Callable[[], object]:
    """The step of one of :data:`PARTS` on the round's float32 ``inputs`` (hidden states,
    weight, targets) and the floor's ``N x V`` gradient ``g``."""
    h, w, target = (t.detach() for t in inputs)
    if name == "weight-gradient page faults":
        return lambda: torch.empty(shape.v, shape.d).view(-1)[::1024].zero_()
    problem = linear_chunked.Problem(h, w, target, None, None, -100, 0.0, 0.0, None, None)
    if name == "row pass":
        buffer = torch.mm(h[: problem.rows], w.T)  # resident, and real logits

        def rows() -> None:
            for _, _, chunk_target in problem.chunks():
                logits = buffer[: len(chunk_target)]
                chunked.loss_and_grad(
                    logits, chunk_target, None, -100, 0.0, 0.0, None, 1.0, out=logits
                )

        return rows
    grad_h, grad_w = torch.zeros(shape.n, shape.d), torch.zeros(shape.v, shape.d)

    def products() -> None:
        with problem.workspace() as logits:  # and the weight packed as xentkit packs it
            for where, chunk_h, _ in problem.chunks():
                problem.logits(chunk_h, logits)
                torch.mm(g[where], w, out=grad_h[where])
                if where.start == 0:
                    torch.mm(g[where].T, chunk_h, out=grad_w)
                else:
                    grad_w.addmm_(g[where].T, chunk_h)

    return products


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    """Median, p20 and p80."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    cuts = statistics.quantiles(values, n=10, method="inclusive")
    return statistics.median(values), cuts[1], cuts[7]


def measure(
    shape: Shape,
    rounds: int,
    chunk_sizes: list[int | None],
    peers: list[str],
    min_seconds: float = 0.0,
    vocab_major_floor: bool = False,
) -> list[dict]:
    """``rounds`` turns of xentkit (once per chunk size), each peer (or part of
    :data:`PARTS`), then the floor, after one warm-up turn, and more turns until they have
    taken ``min_seconds``: one row of per-round ratios to the floor per step; a peer's row
    also has the per-round ratio of xentkit (its first chunk size) to it. With
    ``vocab_major_floor`` the floor is also measured with its logits laid out ``V x N``, and
    each round's floor is the faster of the two layouts."""
    variants = [("xentkit", chunk) for chunk in chunk_sizes] + [(peer, None) for peer in peers]
    inputs = linear.random_inputs(shape, torch.float32)
    g = torch.randn(shape.n, shape.v)
    steps = {}
    for k, (provider, chunk) in enumerate(variants):
        if provider in PARTS:
            steps[k] = _part(provider, shape, inputs, g)
            continue
        try:
            steps[k] = linear.build(provider, shape, torch.float32, "inductor", chunk, inputs).step
        except Skip as why:
            print(f"{provider} left out: {why}", flush=True)
    h, w, _ = inputs
    h, w = h.detach(), w.detach()
    grads = torch.zeros_like(h), torch.zeros_like(w)  # shared by both floors
    steps["floor"] = linear.gemm_floor(g, h, w, logits_over_g=True, grads=grads)
    if vocab_major_floor:
        steps[VOCAB_MAJOR] = linear.gemm_floor(
            g, h, w, logits_over_g=True, vocab_major=True, grads=grads
        )
    wall: dict = {name: [] for name in steps}
    cpu: dict = {name: [] for name in steps}

    def turn(record: bool) -> float:
        start = time.perf_counter()
        for name, step in steps.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            step()
            if record:
                wall[name].append(time.perf_counter() - start_wall)
                cpu[name].append(time.process_time() - start_cpu)
        return time.perf_counter() - start

    turn(record=False)
    spent = sum(turn(record=True) for _ in range(rounds))
    while spent < min_seconds:
        spent += turn(record=True)
    layouts = {}
    if vocab_major_floor:
        for clock, times in (("wall", wall), ("cpu", cpu)):
            layouts[clock] = {"N x V": statistics.median(times["floor"])}
            layouts[clock]["V x N"] = statistics.median(times[VOCAB_MAJOR])
            # Each round's floor: the faster layout's.
            times["floor"] = list(map(min, times["floor"], times[VOCAB_MAJOR]))
    rows = []
    for k, (provider, chunk) in enumerate(variants):
        if k not in steps:
            continue
        row = {"case": linear.case_label(shape), "n": shape.n, "d": shape.d, "v": shape.v}
        row["provider"] = provider
        row["chunk_size"] = "auto" if chunk is None else chunk
        row["rounds"] = len(wall[k])
        for clock, times in (("wall", wall), ("cpu", cpu)):
            median, p20, p80 = _quantiles(_ratios(times[k], times["floor"]))
            row[clock] = {
                "ratio": median,
                "p20": p20,
                "p80": p80,
                "fastest": min(times[k]) / min(times["floor"]),
                "time_s": statistics.median(times[k]),
                "floor_s": statistics.median(times["floor"]),
                "times_s": times[k],
                "floor_times_s": times["floor"],
            }
            if layouts:
                row[clock]["floor_layouts_s"] = layouts[clock]
            if provider != "xentkit" and provider not in PARTS:
                row[clock]["xentkit_ratio"] = statistics.median(_ratios(times[0], times[k]))
        rows.append(row)
    return rows


def _ratios(times: list[float], base: list[float]) -> list[float]:
    return [x / b for x, b in zip(times, base, strict=True)]


def _label(row: dict) -> str:
    """The case and provider, with xentkit's chunk size unless automatic."""
    label = f"{row['case']} {row['provider']}"
    return label if row["chunk_size"] == "auto" else f"{label} chunk={row['chunk_size']}"


def markdown(data: dict, image: str) -> str:
    lines = [
        "## Linear cross entropy against its floor, in alternation (float32)",
        "",
        f"- command: `{data['command']}`",
        f"- machine: {describe(data['machine'])}",
        *kept_rows_lines(data),
        f"- floor: {linear.FLOOR_TEXT}; where its cell names two layouts "
        "(`--vocab-major-floor`), the products were also timed with the logits and their "
        "gradient laid out V x N, and each round's floor is the faster layout's",
        f"- {data['rounds']} rounds per shape after a warm-up (more where they would take "
        f"under {data.get('min_seconds', 0):g} s: the rounds column), xentkit, its peers and the "
        "floor taking turns in one process; each ratio is the median of the per-round ratios "
        "(p20–p80 beside it); \"fastest\" is the fastest round's time over the floor's "
        "fastest; a peer's last column is xentkit's time over the peer's",
        *(f"- {name}: {text}" for name, text in PARTS.items() if data.get("parts")),
        "",
        "| case | rounds | time | floor | × floor (wall) | p20–p80 | fastest | × floor (CPU time) "
        "| p20–p80 | xentkit ÷ this (wall) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in data["rows"]:
        wall, cpu = row["wall"], row["cpu"]
        versus = f"{wall['xentkit_ratio']:.3f}×" if "xentkit_ratio" in wall else "—"
        fastest = f"{wall['fastest']:.3f}×" if "fastest" in wall else "—"
        layouts = ", ".join(f"{k} {t:.2f} s" for k, t in wall.get("floor_layouts_s", {}).items())
        floor = f"{wall['floor_s']:.2f} s" + (f" ({layouts})" if layouts else "")
        lines.append(
            f"| {_label(row)} | {row['rounds']} | {wall['time_s']:.2f} s | {floor} | "
            f"{wall['ratio']:.3f}× | {wall['p20']:.3f}–{wall['p80']:.3f} | {fastest} | "
            f"{cpu['ratio']:.3f}× | {cpu['p20']:.3f}–{cpu['p80']:.3f} | {versus} |"
        )
    lines += ["", f"![paired ratios]({image})"]
    return "\n".join(lines)


def plot(data: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 4))
    for offset, clock in ((-0.2, "wall"), (0.2, "cpu")):
        x = [i + offset for i in range(len(rows))]
        y = [row[clock]["ratio"] for row in rows]
        low = [row[clock]["ratio"] - row[clock]["p20"] for row in rows]
        high = [row[clock]["p80"] - row[clock]["ratio"] for row in rows]
        ax.bar(x, y, width=0.4, yerr=[low, high], capsize=3, label=f"{clock} time")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.axhline(1.05, color="tab:red", linestyle=":", linewidth=1, label="1.05× (goal)")
    ax.set_xticks(range(len(rows)), [_label(row) for row in rows], rotation=20, fontsize=8)
    ax.set(ylabel="xentkit / floor (3 GEMMs)", title="linear_cross_entropy, paired rounds")
    ax.legend(fontsize=8)
    fig.suptitle(describe(data["machine"]), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _updating(path: Path, data: dict) -> dict:
    """``data`` holding the rows of the last run written to ``path`` (each with its number of
    rounds and the machine it ran on), its command that run's followed by this one's."""
    previous = json.loads(path.read_text())
    rows = [
        {"rounds": previous["rounds"], "machine": previous["machine"], **row}
        for row in previous["rows"]
    ]
    return {**data, "command": f"{previous['command']} && {data['command']}", "rows": rows}


def _replace(rows: list[dict], new: list[dict]) -> list[dict]:
    """``rows`` with those of ``new``'s case replaced by ``new`` (in the first one's place), or
    ``new`` added at the end."""
    if not new:
        return rows
    case = new[0]["case"]
    where = next((i for i, row in enumerate(rows) if row["case"] == case), len(rows))
    return [*rows[:where], *new, *(row for row in rows[where:] if row["case"] != case)]


def _chunk_sizes(text: str) -> list[int | None]:
    """``auto,1024`` -> ``[None, 1024]``."""
    return [None if part == "auto" else int(part) for part in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_paired")
    p.add_argument("--quick", action="store_true", help="tiny shapes, seconds")
    p.add_argument("--shapes", type=_shapes, help="comma-separated NxDxV")
    p.add_argument("--rounds", type=int, default=5, help="paired rounds per shape")
    p.add_argument(
        "--min-seconds",
        type=float,
        default=0.0,
        help="more rounds where the rounds of a shape would take less time than this",
    )
    p.add_argument(
        "--providers",
        type=lambda text: text.split(","),
        default=[],
        help="comma-separated peers to add to the rounds: torch, torch.compile, cce",
    )
    p.add_argument(
        "--parts",
        action="store_true",
        help="add where xentkit's time over the floor goes, each part a step of its own",
    )
    p.add_argument(
        "--chunk-sizes",
        type=_chunk_sizes,
        default=[None],
        help="comma-separated tokens per chunk of xentkit's rows, 'auto' for the default",
    )
    p.add_argument(
        "--vocab-major-floor",
        action="store_true",
        help="also time the floor with the logits laid out V x N; each round's floor is then "
        "the faster layout's",
    )
    p.add_argument(
        "--update",
        action="store_true",
        help="keep the rows of the suite's last run and replace those of the shapes measured now",
    )
    args = p.parse_args(arguments)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    rounds = 2 if args.quick else args.rounds
    out = QUICK_OUT if args.quick else DEFAULT_OUT
    if args.parts and args.providers:
        p.error("--parts and --providers are measured in runs of their own")
    suite = "paired_parts" if args.parts else "paired_peers" if args.providers else "paired"
    data = {
        "suite": suite,
        "command": shlex.join(["python", "-m", "benchmarks.bench_paired", *arguments]),
        "machine": machine_info(),
        "rounds": rounds,
        "min_seconds": args.min_seconds,
        "parts": args.parts,
        "rows": [],
    }
    if args.update:
        data = _updating(out / f"{suite}.json", data)
    others = list(PARTS) if args.parts else args.providers
    for k, shape in enumerate(shapes, 1):
        rows = measure(
            shape, rounds, args.chunk_sizes, others, args.min_seconds, args.vocab_major_floor
        )
        data["rows"] = _replace(data["rows"], rows)
        for row in rows:
            print(f"{_label(row)}: {row['wall']['ratio']:.3f}x the floor (wall)", flush=True)
        # Written after every shape: a run stopped part-way (the largest shape out of memory)
        # keeps the shapes it measured.
        last = k == len(shapes)
        write_section(out, data, plot, markdown, remake_report=last and not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
