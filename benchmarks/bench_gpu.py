"""Suite ``gpu``: xentkit against its peers on one CUDA GPU, bfloat16, LLM shapes.

Two kinds of case, each provider forward + backward (``torch.autograd.grad``) on the same
seeded inputs, at N in {8192, 32768} tokens, D = 4096, V in {128256, 256000}:

- ``linear`` (LM head + loss, ``cross_entropy(h @ W.T, target)`` to ``h`` and ``W``):
  ``xentkit`` (the CUDA default: the chunked design, cuBLAS products on token chunks and the
  Triton row kernel writing each chunk's gradient in place), ``xentkit:triton`` (the fully
  fused Triton kernels), ``torch`` (``F.cross_entropy(F.linear(h, W).float(), target)`` in
  eager mode, as ``transformers`` computes its loss from upcast logits), ``torch.compile``
  (the same, ``dynamic=True``), ``liger`` (``LigerFusedLinearCrossEntropyLoss``), ``cce``
  (``cut_cross_entropy.linear_cross_entropy(..., impl="cce")``) and ``floor`` (the three
  bfloat16 matrix products no implementation avoids: ``h @ W.T``, ``G @ W``, ``G.T @ h``);
- ``ce`` (plain cross entropy of given ``(N, V)`` logits): ``xentkit`` (Triton kernel),
  ``xentkit-inplace`` (``inplace_backward=True``), ``torch``, ``torch.compile`` and ``liger``
  (``LigerCrossEntropyLoss``, which writes the gradient over the logits).

How a row is measured, one after the other in this process (gc, ``empty_cache`` and the peak
statistics reset between rows): a first call (wall clock, any compilation included) whose
loss and gradients are held to torch's (``F.cross_entropy`` on float32 logits, float32
gradients, computed in token chunks so that the reference fits beside the largest peers):
relative error of the loss and norm-wise relative error of each gradient; then a warm-up call
whose peak memory is recorded (``torch.cuda.max_memory_allocated`` over what was allocated
before it, plus the inputs); then ``warmup - 1`` more and ``repeats`` calls timed with CUDA
events, summarised by their median, 20th and 80th percentiles. A peer that is not installed,
runs out of memory or fails is a row with that status, not a failed run.

Time budget: the run estimates each row from its FLOPs (three products of ``2 N D V`` at
:data:`PEAK_TFLOPS` times :data:`EFFICIENCY`), its memory traffic and a compilation allowance,
skips a row that would end past ``--budget`` seconds and cuts a row's repeats to
:data:`ROW_CAP_S` seconds of calls, so that ``benchmarks/gpu.sh`` (installs included) ends
within 8 minutes on one H100 or H200.

Run::

    bash benchmarks/gpu.sh                       # venv, pinned peers, then this script
    python benchmarks/bench_gpu.py               # in an environment that has them
    python benchmarks/run.py --suite gpu         # the same through the benchmark runner
    python benchmarks/bench_gpu.py --dry-run     # CPU, TRITON_INTERPRET=1, tiny shapes

Outputs: ``benchmarks/results/gpu.json`` (the data), ``gpu.png`` and ``gpu.md`` (the markdown
tables for RESULTS.md, also printed) beside it; ``--dry-run`` writes to a temporary folder
unless ``--out`` is given: its numbers only prove that every code path runs.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make ``xentkit`` (this checkout) importable
    sys.path.insert(0, str(ROOT))

# Neither imports Triton, so a dry run can still switch it to its interpreter in main().
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import xentkit  # noqa: E402
from xentkit.functional import resolve_backend  # noqa: E402
from xentkit.kernels import linear_chunked  # noqa: E402

CUDA = torch.device("cuda")

DEFAULT_OUT = ROOT / "benchmarks" / "results"
DRY_OUT = Path(tempfile.gettempdir()) / "xentkit-bench-gpu-dry"

# (N, D, V): tokens, hidden size, vocabulary (Llama 3's 128256, Gemma's 256000).
SHAPES = ((8192, 4096, 128256), (8192, 4096, 256000), (32768, 4096, 128256), (32768, 4096, 256000))
# The dry run's: Triton's interpreter runs each row's program in Python, so few rows.
DRY_SHAPES = ((32, 32, 512),)
LINEAR_PROVIDERS = ("xentkit", "xentkit:triton", "torch", "torch.compile", "liger", "cce", "floor")
CE_PROVIDERS = ("xentkit", "xentkit-inplace", "torch", "torch.compile", "liger")
PEERS_NEEDING_CUDA = ("liger", "cce")

# The time model of the budget: bfloat16 dense matrix products at PEAK_TFLOPS (an H100 SXM
# sustains ~700 of its spec sheet's 989) times EFFICIENCY, memory traffic at BANDWIDTH bytes/s.
PEAK_TFLOPS = 700.0
FP32_TFLOPS = 50.0  # float32 products without TF32: the reference's gradient products
EFFICIENCY = 0.6
BANDWIDTH = 3.0e12
# Seconds of compilation allowed for a provider's first row (later rows: a tenth of it).
COMPILE_S = {"torch.compile": 45.0, "cce": 30.0, "liger": 15.0, "xentkit:triton": 10.0}
DEFAULT_COMPILE_S = 5.0
# Seconds a row's warm calls may take; its repeats are cut to fit (at least one).
ROW_CAP_S = 12.0
# The benchmark's own share of gpu.sh's 8 minutes (the rest: venv, installs, CUDA start-up).
DEFAULT_BUDGET_S = 390.0
DEFAULT_WARMUP, DEFAULT_REPEATS = 2, 5
DRY_WARMUP, DRY_REPEATS = 1, 2
# Rows of the chunked torch reference at a time (its float32 logits: rows x V x 4 bytes).
REFERENCE_ROWS = 2048


@dataclass(frozen=True)
class Case:
    """One shape of one kind: ``linear`` (h, W, target) or ``ce`` (logits, target)."""

    kind: str
    n: int
    d: int
    v: int

    @property
    def label(self) -> str:
        """``N=8192 D=4096 V=128256`` (``N=8192 V=128256`` for plain cross entropy)."""
        if self.kind == "ce":
            return f"N={self.n} V={self.v}"
        return f"N={self.n} D={self.d} V={self.v}"

    def seconds_per_call(self, provider: str) -> float:
        """The time model's estimate of one forward + backward."""
        logits = self.n * self.v
        if self.kind == "ce":
            # read logits, write the gradient (torch: float32 copies and their gradient too)
            traffic = (30 if provider.startswith("torch") else 8) * logits
            return traffic / BANDWIDTH
        flops = 6 * self.n * self.d * self.v
        traffic = (24 if provider.startswith("torch") else 4) * logits
        slow = 3.0 if provider == "xentkit:triton" else 1.0  # untuned tiles, atomic adds
        return slow * flops / (PEAK_TFLOPS * 1e12 * EFFICIENCY) + traffic / BANDWIDTH


