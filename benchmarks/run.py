"""``xentkit bench``: xentkit against PyTorch and its peers, side by side, in one run.

Examples::

    python benchmarks/run.py                  # the full default suite (what `make bench` runs)
    python benchmarks/run.py --quick          # tiny shapes, seconds: checks the harness
    python benchmarks/run.py --suite ce --dtypes float32 --shapes 8192x1024x32768
    python benchmarks/run.py --report-only    # tables, plots and RESULTS.md from the JSON
    python benchmarks/run.py --suite gpu      # on a CUDA GPU: benchmarks/bench_gpu.py

Each suite's rows go to ``OUT/<suite>.json`` as soon as the suite ends; then the terminal
tables, one PNG per suite (``OUT/<suite>.png``) and ``RESULTS.md`` are made from every suite's
JSON in ``OUT``. How each row is measured: :mod:`benchmarks.harness`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, only ``benchmarks/`` is on the path: make the repository's packages
# (``benchmarks`` and the ``xentkit`` being measured) importable, first.
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn  # noqa: E402

from benchmarks import (  # noqa: E402
    bench_cross_entropy,
    bench_explain,
    bench_linear_cross_entropy,
    bench_linear_grid,
    bench_scale,
    bench_trl,
    harness,
    plot,
    report,
)
from benchmarks.harness import Job, Shape, Suite  # noqa: E402
from benchmarks.machine import machine_info  # noqa: E402
from xentkit.functional import BACKENDS  # noqa: E402

SUITES: dict[str, Suite] = {
    suite.name: suite
    for suite in (
        bench_cross_entropy.SUITE,
        bench_linear_cross_entropy.SUITE,
        bench_linear_grid.SUITE,
        bench_scale.SUITE,
        bench_explain.SUITE,
        *bench_trl.SUITES,
    )
}
# What a run without --suite measures: the losses; explain's speed is a suite of its own
# (--suite explain, or all).
DEFAULT_SUITES = ["ce", "linear", "scale"]
DEFAULT_OUT = ROOT / "benchmarks" / "results"
DEFAULT_REPORT = ROOT / "benchmarks" / "RESULTS.md"
# --quick checks the harness; its numbers mean nothing, so they never overwrite the real ones.
QUICK_OUT = Path(tempfile.gettempdir()) / "xentkit-bench-quick"
QUICK_REPEATS = 3
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "float64": "float64",
    "fp64": "float64",
}


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _suites(text: str) -> list[str]:
    names = _list(text)
    unknown = [name for name in names if name not in (*SUITES, "all")]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown suite {', '.join(unknown) or text!r}: choose from "
            f"{', '.join(SUITES)} or all, comma-separated"
        )
    return list(SUITES) if "all" in names else list(dict.fromkeys(names))


def _shapes(text: str) -> list[Shape]:
    try:
        return [Shape.parse(item) for item in _list(text)]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _dtypes(text: str) -> list[str]:
    unknown = [name for name in _list(text) if name.lower() not in DTYPES]
    if unknown or not _list(text):
        raise argparse.ArgumentTypeError(
            f"unknown dtype {', '.join(unknown) or text!r}: choose from {', '.join(DTYPES)}"
        )
    return list(dict.fromkeys(DTYPES[name.lower()] for name in _list(text)))


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    """The command line of ``xentkit bench`` / ``benchmarks/run.py``."""
    p = argparse.ArgumentParser(
        prog="xentkit bench",
        description="Benchmark xentkit against torch eager, torch.compile, Apple's "
        "cut-cross-entropy and the memory-bandwidth / matrix-product floor: forward + backward "
        "time (median, p20, p80) and peak memory, one process per row.",
        epilog="Suites: ce (plain cross entropy), linear (LM head + loss), scale (a linear "
        "cross entropy the unfused path cannot fit in 24 GiB), explain (xentkit.explain of an "
        "LM batch against one cross-entropy forward; run when named). Providers: xentkit, "
        "xentkit:BACKEND, xentkit-inplace (ce), torch, torch.compile, cce (linear, scale), "
        "floor (ce, linear); explain: xentkit, torch.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes and 3 repeats, without the compiled peers unless --providers names "
        f"them: checks the harness in seconds; writes to {QUICK_OUT} unless --out is given",
    )
    p.add_argument(
        "--suite",
        type=_suites,
        default=DEFAULT_SUITES,
        help=f"comma-separated: {', '.join(SUITES)} or all (default: {','.join(DEFAULT_SUITES)})",
    )
    p.add_argument(
        "--shapes",
        type=_shapes,
        help="comma-separated NxDxV (tokens x hidden size x vocabulary), e.g. 4096x1024x32768; "
        "replaces the shapes of every selected suite (ce ignores D)",
    )
    p.add_argument("--dtypes", type=_dtypes, help="comma-separated, e.g. float32,bfloat16")
    p.add_argument(
        "--providers", type=_list, help="comma-separated subset, in the order to run them"
    )
    p.add_argument(
        "--repeats", type=_positive(int), help="timed calls per row (default: ce 10, linear 5)"
    )
    p.add_argument(
        "--warmup",
        type=_positive(int),
        default=1,
        help="warm-up calls after the first call, the first of which measures peak memory",
    )
    p.add_argument("--out", type=Path, help=f"results directory (default {DEFAULT_OUT})")
    p.add_argument(
        "--report",
        type=Path,
        help=f"RESULTS.md to write (default {DEFAULT_REPORT} with the default --out, "
        "else OUT/RESULTS.md)",
    )
    p.add_argument(
        "--mem-limit",
        type=_positive(float),
        metavar="GIB",
        help="address-space cap of every row, in GiB (default: none, except the scale suite: "
        "24 GiB or 95%% of the available memory if less)",
    )
    p.add_argument(
        "--timeout",
        type=_positive(float),
        default=3600.0,
        help="seconds a row may take before it is stopped and reported as a timeout",
    )
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the torch.compile rows (CCE always uses inductor)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="list the rows the run would measure, run nothing"
    )
    p.add_argument(
        "--update",
        action="store_true",
        help="keep the rows of each suite's last run in --out and replace those measured now "
        "(same case, dtype and provider); both commands are recorded",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: remake the tables, plots and RESULTS.md from the JSON in --out",
    )
    return p


def _check_providers(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    for provider in args.providers or ():
        _, backend = harness.split_backend(provider)
        if backend is not None and backend not in BACKENDS:
            p.error(
                f"--providers: unknown xentkit backend {backend!r} in {provider!r}; "
                f"choose from {', '.join(BACKENDS)}"
            )
        if not any(SUITES[suite].accepts(provider) for suite in args.suite):
            p.error(
                f"--providers: no selected suite ({', '.join(args.suite)}) has a provider "
                f"{provider!r}; see --help for each suite's providers"
            )


def plan(args: argparse.Namespace) -> tuple[dict[str, list[Job]], dict[str, list[str]]]:
    """The jobs of the run, by suite, in the order they will run, and the notes saying what
    was left out of each suite and why."""
    jobs: dict[str, list[Job]] = {}
    notes: dict[str, list[str]] = {}
    for name in args.suite:
        suite = SUITES[name]
        notes[name] = []
        providers = [p for p in (args.providers or suite.providers) if suite.accepts(p)]
        if args.quick and not args.providers:
            left_out = [p for p in providers if p in suite.compiled]
            providers = [p for p in providers if p not in suite.compiled]
            if left_out:
                notes[name].append(
                    f"--quick leaves out {', '.join(left_out)} (compiling takes tens of "
                    "seconds); name them in --providers to include them"
                )
        dtypes = args.dtypes or list(suite.dtypes)
        if not args.dtypes and not args.quick and suite.dtype_check is not None:
            reasons = {dtype: suite.dtype_check(dtype) for dtype in dtypes}
            notes[name] += [reason for reason in reasons.values() if reason]
            dtypes = [dtype for dtype in dtypes if not reasons[dtype]]
        mem_limit = None if args.mem_limit is None else int(args.mem_limit * 2**30)
        repeats = args.repeats or (QUICK_REPEATS if args.quick else suite.repeats)
        suite_jobs = [
            Job(
                suite=suite,
                shape=shape,
                dtype=dtype,
                provider=provider,
                repeats=1 if suite.single_shot else repeats,
                warmup=args.warmup,
                timeout=args.timeout,
                compile_backend=args.compile_backend,
                mem_limit=mem_limit,
                quick=args.quick,
            )
            for shape in args.shapes or (suite.quick_shapes if args.quick else suite.shapes)
            for dtype in dtypes
            for provider in providers
        ]
        if suite_jobs:
            jobs[name] = suite_jobs
        else:
            notes[name].append("nothing to run: no selected provider or dtype belongs here")
    return jobs, notes


def _summary(row: dict) -> str:
    if row["status"] != "ok":
        return f"[red]{row['status']}[/red] {row['note']}"
    peak = "—" if row["peak_mib"] is None else f"{row['peak_mib']:,.1f} MiB"
    return (
        f"{report.format_time(row['median'])} (p20–p80 {report.format_time(row['p20'])} – "
        f"{report.format_time(row['p80'])}), peak {peak}, first call {row['first_call_s']:.2f} s"
    )


def _write_json(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    partial.replace(path)  # a run stopped midway never leaves a truncated file


def _suite_results(
    suite: Suite, jobs: list[Job], rows: list, notes: list[str], command: str, machine: dict
) -> dict:
    """A suite's JSON: what it measures, how, where, what was left out, and its rows."""
    first = jobs[0]  # every job of a suite shares the run's settings
    caps = [row["mem_limit_gib"] for row in rows if row.get("mem_limit_gib") is not None]
    return {
        "suite": suite.name,
        "title": suite.title,
        "reference": suite.reference,
        "floor": suite.floor,
        "floor_text": suite.floor_text,
        "providers": list(dict.fromkeys(job.provider for job in jobs)),
        "command": command,
        "machine": machine,
        "settings": {
            "repeats": first.repeats,
            "warmup": 0 if suite.single_shot else first.warmup,
            "mem_limit_gib": min(caps) if caps else None,  # the tightest any row ran under
            "timeout_s": first.timeout,
            "compile_backend": first.compile_backend,
        },
        "notes": notes,
        "rows": rows,
    }


