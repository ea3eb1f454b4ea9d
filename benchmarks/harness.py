"""One benchmark job (a suite, a case, a dtype and a provider), run in its own process.

Every job gets a fresh process: its peak memory is its own (nothing an earlier job freed is
reused), a job that runs out of memory ends only itself, and its address space can be capped
(``mem_limit``), so that a failing allocation raises an error, reported as ``OOM``, instead of
waking the kernel's OOM killer. The processes are forked from a fork server that imports torch
once and never runs a tensor op: a job starts in milliseconds, and no job inherits a thread pool
(a process forked after OpenMP has run in its parent hangs in its first parallel op, so the
runner itself, or a test process, must never be the one that forks).

The timing protocol of :func:`measure`:

1. build the inputs (seeded), then time a first call, forward + backward, which includes any
   compilation (``first_call_s``);
2. a warm-up call whose peak resident memory over the inputs is measured (``peak_mib``; the
   workspace xentkit keeps between calls is freed first, so that this peak counts it), then
   ``warmup - 1`` more warm-up calls;
3. ``repeats`` timed calls, summarized by their median, 20th and 80th percentiles.

A single-shot suite (the scale case, where one call takes minutes) stops after step 1 and
reports that call's time and peak.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import xentkit
from benchmarks import memory
from xentkit.functional import resolve_backend

MIB = 2**20


@dataclass(frozen=True)
class Shape:
    """An LLM-like problem: ``n`` tokens, hidden size ``d`` and a vocabulary of ``v`` classes.

    Example:
        >>> Shape.parse("4096x1024x32768")
        Shape(n=4096, d=1024, v=32768)
    """

    n: int
    d: int
    v: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        """``"NxDxV"`` (tokens x hidden size x vocabulary) to a shape."""
        parts = text.lower().split("x")
        if len(parts) != 3 or not all(part.strip().isdigit() for part in parts):
            raise ValueError(
                f"a shape is N x D x V (tokens, hidden size, vocabulary) written like "
                f"4096x1024x32768, got {text!r}"
            )
        n, d, v = (int(part) for part in parts)
        if min(n, d, v) < 1:
            raise ValueError(f"every size of a shape must be at least 1, got {text!r}")
        return cls(n, d, v)

    def __str__(self) -> str:
        return f"{self.n}x{self.d}x{self.v}"


@dataclass(frozen=True)
class Bench:
    """What a job times: ``step`` runs forward + backward once and returns what it computed
    (dropped before the next call); ``inputs_bytes`` is the size of the inputs it holds."""

    step: Callable[[], object]
    inputs_bytes: int


class Skip(Exception):
    """A provider that cannot run on this machine (an optional package is missing)."""


Builder = Callable[[str, Shape, torch.dtype, str], Bench]


def no_limit(quick: bool) -> None:
    """The address-space cap of suites that set none."""
    return None


@dataclass(frozen=True)
class Suite:
    """A family of cases: how to build each provider's bench, and the defaults of a run.

    ``providers`` are run in that order; ``"xentkit"`` may carry a forced backend
    (``"xentkit:chunked"``); ``reference`` and ``floor`` are the providers the time ratios are
    taken against; ``compiled`` names the providers that compile on their first call;
    ``mem_limit(quick)`` is the address-space cap of each job (None: no cap) and
    ``dtype_check(dtype)`` says why a default dtype is left out on this machine (None: kept).
    """

    name: str
    title: str
    function: str  # the xentkit function measured, whose backend the xentkit rows name
    build: Builder
    case_label: Callable[[Shape], str]
    providers: tuple[str, ...]
    shapes: tuple[Shape, ...]
    quick_shapes: tuple[Shape, ...]
    dtypes: tuple[str, ...]
    repeats: int
    reference: str = "torch"
    floor: str | None = None
    floor_text: str = ""
    compiled: frozenset[str] = frozenset()
    single_shot: bool = False
    mem_limit: Callable[[bool], int | None] = no_limit
    dtype_check: Callable[[str], str | None] | None = None

    def accepts(self, provider: str) -> bool:
        """Whether ``provider`` (a name of ``providers``, a backend allowed after xentkit's
        names only) is one this suite can build."""
        name, backend = split_backend(provider)
        if backend is not None and not name.startswith("xentkit"):
            return False
        return name in {split_backend(known)[0] for known in self.providers}


def split_backend(provider: str) -> tuple[str, str | None]:
    """A provider's name and forced backend.

    Example:
        >>> split_backend("xentkit:chunked"), split_backend("torch")
        (('xentkit', 'chunked'), ('torch', None))
    """
    name, _, backend = provider.partition(":")
    return name, backend or None


@dataclass(frozen=True)
class Job:
    """One measurement, with everything its process needs. ``mem_limit`` (bytes of address
    space) overrides the suite's own cap, which the job's process works out for itself (it
    may depend on that process's size and on the memory available when it starts)."""

    suite: Suite
    shape: Shape
    dtype: str
    provider: str
    repeats: int
    warmup: int = 1
    timeout: float = 1800.0
    compile_backend: str = "inductor"
    mem_limit: int | None = None
    quick: bool = False

    @property
    def title(self) -> str:
        """``ce N=4096 V=32768 float32 torch``: what the progress bar and the log show."""
        return f"{self.suite.name} {self.suite.case_label(self.shape)} {self.dtype} {self.provider}"


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """Median, 20th and 80th percentiles of timings, in milliseconds.

    Example:
        >>> summarize([0.001, 0.002, 0.003, 0.004, 0.005])
        {'median': 3.0, 'p20': 1.8, 'p80': 4.2}
    """
    ms = [s * 1000.0 for s in seconds]
    if len(ms) < 2:
        return {"median": round(ms[0], 4), "p20": round(ms[0], 4), "p80": round(ms[0], 4)}
    cuts = statistics.quantiles(ms, n=5, method="inclusive")
    return {
        "median": round(statistics.median(ms), 4),
        "p20": round(cuts[0], 4),
        "p80": round(cuts[3], 4),
    }


def _timed(step: Callable[[], object]) -> float:
    start = time.perf_counter()
    out = step()
    elapsed = time.perf_counter() - start
    del out  # freed before the next call, so two calls' outputs never coexist
    return elapsed


def _mib(n_bytes: int | None) -> float | None:
    return None if n_bytes is None else round(n_bytes / MIB, 1)


def measure(bench: Bench, repeats: int, warmup: int, single_shot: bool = False) -> dict:
    """Times ``bench.step`` with the protocol of this module; times in ms, memory in MiB."""
    with memory.measure_peak() as first_peak:
        first = _timed(bench.step)
    if single_shot:
        return {
            **summarize([first]),
            "repeats": 1,
            "first_call_s": round(first, 3),
            "peak_mib": _mib(first_peak.extra),
        }
    xentkit.empty_cache()  # memory held between calls is the step's too
    with memory.measure_peak() as peak:
        _timed(bench.step)
    for _ in range(warmup - 1):
        _timed(bench.step)
    times = [_timed(bench.step) for _ in range(repeats)]
    return {
        **summarize(times),
        "repeats": repeats,
        "first_call_s": round(first, 3),
        "peak_mib": _mib(peak.extra),
    }


def backend_of(job: Job) -> str | None:
    """The xentkit backend a xentkit row runs (the default one for the CPU unless forced)."""
    name, backend = split_backend(job.provider)
    if not name.startswith("xentkit"):
        return None
    return resolve_backend(backend, job.suite.function, torch.device("cpu"))


def failure_status(error: BaseException) -> str:
    """``"OOM"`` for an allocation that failed, else ``"error"``.

    Example:
        >>> failure_status(RuntimeError("DefaultCPUAllocator: can't allocate memory: ..."))
        'OOM'
    """
    text = str(error).lower()
    out_of_memory = ("can't allocate memory", "cannot allocate memory", "out of memory")
    if isinstance(error, MemoryError) or any(words in text for words in out_of_memory):
        return "OOM"
    return "error"


def failure_note(error: BaseException) -> str:
    """What went wrong, in one line.

    Example:
        >>> failure_note(RuntimeError("you tried to allocate 1073741824 bytes"))
        'could not allocate 1,024 MiB'
    """
    found = re.search(r"tried to allocate (\d+) bytes", str(error))
    if found:
        return f"could not allocate {int(found.group(1)) / MIB:,.0f} MiB"
    return _last_line(str(error)) or repr(error)


def _last_line(text: str, limit: int = 200) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:limit] if lines else ""


