"""The GPU benchmark's dry run (``benchmarks/bench_gpu.py --dry-run``): on CPU, through
Triton's interpreter, on a tiny shape, it takes every code path of the GPU run (each
provider, the parity checks against torch, the JSON, the tables and the plot) and skips the
peers that need CUDA with a status instead of failing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the dry run runs xentkit's Triton kernels interpreted")

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"kind", "case", "n", "d", "v", "dtype", "provider", "status", "note"}
MEASURED_KEYS = {"median", "p20", "p80", "repeats", "first_call_s", "peak_mib", "extra_mib"}


def test_dry_run_writes_the_results(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    script = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--dry-run"]
    # About 30 s on a quiet 2-core machine; the margin is for a loaded one.
    done = subprocess.run(
        [*script, "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert {"suite", "command", "machine", "settings", "rows", "notes", "estimate_s"} <= set(data)
    assert data["settings"]["dry_run"] and data["machine"]["device"] == "cpu"
    # The time model puts the default GPU run well inside gpu.sh's 8 minutes.
    assert 0 < data["gpu_estimate_s"] < data["settings"]["budget_s"] < 480
    rows = {(row["kind"], row["provider"]): row for row in data["rows"]}
    for kind, provider in [("linear", "xentkit"), ("linear", "xentkit:triton"), ("ce", "xentkit")]:
        row = rows[kind, provider]
        assert set(row) >= ROW_KEYS | MEASURED_KEYS
        assert row["status"] == "ok", row["note"]
        # bfloat16 logits and gradients against torch's float32 softmax of the same logits
        assert row["loss_rel_err"] < 1e-2
        assert all(err < 5e-2 for err in row["grad_rel_err"].values())
    assert rows["linear", "xentkit"]["backend"] == "chunked, Triton rows"
    assert rows["linear", "xentkit:triton"]["backend"] == "triton"
    for kind in ("linear", "ce"):
        assert rows[kind, "torch"]["status"] == rows[kind, "torch.compile"]["status"] == "ok"
        assert rows[kind, "liger"]["status"] in ("not installed", "needs CUDA")
    assert rows["linear", "cce"]["status"] in ("not installed", "needs CUDA")
    assert rows["linear", "floor"]["status"] == "ok"
    table = (tmp_path / "gpu.md").read_text()
    assert "| case | provider | time |" in table and "dry run" in table
    assert (tmp_path / "gpu.png").stat().st_size > 0
