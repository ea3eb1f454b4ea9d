"""What the numbers were measured on: CPU, its caches, cores, memory, versions, commit and
date. A cloud VM's "Intel(R) Xeon(R) Processor" can be another host from one session to the
next (this project's has had a 504 MiB and a 105 MiB L3), so the cache sizes tell them apart."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

import xentkit
from benchmarks import memory

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_kib() -> dict[str, int]:
    """The size in KiB of one instance of each cache level (Linux ``/sys``), e.g.
    ``{"L1d": 48, "L1i": 32, "L2": 2048, "L3": 107520}``; empty where unknown."""
    sizes = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((index / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
        if size.endswith("K"):
            sizes[f"L{level}{suffix}"] = int(size[:-1])
    return sizes


def _commit() -> str | None:
    """The repository's commit, ``-dirty`` when the working tree has changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """A JSON-ready description of this machine and software."""
    total = memory.total_memory()
    return {
        "cpu": cpu_model(),
        "cache_kib": cache_kib(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "memory_gib": None if total is None else round(total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "xentkit": xentkit.__version__,
        "cut_cross_entropy": _version("cut-cross-entropy"),
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def kept_rows_lines(data: dict) -> list[str]:
    """The markdown line naming the machines of the rows an ``--update`` run kept from earlier
    runs (each such row carries its run's ``machine``); no line when every row is this run's.

    Example:
        >>> this = {"cpu": "B", "cores": 2, "torch_threads": 2, "memory_gib": 1, "torch": "t",
        ...         "xentkit": "x", "date": "d2"}
        >>> rows = [{"machine": {**this, "cpu": "A", "date": "d1"}}, {}]
        >>> kept_rows_lines({"machine": this, "rows": rows})[0][:60]
        '- rows kept from earlier runs (`--update`) were measured on:'
    """
    earlier = dict.fromkeys(describe(row["machine"]) for row in data["rows"] if "machine" in row)
    earlier.pop(describe(data["machine"]), None)
    if not earlier:
        return []
    return ["- rows kept from earlier runs (`--update`) were measured on: " + "; ".join(earlier)]


def describe(info: dict) -> str:
    """One line for tables and RESULTS.md.

    Example:
        >>> describe({"cpu": "AMD EPYC", "cores": 2, "torch_threads": 2, "memory_gib": 23.5,
        ...           "torch": "2.13.0", "xentkit": "0.1.0", "date": "2025-01-01"})
        'AMD EPYC, 2 cores (2 torch threads), 23.5 GiB RAM, torch 2.13.0, xentkit 0.1.0, 2025-01-01'
        >>> describe({"cpu": "Xeon", "cache_kib": {"L2": 2048, "L3": 107520}, "cores": 2,
        ...           "torch_threads": 2, "memory_gib": 23.5, "torch": "2.13.0",
        ...           "xentkit": "0.1.0", "date": "2025-01-01"})[:40]
        'Xeon (L3 105 MiB), 2 cores (2 torch thre'
    """
    l3 = info.get("cache_kib", {}).get("L3")
    cpu = info["cpu"] if l3 is None else f"{info['cpu']} (L3 {l3 / 1024:g} MiB)"
    return (
        f"{cpu}, {info['cores']} cores ({info['torch_threads']} torch threads), "
        f"{info['memory_gib']} GiB RAM, torch {info['torch']}, xentkit {info['xentkit']}, "
        f"{info['date']}"
    )