def estimate_seconds(cases: list[Case], providers: dict[str, tuple[str, ...]], calls: int) -> float:
    """The time model's estimate of a whole run: every row's calls, the references and the
    compilations (not the installs of gpu.sh)."""
    total, seen = 0.0, set()
    for case in cases:
        if case.kind == "linear":
            # the chunked reference: logits in bfloat16, gradient products in float32
            total += 4 * case.n * case.d * case.v / (FP32_TFLOPS * 1e12) + 1.0
        for provider in providers[case.kind]:
            first = COMPILE_S.get(provider, DEFAULT_COMPILE_S)
            total += first if (case.kind, provider) not in seen else first / 10
            seen.add((case.kind, provider))
            total += calls * case.seconds_per_call(provider)
    return total


# --------------------------------------------------------------------------------- providers


class NotAvailable(Exception):
    """A provider that cannot run here: its status (``not installed``, ``needs CUDA``)."""

    def __init__(self, status: str, note: str) -> None:
        super().__init__(note)
        self.status, self.note = status, note


def _peer(provider: str, device):
    """The peer's loss module or function, or :class:`NotAvailable`."""
    package = {"liger": "liger-kernel", "cce": "cut-cross-entropy"}[provider]
    try:
        if provider == "liger":
            from liger_kernel.transformers import (
                LigerCrossEntropyLoss,
                LigerFusedLinearCrossEntropyLoss,
            )

            found = (LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss)
        else:
            from cut_cross_entropy import linear_cross_entropy

            found = linear_cross_entropy
    except Exception as error:  # ImportError, or a peer that fails at import without a GPU
        raise NotAvailable("not installed", f"{package}: {error}") from error
    if device.type != "cuda":
        raise NotAvailable("needs CUDA", f"{package} runs on CUDA only (dry run: skipped)")
    return found


