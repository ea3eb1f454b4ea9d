"""What the numbers were measured on: CPU, cores, memory, versions, commit and date."""

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


def describe(info: dict) -> str:
    """One line for tables and RESULTS.md.

    Example:
        >>> describe({"cpu": "AMD EPYC", "cores": 2, "torch_threads": 2, "memory_gib": 23.5,
        ...           "torch": "2.13.0", "xentkit": "0.1.0", "date": "2025-01-01"})
        'AMD EPYC, 2 cores (2 torch threads), 23.5 GiB RAM, torch 2.13.0, xentkit 0.1.0, 2025-01-01'
    """
    return (
        f"{info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
        f"{info['memory_gib']} GiB RAM, torch {info['torch']}, xentkit {info['xentkit']}, "
        f"{info['date']}"
    )