def outcome(job: Job) -> dict:
    """Caps, builds and measures ``job`` in this process; failures become a status and a
    note. Meant for the job's own process: the cap cannot be lifted once set."""
    limit = job.mem_limit if job.mem_limit is not None else job.suite.mem_limit(job.quick)
    capped = {"mem_limit_gib": None if limit is None else round(limit / 2**30, 2)}
    try:
        if limit is not None:
            memory.limit_address_space(limit)
        torch.manual_seed(0)
        dtype = getattr(torch, job.dtype)
        bench = job.suite.build(job.provider, job.shape, dtype, job.compile_backend)
        return {
            "status": "ok",
            "inputs_mib": _mib(bench.inputs_bytes),
            **measure(bench, job.repeats, job.warmup, job.suite.single_shot),
            **capped,
        }
    except Skip as error:
        return {"status": "skipped", "note": str(error), **capped}
    except BaseException as error:
        traceback.print_exc()
        return {"status": failure_status(error), "note": failure_note(error), **capped}


def _child(job: Job, sender, log_path: str) -> None:
    """The job's process: its output goes to a log (compiler chatter would break the runner's
    progress bar), its result back through ``sender``."""
    log = os.open(log_path, os.O_WRONLY)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sender.send(outcome(job))


def _wait(process, receiver, timeout: float, tick: Callable[[], None]) -> dict | None:
    deadline = time.monotonic() + timeout
    while not receiver.poll(0.25):
        tick()
        if time.monotonic() > deadline:
            process.kill()
            return {"status": "timeout", "note": f"no result after {timeout:.0f} s"}
    try:
        return receiver.recv()
    except EOFError:  # the child died before it could answer
        return None