@dataclass
class Setup:
    """What a row times: ``step()`` runs forward + backward and returns ``(loss, grads)``."""

    step: Callable[[], tuple]
    inputs_bytes: int
    backend: str | None = None
    parity: bool = True


def _torch_linear(h, w, target):
    return F.cross_entropy(F.linear(h, w).float(), target)


def _torch_ce(logits, target):
    return F.cross_entropy(logits.float(), target)


_COMPILED: dict[tuple[str, str], Callable] = {}


def _compiled(kind: str, backend: str) -> Callable:
    """One ``torch.compile(dynamic=True)`` per kind for the whole run, so shapes share it."""
    if (kind, backend) not in _COMPILED:
        fn = _torch_linear if kind == "linear" else _torch_ce
        _COMPILED[kind, backend] = torch.compile(fn, dynamic=True, backend=backend)
    return _COMPILED[kind, backend]


def linear_inputs(case: Case, device, dtype, seed: int = 0):
    """Hidden states, a classifier scaled like an initialised ``nn.Linear``, targets."""
    gen = torch.Generator(device).manual_seed(seed)
    h = torch.randn(case.n, case.d, generator=gen, device=device, dtype=dtype)
    w = torch.randn(case.v, case.d, generator=gen, device=device, dtype=dtype)
    w.mul_(case.d**-0.5)
    target = torch.randint(case.v, (case.n,), generator=gen, device=device)
    return h, w, target


def ce_logits(case: Case, device, dtype, seed: int = 1):
    """Logits of the spread an LM head gives (standard deviation 2), and targets."""
    gen = torch.Generator(device).manual_seed(seed)
    logits = torch.randn(case.n, case.v, generator=gen, device=device, dtype=dtype).mul_(2)
    target = torch.randint(case.v, (case.n,), generator=gen, device=device)
    return logits, target


def setup(provider: str, case: Case, inputs: tuple, options: argparse.Namespace) -> Setup:
    """The step of ``provider`` on ``inputs`` (``(h, w, target)`` or ``(logits, target)``)."""
    name, _, forced = provider.partition(":")
    dry = options.device.type != "cuda"
    size = sum(t.nbytes for t in inputs)
    if name in PEERS_NEEDING_CUDA:
        peer = _peer(name, options.device)
    if case.kind == "linear":
        h, w, target = inputs
        if name == "floor":
            # The logits stand in for their gradient G: same shape, same products.
            def floor():
                logits = h @ w.T
                return None, (logits @ w, logits.T @ h)

            return Setup(floor, size, parity=False)
        h.requires_grad_(True)
        w.requires_grad_(True)
        backend = forced or None
        if name == "xentkit":
            # The dry run forces what CUDA picks by default, so that its code paths run.
            backend = backend or (
                resolve_backend(None, "linear_cross_entropy", CUDA) if dry else None
            )

            def loss_fn(h, w, target):
                return xentkit.linear_cross_entropy(h, w, target, backend=backend)

            label = backend or resolve_backend(None, "linear_cross_entropy", h.device)
            if label == "chunked":
                label = "chunked, Triton rows" if _triton_rows(h.device) else "chunked"
        elif name == "torch":
            loss_fn, label = _torch_linear, None
        elif name == "torch.compile":
            loss_fn, label = _compiled("linear", options.compile_backend), None
        elif name == "liger":
            module = peer[1]()

            def loss_fn(h, w, target):
                return module(w, h, target)

            label = None
        elif name == "cce":

            def loss_fn(h, w, target):
                return peer(h, w, target, impl="cce")

            label = None
        else:
            raise ValueError(f"unknown linear provider {provider!r}")
        return Setup(lambda: _grads(loss_fn(h, w, target), (h, w)), size, label)

    logits, target = inputs
    logits.requires_grad_(True)
    label = None
    if name.startswith("xentkit"):
        inplace = name == "xentkit-inplace"
        backend = forced or ("triton" if dry else None)
        label = backend or resolve_backend(None, "cross_entropy", CUDA)

        def loss_fn(x, t):
            return xentkit.cross_entropy(x, t, backend=backend, inplace_backward=inplace)

    elif name == "torch":
        loss_fn = _torch_ce
    elif name == "torch.compile":
        loss_fn = _compiled("ce", options.compile_backend)
    elif name == "liger":
        loss_fn = peer[0]()
    else:
        raise ValueError(f"unknown ce provider {provider!r}")
    return Setup(lambda: _grads(loss_fn(logits, target), (logits,)), size, label)