def updated(previous: dict, data: dict) -> dict:
    """``data`` with the rows of ``previous`` (the suite's last run) it did not measure again
    kept, each measured row in its predecessor's place, and both commands recorded.

    Example:
        >>> row = lambda provider, median: {"case": "N=1", "dtype": "float32",
        ...                                 "provider": provider, "median": median}
        >>> old = {"command": "A", "providers": ["x", "y"], "machine": "M",
        ...        "rows": [row("x", 1), row("y", 2)]}
        >>> new = {"command": "B", "providers": ["x"], "rows": [row("x", 3)]}
        >>> merged = updated(old, new)
        >>> merged["command"], merged["providers"], [r["median"] for r in merged["rows"]]
        ('A && B', ['x', 'y'], [3, 2])
        >>> [r.get("machine") for r in merged["rows"]]
        [None, 'M']
    """

    def key(row: dict) -> tuple:
        return row["case"], row["dtype"], row["provider"]

    new = {key(row): row for row in data["rows"]}
    machine = previous["machine"]  # a kept row keeps the machine it ran on
    rows = [new.pop(key(row), {"machine": machine, **row}) for row in previous["rows"]]
    rows += new.values()
    providers = list(dict.fromkeys([*previous["providers"], *data["providers"]]))
    command = f"{previous['command']} && {data['command']}"
    return {**data, "command": command, "providers": providers, "rows": rows}


