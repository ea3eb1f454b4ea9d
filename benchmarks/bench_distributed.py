"""Vocab-parallel fused linear cross entropy on 2 gloo processes against one process, on CPU.

Examples::

    python benchmarks/bench_distributed.py                 # N=2048 D=256 V=32768, float32
    python benchmarks/bench_distributed.py --quick         # tiny shapes: checks the script

Rows (forward + backward to the hidden states and the classifier, ``torch.autograd.grad``):

- ``torch``: ``F.cross_entropy(F.linear(h, W), target)`` in one process (all the cores);
- ``xentkit:chunked``: ``xentkit.linear_cross_entropy(h, W, target, backend="chunked")``, the
  fused single-process kernel, in one process (all the cores);
- ``xentkit vocab-parallel``: ``xentkit.linear_cross_entropy(h, W_r, target,
  process_group=group)`` on ``R`` gloo processes, each holding ``V / R`` rows of ``W`` and
  the cores split between them, so every row uses the same hardware.

Each row runs in fresh processes: a warm-up call, one call under
:func:`benchmarks.memory.measure_peak` (the high-water mark ``VmHWM`` reset through
``/proc/self/clear_refs``, minus the resident size before the call: the extra memory of a step
over its inputs, per rank), then ``--repeats`` timed calls, the ranks released together by a
barrier; a step's time is its slowest rank's. The collectives of one step are counted by
wrapping ``torch.distributed``'s, and their bytes compared with the formula (bytes sent per
rank, ring algorithms, ``k = 2`` statistics per row, 3 with label smoothing)::

    (R - 1) * (18 * 8 + N * k * 4)  +  2 * (R - 1) / R * N * D * s

(the check, one all-gather of per-row statistics, the all-reduce of the ``N x D`` gradient of
the hidden states in their dtype of ``s`` bytes): linear in ``N``, not a function of ``V``,
and tending to ``2 N D s`` as ``R`` grows. Results go to ``benchmarks/results/distributed.json``
first, then a table is printed from them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, only ``benchmarks/`` is on the path; the spawned ranks import this file too.
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import xentkit  # noqa: E402
from benchmarks import memory  # noqa: E402
from benchmarks.harness import summarize  # noqa: E402
from benchmarks.machine import describe, machine_info  # noqa: E402

MIB = 2**20
CHECK_BYTES = 18 * 8  # the int64 report each rank shares before the statistics
PROVIDERS = ("torch", "xentkit:chunked", "xentkit vocab-parallel")


def comm_bytes(n: int, d: int, ranks: int, elem: int = 4, stats: int = 2) -> float:
    """Bytes each rank sends per step under ring algorithms (the module docstring's formula).

    Example:
        >>> comm_bytes(2048, 256, 2)
        2113680.0
    """
    gathers = (ranks - 1) * (CHECK_BYTES + n * stats * 4)
    return gathers + 2 * (ranks - 1) / ranks * n * d * elem


class _Counter:
    """Counts the collectives ``torch.distributed`` runs (and their bytes) while ``on``."""

    def __init__(self):
        self.on, self.calls, self.payload, self.sent = False, [], 0, 0.0
        self._gather, self._reduce = dist.all_gather, dist.all_reduce

    def install(self) -> None:
        def all_gather(parts, tensor, *args, **kwargs):
            if self.on:
                self._count("all_gather", tensor.nbytes, (len(parts) - 1) * tensor.nbytes)
            return self._gather(parts, tensor, *args, **kwargs)

        def all_reduce(tensor, *args, **kwargs):
            if self.on:
                ranks = dist.get_world_size(kwargs.get("group"))
                self._count("all_reduce", tensor.nbytes, 2 * (ranks - 1) / ranks * tensor.nbytes)
            return self._reduce(tensor, *args, **kwargs)

        dist.all_gather, dist.all_reduce = all_gather, all_reduce

    def _count(self, name: str, payload: int, sent: float) -> None:
        self.calls.append(f"{name} {payload} B")
        self.payload += payload
        self.sent += sent


def _inputs(n: int, d: int, v: int, rank: int, ranks: int):
    """The same hidden states, classifier and targets in every process; a rank keeps its rows."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) / d**0.5
    target = torch.randint(v, (n,), generator=g)
    rows = v // ranks
    weight = weight[rank * rows : (rank + 1) * rows].clone()
    return hidden.requires_grad_(), weight.requires_grad_(), target


def _step(provider: str, hidden, weight, target, group):
    if provider == "torch":
        loss = F.cross_entropy(F.linear(hidden, weight), target)
    elif provider == "xentkit:chunked":
        loss = xentkit.linear_cross_entropy(hidden, weight, target, backend="chunked")
    else:
        loss = xentkit.linear_cross_entropy(hidden, weight, target, process_group=group)
    return torch.autograd.grad(loss, (hidden, weight))


def _rank_main(rank: int, ranks: int, provider: str, args: dict, out: str) -> None:
    """One process of a row: measure, then write this rank's numbers to ``out``."""
    torch.set_num_threads(max(1, args["cores"] // ranks))
    group = None
    if provider == "xentkit vocab-parallel":
        dist.init_process_group(
            "gloo", init_method=f"file://{out}.store", rank=rank, world_size=ranks
        )
        group = dist.group.WORLD
    counter = _Counter()
    counter.install()
    hidden, weight, target = _inputs(args["n"], args["d"], args["v"], rank, ranks)
    inputs = hidden.nbytes + weight.nbytes + target.nbytes

    def step():
        if group is not None:
            dist.barrier()  # the ranks start together; a step lasts until its slowest rank
        start = time.perf_counter()
        grads = _step(provider, hidden, weight, target, group)
        elapsed = time.perf_counter() - start
        del grads
        return elapsed

    step()
    counter.on = True
    with memory.measure_peak() as peak:
        step()
    counter.on = False
    times = [step() for _ in range(args["repeats"])]
    result = {
        "rank": rank,
        "seconds": times,
        "inputs_mib": round(inputs / MIB, 1),
        "peak_mib": None if peak.extra is None else round(peak.extra / MIB, 1),
        "threads": torch.get_num_threads(),
        "collectives": counter.calls,
        "payload_bytes": counter.payload,
        "sent_bytes": counter.sent,
    }
    if group is not None:
        dist.destroy_process_group()
    Path(f"{out}.{rank}.json").write_text(json.dumps(result))


def run_row(provider: str, args: dict, tmp: str) -> dict:
    ranks = args["ranks"] if provider == "xentkit vocab-parallel" else 1
    out = os.path.join(tmp, provider.replace(" ", "_").replace(":", "_"))
    mp.spawn(_rank_main, args=(ranks, provider, args, out), nprocs=ranks, join=True)
    per_rank = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(ranks)]
    slowest = [max(step) for step in zip(*(r["seconds"] for r in per_rank), strict=True)]
    return {
        "provider": provider,
        "ranks": ranks,
        "threads_per_rank": per_rank[0]["threads"],
        **summarize(slowest),
        "repeats": len(slowest),
        "inputs_mib_per_rank": [r["inputs_mib"] for r in per_rank],
        "peak_mib_per_rank": [r["peak_mib"] for r in per_rank],
        "collectives_per_step": len(per_rank[0]["collectives"]),
        "collectives": per_rank[0]["collectives"],
        "payload_bytes_per_rank": per_rank[0]["payload_bytes"],
        "sent_bytes_per_rank": per_rank[0]["sent_bytes"],
    }


def growth(n: int, d: int) -> list[dict]:
    """The formula's bytes per rank and step for a few batch sizes and group sizes."""
    return [
        {"n": m, "d": d, "ranks": r, "mib": round(comm_bytes(m, d, r) / MIB, 2)}
        for m in (n, 4 * n, 16 * n)
        for r in (2, 4, 8)
    ]


def table(data: dict) -> str:
    shape = data["shape"]
    lines = [
        f"vocab-parallel linear cross entropy, N={shape['n']} D={shape['d']} V={shape['v']} "
        f"float32, forward + backward; {describe(data['machine'])}",
        "",
        "| provider | ranks x threads | median ms (p20-p80) | inputs MiB/rank | "
        "peak extra MiB/rank | collectives/step | bytes sent/rank (formula) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        sent = "-"
        if row["collectives_per_step"]:
            formula = comm_bytes(shape["n"], shape["d"], row["ranks"])
            sent = f"{row['sent_bytes_per_rank']:,.0f} ({formula:,.0f})"
        peaks = " / ".join(str(p) for p in row["peak_mib_per_rank"])
        lines.append(
            f"| {row['provider']} | {row['ranks']} x {row['threads_per_rank']} | "
            f"{row['median']:.0f} ({row['p20']:.0f}-{row['p80']:.0f}) | "
            f"{row['inputs_mib_per_rank'][0]} | {peaks} | {row['collectives_per_step']} | "
            f"{sent} |"
        )
    lines += ["", "bytes sent per rank and step (formula), D=" + str(shape["d"]) + ":", ""]
    lines += ["| N | R=2 | R=4 | R=8 |", "|---|---|---|---|"]
    for m in sorted({g["n"] for g in data["growth"]}):
        cells = [f"{g['mib']} MiB" for g in data["growth"] if g["n"] == m]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--v", type=int, default=32768)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="N=64 D=16 V=512, 1 repeat")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/distributed.json")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.n, opts.d, opts.v, opts.repeats = 64, 16, 512, 1
    if opts.v % opts.ranks:
        parser.error(f"--v {opts.v} must be a multiple of --ranks {opts.ranks}")
    args = {k: getattr(opts, k) for k in ("n", "d", "v", "ranks", "repeats", "cores")}
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_row(provider, args, tmp) for provider in PROVIDERS]
    data = {
        "machine": machine_info(),
        "shape": {"n": opts.n, "d": opts.d, "v": opts.v, "dtype": "float32"},
        "comm_formula": "(R-1)*(18*8 + N*k*4) + 2*(R-1)/R*N*D*s bytes sent per rank, k=2",
        "rows": rows,
        "growth": growth(opts.n, opts.d),
    }
    if not opts.quick:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(data, indent=1) + "\n")
    print(table(data))


if __name__ == "__main__":
    main()