def _grads(loss, inputs):
    return loss.detach(), torch.autograd.grad(loss, inputs)


def _triton_rows(device) -> bool:
    """Whether the chunked linear cross entropy runs Triton's row kernel on ``device``."""
    if linear_chunked.ROW_KERNEL is not None:
        return linear_chunked.ROW_KERNEL == "triton"
    return device.type == "cuda" and linear_chunked._TRITON_INSTALLED


# --------------------------------------------------------------------------------- parity


def linear_reference(h, w, target):
    """torch's loss (float32 softmax of the bfloat16 logits, mean) and float32 gradients of
    ``h`` and ``w``, :data:`REFERENCE_ROWS` tokens at a time."""
    n = h.shape[0]
    grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device)
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    w32 = w.detach().float()
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    for start in range(0, n, REFERENCE_ROWS):
        rows = slice(start, start + REFERENCE_ROWS)
        hc = h.detach()[rows]
        logits = F.linear(hc, w.detach()).float().requires_grad_(True)
        loss = F.cross_entropy(logits, target[rows], reduction="sum")
        (g,) = torch.autograd.grad(loss, logits)
        g /= n
        torch.mm(g, w32, out=grad_h[rows])
        grad_w.addmm_(g.T, hc.float())
        total += loss.detach().double()
        del logits, loss, g
    return (total / n).float(), (grad_h, grad_w)


