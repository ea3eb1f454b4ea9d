"""The benchmark harness (``benchmarks/``): protocol, failure handling, command line, reports,
and one end-to-end ``--quick`` run at tiny shapes. Numbers are never asserted: speed is
measured by the benchmarks themselves, not by tests."""

import dataclasses
import doctest
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` (unlike `python -m pytest`) leaves the root off the path
    sys.path.insert(0, str(ROOT))

from benchmarks import (  # noqa: E402
    bench_cross_entropy,
    bench_linear_cross_entropy,
    grid_table,
    harness,
    machine,
    memory,
    plot,
    report,
    run,
)
from benchmarks.harness import Bench, Job, Shape, Skip, Suite  # noqa: E402


@pytest.mark.parametrize(
    "module", [grid_table, harness, machine, memory, report, run], ids=lambda m: m.__name__
)
def test_doctests(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("text", ["4096x32768", "4096x1024xV", "0x1x2", ""])
def test_shape_parse_rejects_with_the_format(text):
    with pytest.raises(ValueError, match=r"4096x1024x32768|at least 1"):
        Shape.parse(text)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shapes", "4096x32768"], "--shapes.*N x D x V"),
        (["--suite", "speed"], "--suite.*unknown suite 'speed'.*ce, linear, linear_grid, scale"),
        (["--dtypes", "int8"], "--dtypes.*unknown dtype 'int8'"),
        (["--repeats", "0"], "--repeats.*must be positive"),
        (["--providers", "xentkit:fast"], "unknown xentkit backend 'fast'"),
        (
            ["--suite", "ce", "--providers", "cce"],
            "no selected suite \\(ce\\) has a provider 'cce'",
        ),
        (["--providers", "torch:chunked"], "no selected suite"),
    ],
)
def test_bad_arguments_name_the_flag_and_the_fix(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.main(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return torch.ones(4)


def test_measure_first_call_warmup_then_repeats():
    step = Counter()
    result = harness.measure(Bench(step, 16), repeats=4, warmup=2)
    assert step.calls == 1 + 2 + 4
    assert result["repeats"] == 4
    assert result["p20"] <= result["median"] <= result["p80"]
    assert result["first_call_s"] >= 0
    single = Counter()
    result = harness.measure(Bench(single, 16), repeats=4, warmup=2, single_shot=True)
    assert single.calls == 1 and result["repeats"] == 1


def _build_ok(provider, shape, dtype, compile_backend):
    return Bench(lambda: torch.zeros(shape.n, shape.v, dtype=dtype), 0)


def _build_oom(provider, shape, dtype, compile_backend):
    raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 64 bytes")


def _build_skip(provider, shape, dtype, compile_backend):
    raise Skip("package missing")


def _build_error(provider, shape, dtype, compile_backend):
    raise ValueError("a bug\nin the provider")


def _suite(build) -> Suite:
    shapes = (Shape(4, 2, 8),)
    return Suite("fake", "Fake", "cross_entropy", build, str, ("xentkit", "torch"), shapes, shapes,
                 ("float32",), 2)  # fmt: skip


@pytest.mark.parametrize(
    ("build", "status", "note"),
    [
        (_build_ok, "ok", None),
        (_build_oom, "OOM", "could not allocate 0 MiB"),
        (_build_skip, "skipped", "package missing"),
        (_build_error, "error", "in the provider"),
    ],
)
def test_outcome_turns_failures_into_statuses(build, status, note):
    result = harness.outcome(Job(_suite(build), Shape(4, 2, 8), "float32", "torch", repeats=2))
    assert result["status"] == status
    if note is not None:
        assert result["note"] == note
    else:
        assert result["median"] is not None and result["repeats"] == 2


@pytest.mark.parametrize(
    "suite", [bench_cross_entropy.SUITE, bench_linear_cross_entropy.SUITE], ids=lambda s: s.name
)
def test_every_provider_computes_the_same_gradients(suite):
    """The rows time the same maths: each provider's gradients equal torch eager's (CCE's
    inductor compile is too slow for a test; its row is checked by --quick --providers cce)."""
    shape = Shape(6, 4, 10)
    grads = {}
    for provider in suite.providers:
        if provider in ("floor", "floor-copy", "pass-max", "pass-exp", "cce"):
            continue
        torch.manual_seed(0)
        grads[provider] = suite.build(provider, shape, torch.float32, "eager").step()
    for provider, value in grads.items():
        for got, expected in zip(value, grads["torch"], strict=True):
            torch.testing.assert_close(got, expected, msg=provider)


def test_cce_row_is_skipped_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)  # makes the import fail
    with pytest.raises(Skip, match="pip install --no-deps cut-cross-entropy"):
        bench_linear_cross_entropy.build("cce", Shape(2, 2, 3), torch.float32, "eager")


def test_failure_status_and_death():
    assert harness.failure_status(MemoryError()) == "OOM"
    assert harness.failure_status(RuntimeError("shape mismatch")) == "error"
    assert harness._died(-9, "")["status"] == "OOM"
    assert harness._died(1, "Traceback: boom")["note"] == "Traceback: boom"


def test_backend_of_names_the_resolved_backend():
    suite = _suite(_build_ok)
    job = Job(suite, Shape(4, 2, 8), "float32", "xentkit", repeats=1)
    assert harness.backend_of(job) in ("reference", "chunked")
    assert harness.backend_of(Job(suite, Shape(4, 2, 8), "float32", "xentkit:reference", 1)) == (
        "reference"
    )
    assert harness.backend_of(Job(suite, Shape(4, 2, 8), "float32", "torch", 1)) is None


def test_plan_quick_leaves_out_compiled_peers_unless_named():
    jobs, notes = run.plan(run.parser().parse_args(["--quick"]))
    assert set(jobs) == {"ce", "linear", "scale"}
    providers = {job.provider for suite_jobs in jobs.values() for job in suite_jobs}
    assert not providers & {"torch.compile", "cce"}
    assert "--quick leaves out torch.compile, cce" in notes["linear"][0]
    assert all(job.repeats == 1 and job.quick for job in jobs["scale"])
    assert all(job.mem_limit is None for job in jobs["ce"])
    args = ["--quick", "--suite", "ce", "--providers", "torch.compile,floor", "--mem-limit", "2"]
    jobs, notes = run.plan(run.parser().parse_args(args))
    assert [job.provider for job in jobs["ce"][:2]] == ["torch.compile", "floor"]
    assert all(job.mem_limit == 2 * 2**30 for job in jobs["ce"])
    assert notes == {"ce": []}


def test_plan_leaves_out_a_default_dtype_this_cpu_multiplies_slowly(monkeypatch):
    reasons = {"bfloat16": "bfloat16 left out: slow here"}
    linear = dataclasses.replace(run.SUITES["linear"], dtype_check=reasons.get)
    monkeypatch.setitem(run.SUITES, "linear", linear)
    jobs, notes = run.plan(run.parser().parse_args(["--suite", "linear,ce"]))
    assert {job.dtype for job in jobs["linear"]} == {"float32"}
    assert {job.dtype for job in jobs["ce"]} == {"float32", "bfloat16"}
    assert notes["linear"] == ["bfloat16 left out: slow here"]
    jobs, _ = run.plan(run.parser().parse_args(["--suite", "linear", "--dtypes", "bf16"]))
    assert {job.dtype for job in jobs["linear"]} == {"bfloat16"}


def _row(provider, median, peak, status="ok", dtype="float32"):
    times = {"median": median, "p20": median, "p80": median, "first_call_s": 0.1}
    note = "" if status == "ok" else "why"
    return {"case": "N=8 V=16", "dtype": dtype, "provider": provider, "backend": None,
            "status": status, **times, "peak_mib": peak, "note": note}  # fmt: skip


def _data():
    rows = [_row("xentkit", 4.0, 1.0), _row("torch", 10.0, 3.0), _row("floor", 2.0, 1.0)]
    rows += [
        _row("xentkit", 5.0, 1.0, dtype="bfloat16"),
        _row("torch", None, None, "OOM", "bfloat16"),
    ]
    rows[0]["backend"] = rows[3]["backend"] = "chunked"
    info = {"cpu": "CPU", "cores": 2, "torch_threads": 2, "memory_gib": 24, "torch": "2",
            "xentkit": "0", "date": "today"}  # fmt: skip
    settings = {"repeats": 3, "warmup": 1, "mem_limit_gib": None}
    return {"suite": "ce", "title": "CE", "reference": "torch", "floor": "floor",
            "floor_text": "one clone()", "providers": ["xentkit", "torch", "floor"],
            "command": "python benchmarks/run.py --suite ce", "machine": info,
            "settings": settings, "rows": rows}  # fmt: skip


def test_report_ratios_and_markdown(tmp_path):
    data = _data()
    headers, cells = report.full_table(data)
    xentkit = dict(zip(headers, cells[0], strict=True))
    assert xentkit["× torch"] == "0.40×" and xentkit["× floor"] == "2.00×"
    assert xentkit["provider"] == "xentkit [chunked]"
    oom = dict(zip(headers, cells[-1], strict=True))
    assert oom["status"] == "OOM" and oom["time (median)"] == "—"
    headers, cells = report.headline_table(data)
    assert [dict(zip(headers, line, strict=True))["× torch eager"] for line in cells] == [
        "0.40×",
        "—",
    ]
    image = plot.plot_suite(data, tmp_path / "results" / "ce.png")
    assert image.read_bytes()[:4] == b"\x89PNG"
    text = report.markdown([data], {"ce": image}, tmp_path / "RESULTS.md")
    assert "`python benchmarks/run.py --suite ce`" in text
    assert "CPU, 2 cores" in text and "](results/ce.png)" in text
    assert "- torch OOM: why" in text


def test_dry_run_lists_the_default_rows(capsys):
    assert run.main(["--dry-run", "--suite", "ce"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "ce N=4096 V=32768 float32 xentkit"
    assert lines[-1].startswith("40 rows; results would go to")


def test_report_only_needs_results(tmp_path, capsys):
    assert run.main(["--report-only", "--out", str(tmp_path)]) == 1
    assert "no results JSON" in capsys.readouterr().out


def test_quick_run_end_to_end(tmp_path):
    """What ``xentkit bench --quick`` does, at tiny shapes and in float32 only."""
    providers = "xentkit:reference,torch,floor"
    argv = ["--quick", "--providers", providers, "--dtypes", "fp32", "--out", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = {path.stem: json.loads(path.read_text()) for path in tmp_path.glob("*.json")}
    assert set(results) == {"ce", "linear", "scale"}
    for name, data in results.items():
        assert data["machine"]["torch"] == torch.__version__
        assert data["command"].startswith("python benchmarks/run.py --quick")
        assert (tmp_path / f"{name}.png").exists()
    ce_rows = results["ce"]["rows"]
    assert [row["provider"] for row in ce_rows] == ["xentkit:reference", "torch", "floor"] * 2
    assert all(row["status"] == "ok" and row["peak_mib"] is not None for row in ce_rows)
    assert {row["backend"] for row in ce_rows} == {"reference", None}
    # The quick scale case caps each process at 768 MiB over its size: torch's N x V logits
    # and their gradient do not fit, and the harness says so instead of dying.
    scale = {row["provider"]: row for row in results["scale"]["rows"]}
    assert scale["torch"]["status"] == "OOM" and "could not allocate" in scale["torch"]["note"]
    assert results["scale"]["settings"]["mem_limit_gib"] < 64
    markdown = (tmp_path / "RESULTS.md").read_text()
    assert markdown.count("## ") == 3 and "× torch" in markdown
    assert "Cross entropy, forward + backward" in done.stdout


def test_update_replaces_the_rows_measured_again(tmp_path):
    """``--update`` keeps the last run's other rows and records both commands."""
    argv = ["--quick", "--suite", "ce", "--dtypes", "fp32", "--out", str(tmp_path)]
    assert run.main([*argv, "--providers", "torch,floor"]) == 0
    before = json.loads((tmp_path / "ce.json").read_text())
    assert run.main([*argv, "--providers", "floor", "--update"]) == 0
    after = json.loads((tmp_path / "ce.json").read_text())
    assert [row["provider"] for row in after["rows"]] == ["torch", "floor"] * 2
    # torch's rows kept as they were, each with the machine of the run that measured it
    assert after["rows"][0::2] == [
        {"machine": before["machine"], **r} for r in before["rows"][0::2]
    ]
    assert not any("machine" in row for row in after["rows"][1::2])
    assert after["command"].count("python benchmarks/run.py") == 2
    assert "--update" in after["command"].split(" && ")[1]


def test_grad_filter_quick_run(tmp_path, monkeypatch):
    """``python -m benchmarks.bench_grad_filter --quick``: both tiny trainings, the timed step,
    JSON, plot and the markdown section (numbers never asserted)."""
    from benchmarks import bench_grad_filter

    monkeypatch.setattr(bench_grad_filter, "QUICK_OUT", tmp_path)
    assert bench_grad_filter.main(["--quick"]) == 0
    data = json.loads((tmp_path / "grad_filter.json").read_text())
    assert list(data["train_loss"]) == ["exact", "filter_eps=2**-12"]
    assert all(len(curve) == data["steps"] for curve in data["train_loss"].values())
    assert set(data["timing"]["ms"]) == {
        "xentkit exact", "xentkit filter_eps", "torch eager", "floor (3 GEMMs)"
    }  # fmt: skip
    assert 0 < data["timing"]["kept_fraction"] <= 1
    assert (tmp_path / "grad_filter.png").read_bytes()[:4] == b"\x89PNG"
    text = (tmp_path / "grad_filter.md").read_text()
    assert text.startswith("## Gradient filtering") and "× floor" in text


def test_paired_quick_run(tmp_path, monkeypatch):
    """``python -m benchmarks.bench_paired --quick``: per-round ratios of xentkit to the floor,
    JSON, plot and the markdown section (numbers never asserted)."""
    from benchmarks import bench_paired

    monkeypatch.setattr(bench_paired, "QUICK_OUT", tmp_path)
    assert bench_paired.main(["--quick", "--chunk-sizes", "auto,16", "--min-seconds", "2"]) == 0
    data = json.loads((tmp_path / "paired.json").read_text())
    # rounds added until they took 2 s (a tiny shape's round takes milliseconds; a fresh
    # clone's first test, beside the other worker's, once took over 0.3 s for two)
    assert all(row["rounds"] > 2 for row in data["rows"])
    cases = [(row["case"], row["chunk_size"]) for row in data["rows"]]
    assert cases == [
        ("N=64 D=32 V=256", "auto"),
        ("N=64 D=32 V=256", 16),
        ("N=37 D=24 V=1000", "auto"),
        ("N=37 D=24 V=1000", 16),
    ]
    for row in data["rows"]:
        for clock in ("wall", "cpu"):
            times = row[clock]
            assert times["p20"] <= times["ratio"] <= times["p80"]
            assert len(times["times_s"]) == len(times["floor_times_s"]) == row["rounds"]
            fastest = min(times["times_s"]) / min(times["floor_times_s"])
            assert times["fastest"] == pytest.approx(fastest)
    assert (tmp_path / "paired.png").read_bytes()[:4] == b"\x89PNG"
    text = (tmp_path / "paired.md").read_text()
    assert "× floor (wall)" in text and "| N=37 D=24 V=1000 xentkit chunk=16 |" in text
    # --update: one shape measured again, its rows replaced in place, the others kept
    assert bench_paired.main(["--quick", "--update", "--shapes", "64x32x256"]) == 0
    updated = json.loads((tmp_path / "paired.json").read_text())
    assert [(row["case"], row["chunk_size"]) for row in updated["rows"]] == [
        ("N=64 D=32 V=256", "auto"),
        ("N=37 D=24 V=1000", "auto"),
        ("N=37 D=24 V=1000", 16),
    ]
    assert updated["rows"][1:] == [{"machine": data["machine"], **r} for r in data["rows"][2:]]
    assert updated["command"].startswith(data["command"] + " && ")
    # --vocab-major-floor: both layouts' floors timed, each round's ratio over the faster one
    assert bench_paired.main(["--quick", "--vocab-major-floor", "--shapes", "64x32x256"]) == 0
    data = json.loads((tmp_path / "paired.json").read_text())
    for clock in ("wall", "cpu"):
        floor = data["rows"][0][clock]
        assert set(floor["floor_layouts_s"]) == {"N x V", "V x N"}
        assert floor["floor_s"] <= min(floor["floor_layouts_s"].values())
    assert "(N x V " in (tmp_path / "paired.md").read_text()
    # with a peer: its own files, and xentkit's time over the peer's in each peer row
    assert bench_paired.main(["--quick", "--providers", "torch"]) == 0
    data = json.loads((tmp_path / "paired_peers.json").read_text())
    assert [row["provider"] for row in data["rows"]] == ["xentkit", "torch"] * 2
    assert all(
        ("xentkit_ratio" in row["wall"]) == (row["provider"] == "torch") for row in data["rows"]
    )
    # where xentkit's time goes: each part a step of its own, in a section of its own
    assert bench_paired.main(["--quick", "--parts"]) == 0
    data = json.loads((tmp_path / "paired_parts.json").read_text())
    assert [row["provider"] for row in data["rows"]] == ["xentkit", *bench_paired.PARTS] * 2
    assert not any("xentkit_ratio" in row["wall"] for row in data["rows"])
    assert "- row pass: the row kernel" in (tmp_path / "paired_parts.md").read_text()


@pytest.mark.parametrize("logits_over_g", [False, True])
def test_gemm_floor_computes_the_three_products(logits_over_g):
    """The floor's products are the head's: logits, then the two gradients of ``g``; with
    ``logits_over_g`` the logits are written over ``g`` (one N x V buffer) and the gradients
    are those of the logits."""
    h, w, g = torch.randn(6, 4), torch.randn(10, 4), torch.randn(6, 10)
    given = g.clone()
    floor = bench_linear_cross_entropy.gemm_floor(g, h, w, logits_over_g=logits_over_g)
    logits, grad_h, grad_w = floor()
    torch.testing.assert_close(logits, h @ w.T)
    assert (logits.data_ptr() == g.data_ptr()) == logits_over_g
    used = logits if logits_over_g else given
    torch.testing.assert_close(grad_h, used @ w)
    torch.testing.assert_close(grad_w, used.T @ h)


def test_gemm_floor_vocab_major_lays_the_logits_out_v_by_n():
    """``vocab_major``: the same products with the logits (over ``g``'s memory) and their
    gradient laid out V x N; ``grads`` are the gradients' buffers, shared with another floor."""
    h, w, g = torch.randn(6, 4), torch.randn(10, 4), torch.randn(6, 10)
    grads = torch.empty(6, 4), torch.empty(10, 4)
    floor = bench_linear_cross_entropy.gemm_floor(
        g, h, w, logits_over_g=True, vocab_major=True, grads=grads
    )
    logits, grad_h, grad_w = floor()
    assert logits.shape == (10, 6) and logits.data_ptr() == g.data_ptr()
    torch.testing.assert_close(logits, w @ h.T)
    torch.testing.assert_close(grad_h, logits.T @ w)
    torch.testing.assert_close(grad_w, logits @ h)
    assert grad_h is grads[0] and grad_w is grads[1]


def test_grid_table_reads_both_runs(tmp_path, capsys):
    """``python -m benchmarks.grid_table``: one row per shape either run measured, ``—`` where
    the other did not, each peer's ratio from the same run as xentkit's time."""
    wall = {"ratio": 1.5, "p20": 1.4, "p80": 1.6, "time_s": 3.0, "floor_s": 2.0}
    paired = {"command": "P", "rows": [{"n": 4, "d": 2, "v": 8, "provider": "xentkit",
                                        "chunk_size": "auto", "wall": wall}]}  # fmt: skip
    grid_rows = [
        {"n": 2, "d": 2, "v": 8, "provider": name, "status": "ok", "median": ms, "peak_mib": mib}
        for name, ms, mib in (("xentkit", 100.0, 1.0), ("torch", 400.0, 9.0), ("cce", 200.0, 3.0))
    ]
    (tmp_path / "paired.json").write_text(json.dumps(paired))
    (tmp_path / "linear_grid.json").write_text(json.dumps({"command": "G", "rows": grid_rows}))
    assert grid_table.main(["--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == (
        "| 2, 2, 8 | — | — | — | — | — | — | 0.250× | — | 0.500× | 1 / 9 / — / 3 | — |"
    )
    assert lines[3] == (
        "| 4, 2, 8 | 3.00 s | 2.00 s | 1.500× (1.400–1.600) | 1.500× | — | — | — | — | — "
        "| — / — / — / — | — |"
    )
    assert lines[-1] == "× floor: `P`; the peers and memory: `G`"


def test_grid_table_takes_the_latest_floor_ratio():
    """A shape both paired runs measured takes the later run's floor ratio, and the last column
    names the commit it was measured at (a row kept by ``--update`` carries its own)."""

    def run(command: str, date: str, commit: str, ratio: float, kept: bool = False) -> dict:
        machine = {"date": date, "commit": commit}
        wall = {"ratio": ratio, "p20": ratio, "p80": ratio, "time_s": ratio, "floor_s": 1.0}
        row = {"n": 1, "d": 2, "v": 3, "provider": "xentkit", "chunk_size": "auto", "wall": wall}
        if kept:
            return {"command": command, "machine": {"date": "9999", "commit": "new"},
                    "rows": [{**row, "machine": machine}]}  # fmt: skip
        return {"command": command, "machine": machine, "rows": [row]}

    older, newer = ("2026-12-02", "aaaaaaa", 1.2), ("2026-12-03", "bbbbbbb", 1.1)
    for paired, peers in (
        (run("P", *older), run("Q", *newer)),
        (run("P", *newer), run("Q", *older, kept=True)),
    ):
        row = grid_table.table(paired, None, peers).splitlines()[2]
        assert row.startswith(
            "| 1, 2, 3 | 1.10 s | 1.00 s | 1.100× (1.100–1.100) | 1.100× | — |"
        ) and row.endswith(" | bbbbbbb |")


def test_grid_table_gives_the_ratio_over_the_row_major_floor_fastest_and_in_cpu_time():
    """Where both layouts of the floor were timed, "× N x V floor" is xentkit's median time over
    the N x V floor's, beside the per-round ratio over the faster layout; then the ratio of the
    fastest rounds and the per-round ratio of CPU times."""
    layouts = {"N x V": 2.5, "V x N": 2.0}
    wall = {"ratio": 1.4, "p20": 1.3, "p80": 1.5, "time_s": 3.0, "floor_s": 2.0, "fastest": 1.25}
    row = {"n": 1, "d": 2, "v": 3, "provider": "xentkit", "chunk_size": "auto"}
    row |= {"wall": {**wall, "floor_layouts_s": layouts}, "cpu": {"ratio": 1.1}}
    line = grid_table.table({"command": "P", "rows": [row]}, None).splitlines()[2]
    assert line.startswith(
        "| 1, 2, 3 | 3.00 s | 2.00 s (V x N) | 1.400× (1.300–1.500) | 1.200× | 1.250× | 1.100× |"
    )


def test_grid_table_keeps_one_hosts_times_and_any_hosts_memory():
    """``--l3``: the floor and peer times only from the host with that L3; the extra memory,
    which does not depend on the host's speed, from any host."""
    here, there = {"cache_kib": {"L3": 105 * 1024}}, {"cache_kib": {"L3": 504 * 1024}}
    wall = {"ratio": 1.02, "p20": 1.01, "p80": 1.03, "time_s": 1.02, "floor_s": 1.0}
    row = {"n": 1, "d": 2, "v": 3, "provider": "xentkit", "chunk_size": "auto", "wall": wall}
    paired = {"command": "P", "machine": here, "rows": [row, {**row, "n": 4, "machine": there}]}

    def grid(provider: str, n: int, ms: float, mib: float, machine: dict) -> dict:
        return {"n": n, "d": 2, "v": 3, "provider": provider, "status": "ok", "median": ms,
                "peak_mib": mib, "machine": machine}  # fmt: skip

    rows = [grid("xentkit", 1, 100.0, 5.0, here), grid("torch", 1, 400.0, 20.0, there)]
    rows.append(grid("xentkit", 4, 100.0, 6.0, there))
    lines = grid_table.table(paired, {"command": "G", "rows": rows}, l3_mib=105).splitlines()
    assert len(lines) == 5  # header, rule, the one shape this host timed, blank, commands
    assert lines[2].startswith("| 1, 2, 3 | 1.02 s |")
    assert lines[2].endswith("| — | — | — | 5 / 20 / — / — | — |")  # torch's time: not here