def _died(exitcode: int | None, log_tail: str) -> dict:
    if exitcode == -signal.SIGKILL:
        return {
            "status": "OOM",
            "note": "killed by SIGKILL, most likely by the kernel's OOM killer",
        }
    return {"status": "error", "note": log_tail or f"the job's process exited with code {exitcode}"}


# Imported once by the fork server, before it forks any job. multiprocessing re-runs the
# parent's main script in every child; with the runner preloaded, every import it makes is
# already done and a job starts in milliseconds.
PRELOAD = ["torch", "xentkit", "benchmarks.run"]


def _context():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # ignored once the server runs
    return context


def run(job: Job, tick: Callable[[], None] = lambda: None) -> dict:
    """Runs ``job`` in its own process and returns its JSON row; ``tick`` is called while
    waiting (to refresh a progress bar)."""
    context = _context()
    receiver, sender = context.Pipe(duplex=False)
    with tempfile.NamedTemporaryFile(prefix="xentkit-bench-", suffix=".log") as log:
        process = context.Process(target=_child, args=(job, sender, log.name), daemon=True)
        process.start()
        sender.close()
        result = _wait(process, receiver, job.timeout, tick)
        process.join()
        receiver.close()
        tail = _last_line(Path(log.name).read_bytes()[-4000:].decode(errors="replace"))
    if result is None:
        result = _died(process.exitcode, tail)
    return {
        "suite": job.suite.name,
        "case": job.suite.case_label(job.shape),
        "n": job.shape.n,
        "d": job.shape.d,
        "v": job.shape.v,
        "dtype": job.dtype,
        "provider": job.provider,
        "backend": backend_of(job),
        "metric": "forward+backward",
        "unit": "ms",
        "median": None,
        "p20": None,
        "p80": None,
        "repeats": 0,
        "first_call_s": None,
        "peak_mib": None,
        "inputs_mib": None,
        "mem_limit_gib": None,
        "note": "",
        **result,
    }