def _relative(got, want) -> float:
    """``|got - want| / |want|`` (norm-wise for tensors), in float32, a slice at a time."""
    num = den = 0.0
    step = max(1, (1 << 26) // max(1, want[0].numel())) if want.dim() else 1
    for start in range(0, max(1, want.shape[0] if want.dim() else 1), step):
        a = got[start : start + step] if want.dim() else got
        b = want[start : start + step] if want.dim() else want
        diff = a.float() - b.float()
        num += float(diff.square().sum())
        den += float(b.float().square().sum())
    return (num / den) ** 0.5 if den else float(num > 0)


def ce_parity(case: Case, device, dtype, loss, grad) -> tuple[float, float]:
    """Relative errors of a plain cross entropy's loss and gradient against torch's on
    freshly made (identical) logits, :data:`REFERENCE_ROWS` rows at a time."""
    logits, target = ce_logits(case, device, dtype)
    total = torch.zeros((), dtype=torch.float64, device=device)
    num = den = 0.0
    for start in range(0, case.n, REFERENCE_ROWS):
        rows = slice(start, start + REFERENCE_ROWS)
        x = logits[rows].float().requires_grad_(True)
        part = F.cross_entropy(x, target[rows], reduction="sum")
        (g,) = torch.autograd.grad(part, x)
        g /= case.n
        num += float((grad[rows].float() - g).square().sum())
        den += float(g.square().sum())
        total += part.detach().double()
    want = float(total / case.n)
    return abs(float(loss) - want) / abs(want), (num / den) ** 0.5


# --------------------------------------------------------------------------------- one row


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(step, device) -> float:
    """Seconds of one call: CUDA events on a GPU (after the queue is empty), else wall clock."""
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = step()
        end.record()
        torch.cuda.synchronize()
        del out
        return start.elapsed_time(end) / 1000
    begin = time.perf_counter()
    out = step()
    elapsed = time.perf_counter() - begin
    del out
    return elapsed


def _peak_call(step, device) -> tuple[float, int | None]:
    """One call's seconds and the bytes it allocated at its peak over what was allocated
    before (None off CUDA)."""
    if device.type != "cuda":
        return _timed(step, device), None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    seconds = _timed(step, device)
    return seconds, torch.cuda.max_memory_allocated() - before


def summarize(seconds: list[float]) -> dict[str, float]:
    """Median, 20th and 80th percentiles in milliseconds.

    Example:
        >>> summarize([0.001, 0.002, 0.003, 0.004, 0.005])
        {'median': 3.0, 'p20': 1.8, 'p80': 4.2}
    """
    ms = [s * 1000 for s in seconds]
    if len(ms) < 2:
        return {"median": round(ms[0], 4), "p20": round(ms[0], 4), "p80": round(ms[0], 4)}
    cuts = statistics.quantiles(ms, n=5, method="inclusive")
    values = (statistics.median(ms), cuts[0], cuts[3])
    return {key: round(v, 4) for key, v in zip(("median", "p20", "p80"), values, strict=True)}


def measure(
    provider: str, case: Case, inputs: tuple, reference, options: argparse.Namespace
) -> dict:
    """One row: status, times (ms), memory (MiB) and parity, as described in the module."""
    device, dtype = options.device, options.dtype
    bench = setup(provider, case, inputs, options)
    row: dict = {"backend": bench.backend}
    begin = time.perf_counter()
    loss, grads = bench.step()
    _sync(device)
    row["first_call_s"] = round(time.perf_counter() - begin, 3)
    if bench.parity:
        if case.kind == "linear":
            want_loss, want_grads = reference
            row["loss_rel_err"] = _relative(loss, want_loss)
            row["grad_rel_err"] = {
                name: _relative(got, want)
                for name, got, want in zip(("input", "weight"), grads, want_grads, strict=True)
            }
        else:
            loss_err, grad_err = ce_parity(case, device, dtype, loss, grads[0])
            row["loss_rel_err"], row["grad_rel_err"] = loss_err, {"input": grad_err}
    del loss, grads
    seconds, extra = _peak_call(bench.step, device)
    row["extra_mib"] = None if extra is None else round(extra / 2**20, 1)
    row["peak_mib"] = None if extra is None else round((extra + bench.inputs_bytes) / 2**20, 1)
    # The warm calls left fit in ROW_CAP_S, at least one timed.
    fits = int(ROW_CAP_S / max(seconds, 1e-6)) - (options.warmup - 1)
    repeats = max(1, min(options.repeats, fits))
    for _ in range(options.warmup - 1):
        _timed(bench.step, device)
    row["repeats"] = repeats
    row.update(summarize([_timed(bench.step, device) for _ in range(repeats)]))
    return row


def run_row(provider: str, case: Case, make: Callable, reference, options) -> dict:
    """:func:`measure` on inputs from ``make``, with a peer that cannot run, runs out of memory
    or fails turned into a row with that status."""
    row = {"kind": case.kind, "case": case.label, "n": case.n, "d": case.d, "v": case.v}
    row.update(dtype=str(options.dtype).removeprefix("torch."), provider=provider)
    try:
        inputs = make(case, options.device, options.dtype)
        row.update(measure(provider, case, inputs, reference, options), status="ok", note="")
    except NotAvailable as error:
        row.update(status=error.status, note=error.note)
    except torch.OutOfMemoryError as error:
        row.update(status="OOM", note=str(error).splitlines()[0][:200])
    except Exception as error:  # a peer's bug must not end the run: the row says what happened
        row.update(status="error", note=f"{type(error).__name__}: {str(error)[:300]}")
    return row


def _release(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------- the run


def machine(device) -> dict:
    """What the numbers were measured on."""

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    info = {
        "device": device.type,
        "gpu": None,
        "gpu_memory_gib": None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": version("triton"),
        "liger_kernel": version("liger-kernel"),
        "cut_cross_entropy": version("cut-cross-entropy"),
        "xentkit": xentkit.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return info


def run(options: argparse.Namespace, command: str) -> dict:
    """Every row, within the budget; the results as written to ``gpu.json``."""
    start = time.perf_counter()
    device, dtype = options.device, options.dtype
    providers = {"linear": options.linear_providers, "ce": options.ce_providers}
    cases = [Case(kind, n, d, v) for n, d, v in options.shapes for kind in ("linear", "ce")]
    calls = options.warmup + options.repeats + 1
    estimate = estimate_seconds(cases, providers, calls)
    # What the default run (the four LLM shapes, every provider) takes by the time model.
    full_cases = [Case(kind, n, d, v) for n, d, v in SHAPES for kind in ("linear", "ce")]
    everyone = {"linear": LINEAR_PROVIDERS, "ce": CE_PROVIDERS}
    full_estimate = estimate_seconds(full_cases, everyone, DEFAULT_WARMUP + DEFAULT_REPEATS + 1)
    print(
        f"time model (H100/H200): this run {estimate:.0f} s, the default GPU run "
        f"{full_estimate:.0f} s; budget {options.budget:.0f} s"
    )
    rows, notes, seen = [], [], set()
    for case in cases:
        if not providers[case.kind]:
            continue
        # Every row gets fresh inputs from the same seed (in-place peers overwrite theirs);
        # nothing but the linear reference's gradients is held between rows.
        make = linear_inputs if case.kind == "linear" else ce_logits
        reference = None
        wanted = any(p != "floor" for p in providers["linear"])
        in_time = time.perf_counter() - start < options.budget
        if case.kind == "linear" and wanted and in_time:
            reference = linear_reference(*make(case, device, dtype))
            _release(device)
        for provider in providers[case.kind]:
            first = COMPILE_S.get(provider, DEFAULT_COMPILE_S)
            first = first / 10 if (case.kind, provider) in seen else first
            need = first + 2 * case.seconds_per_call(provider)
            if time.perf_counter() - start + need > options.budget:
                row = {"kind": case.kind, "case": case.label, "n": case.n, "d": case.d}
                row.update(v=case.v, dtype=str(dtype).removeprefix("torch."), provider=provider)
                row.update(status="skipped", note=f"time budget ({options.budget:.0f} s)")
            else:
                seen.add((case.kind, provider))
                row = run_row(provider, case, make, reference, options)
            _release(device)
            rows.append(row)
            print(_line(row), flush=True)
        del reference
        _release(device)
    skipped = sum(row["status"] == "skipped" for row in rows)
    if skipped:
        notes.append(f"{skipped} rows skipped to stay within the {options.budget:.0f} s budget")
    if options.dry_run:
        notes.append(
            "dry run on CPU (TRITON_INTERPRET=1, tiny shapes): the numbers mean nothing; "
            "peers that need CUDA are skipped"
        )
    return {
        "suite": "gpu",
        "title": "xentkit against torch, torch.compile, Liger Kernel and CCE on one GPU, "
        "forward + backward",
        "command": command,
        "machine": machine(device),
        "settings": {
            "dtype": str(dtype).removeprefix("torch."),
            "repeats": options.repeats,
            "warmup": options.warmup,
            "budget_s": options.budget,
            "compile_backend": options.compile_backend,
            "dry_run": options.dry_run,
            "peak_tflops": PEAK_TFLOPS,
            "efficiency": EFFICIENCY,
        },
        "estimate_s": round(estimate, 1),
        "gpu_estimate_s": round(full_estimate, 1),
        "elapsed_s": round(time.perf_counter() - start, 1),
        "notes": notes,
        "rows": rows,
    }


def _line(row: dict) -> str:
    head = f"{row['kind']:6} {row['case']:26} {row['provider']:15}"
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row['note']}"
    return (
        f"{head} {row['median']:10.3f} ms  peak {row['peak_mib']} MiB  "
        f"loss err {row.get('loss_rel_err', float('nan')):.1e}  first {row['first_call_s']} s"
    )


# --------------------------------------------------------------------------------- outputs


def _ratio(row: dict, other: dict | None) -> str:
    if row["status"] != "ok" or not other or other["status"] != "ok":
        return "—"
    return f"{row['median'] / other['median']:.2f}×"


def markdown(data: dict) -> str:
    """The tables for RESULTS.md, made from the JSON."""
    info = data["machine"]
    where = info["gpu"] or "CPU (dry run)"
    lines = [
        f"{where}, torch {info['torch']}, CUDA {info['cuda']}, triton {info['triton']}, "
        f"liger-kernel {info['liger_kernel']}, cut-cross-entropy {info['cut_cross_entropy']}, "
        f"{info['date']}; `{data['command']}`; median of {data['settings']['repeats']} "
        f"(fewer where a row would pass {ROW_CAP_S:.0f} s); {data['elapsed_s']:.0f} s in all.",
        "",
    ]
    for kind, title in (("linear", "Linear cross entropy"), ("ce", "Plain cross entropy")):
        rows = [row for row in data["rows"] if row["kind"] == kind]
        if not rows:
            continue
        lines += [
            f"**{title}**, {data['settings']['dtype']}, forward + backward",
            "",
            "| case | provider | time | × torch | × floor | peak MiB (extra) | loss err | "
            "grad err (input / weight) |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in rows:
            same = {r["provider"]: r for r in rows if r["case"] == row["case"]}
            name = row["provider"] + (f" [{row['backend']}]" if row.get("backend") else "")
            if row["status"] != "ok":
                lines.append(f"| {row['case']} | {name} | {row['status']} | | | | | |")
                continue
            peak = (
                "—"
                if row["peak_mib"] is None
                else f"{row['peak_mib']:,.0f} ({row['extra_mib']:,.0f})"
            )
            errs = row.get("grad_rel_err") or {}
            grad = " / ".join(f"{v:.1e}" for v in errs.values()) or "—"
            loss = f"{row['loss_rel_err']:.1e}" if "loss_rel_err" in row else "—"
            lines.append(
                f"| {row['case']} | {name} | {row['median']:.2f} ms | "
                f"{_ratio(row, same.get('torch'))} | {_ratio(row, same.get('floor'))} | {peak} | "
                f"{loss} | {grad} |"
            )
        lines.append("")
    lines += [f"- {note}" for note in data["notes"]]
    return "\n".join(lines).rstrip() + "\n"


def plot(data: dict, path: Path) -> Path | None:
    """Time (log scale) and peak memory per case and provider, one column per kind; a row
    that did not run has its status where its bar would be. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    kinds = list(dict.fromkeys(row["kind"] for row in data["rows"]))
    fig, axes = plt.subplots(2, max(1, len(kinds)), figsize=(7 * len(kinds), 8), squeeze=False)
    for col, kind in enumerate(kinds):
        rows = [row for row in data["rows"] if row["kind"] == kind]
        cases = list(dict.fromkeys(row["case"] for row in rows))
        providers = list(dict.fromkeys(row["provider"] for row in rows))
        width = 0.8 / len(providers)
        for ax, key, unit in ((axes[0][col], "median", "ms"), (axes[1][col], "peak_mib", "MiB")):
            for j, provider in enumerate(providers):
                for i, case in enumerate(cases):
                    row = next(r for r in rows if r["case"] == case and r["provider"] == provider)
                    x = i + (j - len(providers) / 2 + 0.5) * width
                    value = row.get(key) if row["status"] == "ok" else None
                    if value:
                        ax.bar(x, value, width, color=f"C{j}", label=None if i else provider)
                    else:
                        text = "n/a" if row["status"] == "ok" else row["status"]
                        ax.text(x, 0.02, text, rotation=90, fontsize=6, ha="center",
                                transform=ax.get_xaxis_transform())  # fmt: skip
            ax.set_xlim(-0.5, len(cases) - 0.5)
            ax.set_xticks(range(len(cases)), cases, fontsize=7)
            ax.set_ylabel(f"{'time' if key == 'median' else 'peak memory'} ({unit})")
            if key == "median" and any(r.get("median") for r in rows):
                ax.set_yscale("log")
        axes[0][col].set_title(f"{kind}, {data['settings']['dtype']}", fontsize=9)
        axes[0][col].legend(fontsize=7, ncols=2)
    fig.suptitle(f"{data['title']} ({data['machine']['gpu'] or 'CPU dry run'})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(data: dict, out: Path) -> dict[str, Path]:
    """``gpu.json``, ``gpu.png`` (when matplotlib is there) and ``gpu.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "gpu.json", "md": out / "gpu.md"}
    partial = paths["json"].with_suffix(".tmp")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    partial.replace(paths["json"])
    paths["md"].write_text(markdown(data))
    png = plot(data, out / "gpu.png")
    if png is not None:
        paths["png"] = png
    return paths


# --------------------------------------------------------------------------------- command line


def _shapes(text: str) -> list[tuple[int, int, int]]:
    try:
        shapes = [tuple(int(x) for x in item.lower().split("x")) for item in text.split(",")]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"shapes are NxDxV, comma-separated: {text!r}") from error
    if any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"shapes are NxDxV, comma-separated: {text!r}")
    return shapes