def run_suites(
    jobs: dict[str, list[Job]],
    notes: dict[str, list[str]],
    out: Path,
    command: str,
    console: Console,
    update: bool = False,
) -> list[dict]:
    """Runs every job under a progress bar; writes and returns each suite's results (with
    ``update``, merged into the suite's last results in ``out``: :func:`updated`)."""
    machine = machine_info()
    results = []
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    # No auto-refresh: the bar is redrawn from this thread only, while it waits on a job.
    with Progress(*columns, console=console, auto_refresh=False, transient=True) as progress:
        task = progress.add_task("", total=sum(len(suite_jobs) for suite_jobs in jobs.values()))
        for name, suite_jobs in jobs.items():
            rows = []
            for job in suite_jobs:
                progress.update(task, description=job.title)
                progress.refresh()
                row = harness.run(job, tick=progress.refresh)
                rows.append(row)
                progress.console.print(f"{job.title}: {_summary(row)}")
                progress.advance(task)
                progress.refresh()
            data = _suite_results(SUITES[name], suite_jobs, rows, notes[name], command, machine)
            path = out / f"{name}.json"
            if update and path.exists():
                data = updated(json.loads(path.read_text()), data)
            _write_json(data, path)
            results.append(data)
    return results


def write_outputs(out: Path, report_path: Path, console: Console) -> bool:
    """Plots and RESULTS.md from every suite's JSON in ``out``; False when there is none."""
    results = report.load(out)
    if not results:
        console.print(f"[red]no results JSON in {out}: run the benchmarks first[/red]")
        return False
    plots = {data["suite"]: plot.plot_suite(data, out / f"{data['suite']}.png") for data in results}
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(report.markdown(results, plots, report_path))
    console.print(f"wrote {', '.join(str(p) for p in plots.values())} and {report_path}")
    return True


