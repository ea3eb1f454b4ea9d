"""The README's code runs: the "In your training loop" block on two processes (torchrun)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(heading: str) -> str:
    """The first ```python block under ``heading``."""
    section = README.read_text().split(f"## {heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


@pytest.mark.distributed
@pytest.mark.transformers
def test_the_training_loop_block_runs_on_two_processes(tmp_path):
    pytest.importorskip("peft")
    script = tmp_path / "training_loop.py"
    script.write_text(_block("In your training loop"))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
    ]
    run = subprocess.run([*command, str(script)], capture_output=True, text=True, timeout=300)
    if run.returncode != 0 and "terminate called without an active exception" in run.stderr:
        # Seen once in five full runs on a loaded 2-core machine, a C++ abort in a rank's
        # process (no Python traceback; the same block then passed alone three times and in
        # the next full run): run it once more, and fail on any other error or a second abort.
        run = subprocess.run([*command, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]


def test_the_ten_lines_run():
    exec(compile(_block("Ten lines"), "README.md", "exec"), {})


def test_the_rl_log_probs_block_runs():
    namespace: dict = {}
    code = _block("Per-token log-probabilities for RL")
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["hidden"].grad.abs().sum() > 0


def test_the_statistics_block_runs():
    namespace: dict = {}
    exec(compile(_block("Statistics of the loss"), "README.md", "exec"), namespace)
    assert 0 <= float(namespace["stats"].accuracy) <= 1