def _names(known: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        unknown = [n for n in names if n not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}: choose from {', '.join(known)}")
        return names

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_gpu",
        description=__doc__.split("\n\n")[0],
        epilog="Linear providers: "
        + ", ".join(LINEAR_PROVIDERS)
        + "; ce providers: "
        + ", ".join(CE_PROVIDERS)
        + ".",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU, TRITON_INTERPRET=1, tiny shapes, CUDA-only peers skipped",
    )
    p.add_argument("--shapes", type=_shapes, help="NxDxV,... (default: the four LLM shapes)")
    p.add_argument("--linear-providers", type=_names(LINEAR_PROVIDERS), default=LINEAR_PROVIDERS)
    p.add_argument("--ce-providers", type=_names(CE_PROVIDERS), default=CE_PROVIDERS)
    p.add_argument("--repeats", type=int, help="timed calls per row (default 5; dry run 2)")
    p.add_argument(
        "--warmup",
        type=int,
        help="warm-up calls, the first measuring peak memory (default 2; dry run 1)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"seconds the rows may take in all (default {DEFAULT_BUDGET_S:.0f})",
    )
    p.add_argument(
        "--compile-backend", help="torch.compile backend (default inductor; eager in a dry run)"
    )
    p.add_argument(
        "--out", type=Path, help=f"results folder (default {DEFAULT_OUT}; dry run: {DRY_OUT})"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs the GPU suite; 1 when no GPU is found (without --dry-run) or a row failed."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    options = parser().parse_args(arguments)
    if options.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:  # too late to switch Triton to its interpreter here
            import subprocess

            env = dict(os.environ, TRITON_INTERPRET="1")
            script = [sys.executable, str(Path(__file__).resolve()), *arguments]
            return subprocess.run(script, env=env).returncode
        os.environ["TRITON_INTERPRET"] = "1"
    if options.dry_run:
        # What CUDA would run: the chunks' row pass through Triton (interpreted here).
        linear_chunked.ROW_KERNEL = "triton"
        options.device = torch.device("cpu")
    elif torch.cuda.is_available():
        options.device = torch.device("cuda")
    else:
        print("no CUDA GPU here: run on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 1
    options.dtype = torch.bfloat16
    options.shapes = options.shapes or (DRY_SHAPES if options.dry_run else SHAPES)
    options.compile_backend = options.compile_backend or (
        "eager" if options.dry_run else "inductor"
    )
    dry = options.dry_run
    options.warmup = max(1, options.warmup or (DRY_WARMUP if dry else DEFAULT_WARMUP))
    options.repeats = max(1, options.repeats or (DRY_REPEATS if dry else DEFAULT_REPEATS))
    out = options.out or (DRY_OUT if options.dry_run else DEFAULT_OUT)
    command = shlex.join(["python", "benchmarks/bench_gpu.py", *arguments])
    data = run(options, command)
    paths = write(data, out)
    print()
    print(markdown(data))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 1 if any(row["status"] == "error" for row in data["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