def write_section(
    out: Path,
    data: dict,
    plot_fn: Callable[[dict, Path], Path],
    markdown_fn: Callable[[dict, str], str],
    remake_report: bool,
) -> None:
    """What a runner with a markdown section of its own writes (``data["suite"]`` names the
    files): ``NAME.json``, ``NAME.png`` and ``NAME.md`` in ``out``, the section printed, and
    with ``remake_report`` RESULTS.md remade from every suite's results (it takes the section
    as it is)."""
    name = data["suite"]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))
    plot_fn(data, out / f"{name}.png")
    (out / f"{name}.md").write_text(markdown_fn(data, f"results/{name}.png") + "\n")
    print(markdown_fn(data, str(out / f"{name}.png")))
    if remake_report:
        write_outputs(out, DEFAULT_REPORT, Console())


def run_standalone(suites: list[Suite], module: str, argv: list[str] | None = None) -> int:
    """``python -m MODULE [--quick] [--repeats N]``: runs ``suites`` (measured on their own,
    outside the default run) through this runner; writes their JSON and plots, and remakes
    RESULTS.md from every suite's JSON."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog=f"python -m {module}")
    p.add_argument("--quick", action="store_true", help="tiny shapes, seconds")
    p.add_argument("--repeats", type=int, help="timed calls per row (default: the suite's)")
    args = p.parse_args(arguments)
    out = QUICK_OUT if args.quick else DEFAULT_OUT
    default = {suite.name: QUICK_REPEATS if args.quick else suite.repeats for suite in suites}
    repeats = {name: args.repeats or value for name, value in default.items()}
    jobs = {
        suite.name: [
            Job(suite, shape, dtype, provider, repeats[suite.name], quick=args.quick)
            for shape in (suite.quick_shapes if args.quick else suite.shapes)
            for dtype in suite.dtypes
            for provider in suite.providers
        ]
        for suite in suites
    }
    for suite in suites:  # the runner looks suites up by name
        SUITES.setdefault(suite.name, suite)
    command = shlex.join(["python", "-m", module, *arguments])
    console = Console()
    for data in run_suites(jobs, {name: [] for name in jobs}, out, command, console):
        report.print_suite(data, console)
    report_path = DEFAULT_REPORT if out == DEFAULT_OUT else out / "RESULTS.md"
    write_outputs(out, report_path, console)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmarks; returns 1 when a row failed with an error (not OOM), else 0."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    # Suite gpu has a runner of its own (CUDA events and torch.cuda memory in one process, its
    # own --dry-run): `--suite gpu [its options]` hands the rest of the command line to it.
    if arguments[:2] == ["--suite", "gpu"] or arguments[:1] == ["--suite=gpu"]:
        from benchmarks import bench_gpu

        return bench_gpu.main(arguments[1 if arguments[0] == "--suite=gpu" else 2 :])
    p = parser()
    args = p.parse_args(arguments)
    _check_providers(args, p)
    console = Console()
    if not console.is_terminal:  # a log or a pipe: room for the tables rather than 80 columns
        console.width = max(console.width, 150)
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    default_place = out.resolve() == DEFAULT_OUT
    report_path = args.report or (DEFAULT_REPORT if default_place else out / "RESULTS.md")
    if args.report_only:
        for data in report.load(out):
            report.print_suite(data, console)
        return 0 if write_outputs(out, report_path, console) else 1
    command = shlex.join(["python", "benchmarks/run.py", *arguments])
    jobs, notes = plan(args)
    for name, lines in notes.items():
        for line in lines:
            console.print(f"[yellow]note[/yellow] {name}: {line}")
    if args.dry_run:
        for job in (job for suite_jobs in jobs.values() for job in suite_jobs):
            console.print(job.title, markup=False)
        console.print(f"{sum(map(len, jobs.values()))} rows; results would go to {out}")
        return 0
    results = run_suites(jobs, notes, out, command, console, args.update)
    for data in results:
        report.print_suite(data, console)
    write_outputs(out, report_path, console)
    failed = any(row["status"] == "error" for data in results for row in data["rows"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
