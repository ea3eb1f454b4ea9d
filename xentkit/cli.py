"""The ``xentkit`` command: ``explain`` a loss, ``check`` xentkit against PyTorch, ``bench``.

Examples::

    xentkit explain "[[1, 0.5, 2], [0.5, 3, 1]]" "[2, 1]"
    xentkit explain logits.pt targets.npy --loss ce --dim -1 --format json
    xentkit explain logits.pt targets.pt --grad --format html --plot loss.png
    xentkit check --seed 0 --cases 300
    xentkit bench --help

Also ``python -m xentkit``. Exit codes: 0 success, 1 a failed check, 2 bad input or usage.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import xentkit
from xentkit.explain import LOSSES, OPTIONS

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit code 2."""


def main(argv: list[str] | None = None) -> int:
    """Run the ``xentkit`` command with ``argv`` (``sys.argv[1:]`` when None); returns the
    exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after "bench", --help included, is run.py's
        return bench(argv[1:])
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, RuntimeError, IndexError, TypeError) as error:
        print(f"xentkit {args.command}: error: {error}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xentkit",
        description="The cross-entropy family for PyTorch: explain a loss term by term, check "
        "xentkit against torch.nn.functional, run the benchmarks.",
        epilog='Example: xentkit explain "[[1, 0.5, 2], [0.5, 3, 1]]" "[2, 1]"',
    )
    parser.add_argument("--version", action="version", version=f"xentkit {xentkit.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    explain = commands.add_parser(
        "explain",
        help="show a loss term by term (softmax, log-probabilities, weights, reduction) and "
        "the mistakes it can see",
        description="Explain a loss term by term: per position the logits, max, logsumexp, "
        "softmax, target, picked log-probability, weight and loss; then the reduction and the "
        "final value, which equals xentkit's own result; then the likely mistakes.",
    )
    explain.add_argument(
        "logits",
        metavar="LOGITS",
        help='the input: a JSON-like literal such as "[[1, 0.5, 2], [0.5, 3, 1]]" (inf and '
        "nan allowed) or a .pt (torch.save of a tensor) or .npy file",
    )
    explain.add_argument(
        "targets",
        metavar="TARGETS",
        help='the target, the same way ("[2, 1]"); whole numbers written without a decimal '
        "point are class indices for ce/nll, anything else is floating point",
    )
    explain.add_argument(
        "--loss",
        choices=["ce", "nll", "bce", "bce-logits"],
        default="ce",
        help="cross_entropy on logits (default), nll_loss on log-probabilities, "
        "binary_cross_entropy on probabilities, binary_cross_entropy_with_logits",
    )
    explain.add_argument("--reduction", choices=["mean", "sum", "none"], default="mean")
    explain.add_argument(
        "--weight",
        metavar="JSON",
        help='class weights (ce, nll) or element weights (bce, bce-logits), e.g. "[1, 2, 1]"',
    )
    explain.add_argument("--pos-weight", metavar="JSON", help="positive-class weights (bce-logits)")
    explain.add_argument("--ignore-index", type=int, help="target value to skip (ce, nll)")
    explain.add_argument("--label-smoothing", type=float, help="in [0, 1] (ce)")
    explain.add_argument("--z-loss", type=float, help="weight of logsumexp² per position (ce)")
    explain.add_argument("--softcap", type=float, help="logits become c·tanh(logits / c) (ce)")
    explain.add_argument(
        "--dim",
        type=int,
        help="the class dimension of LOGITS when it is not PyTorch's (dim 1, or 0 for one "
        "row), e.g. --dim -1 for (N, T, C); it is moved to dim 1 first",
    )
    explain.add_argument(
        "--dtype",
        choices=list(DTYPES),
        help="dtype of LOGITS (literals default to float32, files keep theirs)",
    )
    explain.add_argument(
        "--format",
        choices=["text", "markdown", "html", "json"],
        default="text",
        help="text (a table; rich on a terminal), markdown, html (a styled table, no "
        "JavaScript) or json",
    )
    explain.add_argument(
        "--grad",
        action="store_true",
        help="add each shown position's gradient with respect to its input, and why",
    )
    explain.add_argument(
        "--plot",
        metavar="PNG",
        type=Path,
        help="also draw the explanation into this image (needs matplotlib: "
        "pip install 'xentkit[plot]')",
    )
    explain.add_argument("--max-rows", type=int, default=8, help="positions shown (default 8)")
    explain.add_argument(
        "--max-classes", type=int, default=8, help="classes shown per vector (default 8)"
    )
    explain.set_defaults(run=_explain)

    check = commands.add_parser(
        "check",
        help="compare xentkit with torch.nn.functional on random inputs, values and gradients",
        description="Run xentkit and torch.nn.functional side by side on seeded random inputs "
        "of every supported form (softmax, log_softmax, nll_loss, cross_entropy with index, "
        "one-hot and probability targets, binary_cross_entropy, "
        "binary_cross_entropy_with_logits, linear_cross_entropy; (C), (N, C) and (N, C, d1, "
        "...) layouts; weights, ignore_index, label smoothing, every reduction; float32 and "
        "float64), compare values and gradients, print a table; exit code 1 on any failure.",
    )
    check.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    check.add_argument("--cases", type=int, default=300, help="number of cases (default 300)")
    check.add_argument(
        "--backend",
        choices=list(xentkit.functional.BACKENDS),
        help="force a backend for cross_entropy and linear_cross_entropy (default: by device)",
    )
    check.set_defaults(run=_check)

    commands.add_parser(
        "bench",
        help="run the benchmarks (benchmarks/run.py of a source checkout); all arguments are "
        "passed through, see xentkit bench --help",
        add_help=False,
    )
    return parser


# --------------------------------------------------------------------------------------------
# explain


def _explain(args: argparse.Namespace) -> int:
    loss = LOSSES[args.loss]
    index_targets = loss in ("cross_entropy", "nll_loss")
    dtype = DTYPES[args.dtype] if args.dtype else None
    logits = load_tensor(args.logits, "LOGITS", dtype or torch.float32)
    if dtype is not None or not logits.is_floating_point():
        logits = logits.to(dtype or torch.float32)
    target = load_tensor(args.targets, "TARGETS", logits.dtype)
    if not index_targets or target.is_floating_point():
        target = target.to(logits.dtype)
    elif target.dtype != torch.uint8:  # torch takes Byte indices as they are
        target = target.long()
    options: dict[str, Any] = {"reduction": args.reduction}
    for key in ("ignore_index", "label_smoothing", "z_loss", "softcap", "weight", "pos_weight"):
        value, flag = getattr(args, key), "--" + key.replace("_", "-")
        if value is None:
            continue
        if key not in OPTIONS[loss]:
            takes = ", ".join("--" + k.replace("_", "-") for k in OPTIONS[loss])
            raise UsageError(f"{flag} does not apply to --loss {args.loss}, which takes {takes}.")
        is_tensor = key in ("weight", "pos_weight")
        options[key] = (
            load_tensor(value, flag, logits.dtype).to(logits.dtype) if is_tensor else value
        )

    explanation = xentkit.explain(
        logits,
        target,
        loss,
        class_dim=args.dim,
        max_rows=args.max_rows,
        max_classes=args.max_classes,
        grad=args.grad,
        **options,
    )
    if args.plot is not None:
        try:
            figure = explanation.plot()
        except ImportError as error:
            raise UsageError(str(error)) from error
        figure.savefig(args.plot, dpi=110)
    if args.format == "json":
        print(json.dumps(explanation.to_dict(), indent=2, ensure_ascii=False))
    elif args.format == "markdown":
        print(explanation.to_markdown())
    elif args.format == "html":
        print(explanation.to_html())
    elif sys.stdout.isatty():
        from rich.console import Console

        Console().print(explanation)
    else:
        print(explanation.to_text())
    return 0


# inf, -inf and nan written the way Python and NumPy print them, as JSON spells them
_NON_FINITE = [
    (re.compile(r"(?<![\w.])inf(inity)?(?!\w)", re.IGNORECASE), "Infinity"),
    (re.compile(r"(?<![\w.])nan(?!\w)", re.IGNORECASE), "NaN"),
]


def load_tensor(text: str, what: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """A tensor from a JSON-like literal or a ``.pt``/``.npy`` file (which keeps its dtype).
    Whole numbers written without a decimal point give a long tensor, other literals ``dtype``.

    Example:
        >>> load_tensor("[[1, 0.5], [inf, 2]]", "LOGITS")
        tensor([[1.0000, 0.5000],
                [   inf, 2.0000]])
        >>> load_tensor("[2, 1]", "TARGETS")
        tensor([2, 1])
    """
    path = Path(text)
    if path.suffix in (".pt", ".pth", ".npy"):
        return _load_file(path, what)
    literal = text
    for pattern, spelling in _NON_FINITE:
        literal = pattern.sub(spelling, literal)
    try:
        value = json.loads(literal)
        if not _numbers_only(value):
            raise ValueError("only numbers and nested lists are allowed")
        is_int = _integers_only(value)
        return torch.tensor(value, dtype=torch.long if is_int else dtype)
    except (ValueError, TypeError, RuntimeError) as error:
        raise UsageError(
            f'{what} {text!r} is neither a JSON list of numbers (e.g. "[[1, 0.5, 2], [0.5, '
            f'3, 1]]", all rows the same length) nor a .pt/.npy file: {error}'
        ) from error


def _numbers_only(value: Any) -> bool:
    if isinstance(value, list):
        return all(_numbers_only(v) for v in value)
    return isinstance(value, int | float) and not isinstance(value, bool)


def _integers_only(value: Any) -> bool:
    if isinstance(value, list):
        return all(_integers_only(v) for v in value)
    return isinstance(value, int)


def _load_file(path: Path, what: str) -> Tensor:
    if not path.is_file():
        raise UsageError(f"{what}: file {str(path)!r} not found.")
    try:
        if path.suffix == ".npy":
            import numpy as np

            return torch.from_numpy(np.load(path, allow_pickle=False).copy())
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file: say which and why, not a traceback
        raise UsageError(f"{what}: could not read {str(path)!r}: {error}") from error
    if not isinstance(value, Tensor):
        raise UsageError(
            f"{what}: {str(path)!r} holds a {type(value).__name__}, not a tensor; save the "
            "tensor itself with torch.save(tensor, path)."
        )
    return value


# --------------------------------------------------------------------------------------------
# check

# Largest relative error accepted, by dtype: float64 agrees to rounding, float32 to ~1e-6.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5}


@dataclass
class Case:
    """One comparison: the same call made through xentkit and through torch."""

    function: str  # the row of the report, e.g. "cross_entropy (index)"
    description: str  # shapes and options, enough to reproduce it
    dtype: torch.dtype
    inputs: list[Tensor]  # the leaves whose gradients are compared
    ours: Callable[..., Tensor]
    theirs: Callable[..., Tensor]


@dataclass
class CaseResult:
    case: Case
    value_error: float
    grad_error: float
    error: str | None  # an exception raised by either side

    @property
    def ok(self) -> bool:
        tol = TOLERANCES[self.case.dtype]
        return self.error is None and self.value_error <= tol and self.grad_error <= tol


def relative_error(ours: Tensor, theirs: Tensor) -> float:
    """Largest elementwise difference over the largest magnitude; NaN and inf must match
    exactly, position by position.

    Example:
        >>> nan = float("nan")
        >>> round(relative_error(torch.tensor([1.0, 2.0, nan]), torch.tensor([1.0, 2.002, nan])), 4)
        0.001
    """
    a, b = ours.detach().double(), theirs.detach().double()
    if a.shape != b.shape:
        return math.inf
    finite = torch.isfinite(a)
    if not torch.equal(finite, torch.isfinite(b)):
        return math.inf
    # nan -> 0.5 and inf -> the largest double on both sides, so equal specials compare equal
    if not torch.equal(a[~finite].nan_to_num(0.5), b[~finite].nan_to_num(0.5)):
        return math.inf
    if not bool(finite.any()):
        return 0.0
    a, b = a[finite], b[finite]
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-30)
    return float((a - b).abs().max()) / scale


def run_case(case: Case, seed: int) -> CaseResult:
    """Values and gradients of both sides, the same random upstream gradient for each."""
    results = []
    try:
        for fn in (case.ours, case.theirs):
            leaves = [x.detach().clone().requires_grad_(True) for x in case.inputs]
            out = fn(*leaves)
            upstream = torch.randn(
                out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
            )
            (out * upstream.to(out.dtype)).sum().backward()
            grads = [torch.zeros_like(x) if x.grad is None else x.grad for x in leaves]
            results.append((out, grads))
    except Exception as error:  # a crash on either side is a failed case, reported as such
        return CaseResult(case, math.inf, math.inf, f"{type(error).__name__}: {error}")
    (ours, our_grads), (theirs, their_grads) = results
    grad_error = max(
        (relative_error(a, b) for a, b in zip(our_grads, their_grads, strict=True)), default=0.0
    )
    return CaseResult(case, relative_error(ours, theirs), grad_error, None)


class _Draw:
    """Random shapes and options for the check, from one seed."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)
        self.g = torch.Generator().manual_seed(seed)

    def randn(self, *shape: int, dtype: torch.dtype, scale: float = 1.0) -> Tensor:
        return torch.randn(shape, generator=self.g, dtype=dtype) * scale

    def rand(self, *shape: int, dtype: torch.dtype) -> Tensor:
        return torch.rand(shape, generator=self.g, dtype=dtype)

    def randint(self, high: int, shape: tuple[int, ...]) -> Tensor:
        return torch.randint(0, high, shape, generator=self.g)

    def layout(self) -> tuple[tuple[int, ...], int]:
        """An input shape, (C), (N, C), (N, C, d1) or (N, C, d1, d2), and its class dim."""
        n, c = self.r.randint(1, 6), self.r.randint(2, 9)
        extra = [self.r.randint(1, 4) for _ in range(self.r.choice([0, 0, 1, 2]))]
        if self.r.random() < 0.15:
            return (c,), 0
        return (n, c, *extra), 1

    def index_target(self, shape: tuple[int, ...], cdim: int) -> tuple[Tensor, int]:
        """Class indices for ``shape``, sometimes with some set to an ``ignore_index``."""
        num_classes = shape[cdim]
        target = self.randint(num_classes, shape[:cdim] + shape[cdim + 1 :])
        ignore_index = -100
        if self.r.random() < 0.3:
            ignore_index = self.r.choice([-100, self.r.randrange(num_classes)])
            mask = self.rand(*target.shape, dtype=torch.float32) < 0.3
            target = torch.where(mask, torch.full_like(target, ignore_index), target)
        return target, ignore_index


def check_cases(seed: int, count: int, backend: str | None = None) -> list[Case]:
    """``count`` seeded cases, cycling through every function and target form."""
    draw = _Draw(seed)
    makers = [
        _softmax_case,
        _nll_case,
        _cross_entropy_index_case,
        partial(_cross_entropy_probability_case, one_hot=True),
        partial(_cross_entropy_probability_case, one_hot=False),
        _bce_case,
        _bce_logits_case,
        _linear_case,
    ]
    return [makers[i % len(makers)](draw, backend) for i in range(count)]


def _dtype(draw: _Draw) -> torch.dtype:
    return draw.r.choice([torch.float32, torch.float64])


def _softmax_case(draw: _Draw, backend: str | None) -> Case:
    dtype = _dtype(draw)
    shape = tuple(draw.r.randint(1, 5) for _ in range(draw.r.randint(1, 4)))
    dim = draw.r.randrange(-len(shape), len(shape))
    name = draw.r.choice(["softmax", "log_softmax"])
    ours, theirs = getattr(xentkit, name), getattr(F, name)
    return Case(
        name,
        f"input {shape} {dtype}, dim={dim}",
        dtype,
        [draw.randn(*shape, dtype=dtype, scale=3.0)],
        lambda x: ours(x, dim=dim),
        lambda x: theirs(x, dim=dim),
    )


def _nll_case(draw: _Draw, backend: str | None) -> Case:
    dtype = _dtype(draw)
    shape, cdim = draw.layout()
    log_probs = torch.log_softmax(draw.randn(*shape, dtype=dtype), dim=cdim)
    target, ignore_index = draw.index_target(shape, cdim)
    weight = draw.rand(shape[cdim], dtype=dtype) + 0.1 if draw.r.random() < 0.5 else None
    kw = {"weight": weight, "ignore_index": ignore_index, "reduction": _reduction(draw)}
    return Case(
        "nll_loss",
        f"input {shape} {dtype}, {_describe(kw)}",
        dtype,
        [log_probs],
        lambda x: xentkit.nll_loss(x, target, **kw),
        lambda x: F.nll_loss(x, target, **kw),
    )


def _cross_entropy_index_case(draw: _Draw, backend: str | None) -> Case:
    dtype = _dtype(draw)
    shape, cdim = draw.layout()
    logits = draw.randn(*shape, dtype=dtype, scale=draw.r.choice([1.0, 5.0]))
    target, ignore_index = draw.index_target(shape, cdim)
    kw = _ce_options(draw, shape[cdim], dtype)
    kw["ignore_index"] = ignore_index
    return Case(
        "cross_entropy (index)",
        f"input {shape} {dtype}, {_describe(kw)}",
        dtype,
        [logits],
        lambda x: xentkit.cross_entropy(x, target, **kw, backend=backend),
        lambda x: F.cross_entropy(x, target, **kw),
    )


def _cross_entropy_probability_case(draw: _Draw, backend: str | None, one_hot: bool) -> Case:
    """Probability targets: one-hot rows as floats, or soft rows."""
    dtype = _dtype(draw)
    shape, cdim = draw.layout()
    logits = draw.randn(*shape, dtype=dtype, scale=draw.r.choice([1.0, 5.0]))
    if one_hot:
        index, _ = draw.index_target(shape, cdim)
        index = index.clamp_min(0) % shape[cdim]  # no ignore_index with probability targets
        target = F.one_hot(index, shape[cdim]).movedim(-1, cdim).to(dtype)
    else:
        target = torch.softmax(draw.randn(*shape, dtype=dtype), dim=cdim)
    kw = _ce_options(draw, shape[cdim], dtype)
    return Case(
        f"cross_entropy ({'one-hot' if one_hot else 'probabilities'})",
        f"input {shape} {dtype}, {_describe(kw)}",
        dtype,
        [logits, target],
        lambda x, y: xentkit.cross_entropy(x, y, **kw, backend=backend),
        lambda x, y: F.cross_entropy(x, y, **kw),
    )


def _ce_options(draw: _Draw, num_classes: int, dtype: torch.dtype) -> dict[str, Any]:
    weight = draw.rand(num_classes, dtype=dtype) + 0.1 if draw.r.random() < 0.4 else None
    smoothing = draw.r.choice([0.0, 0.0, 0.1, 0.3])
    return {"weight": weight, "reduction": _reduction(draw), "label_smoothing": smoothing}


def _bce_case(draw: _Draw, backend: str | None) -> Case:
    dtype = _dtype(draw)
    shape = tuple(draw.r.randint(1, 5) for _ in range(draw.r.randint(1, 3)))
    probs = draw.rand(*shape, dtype=dtype) * 0.98 + 0.01  # torch clamps the logs at 0 and 1
    target = _binary_target(draw, shape, dtype)
    kw = {"weight": _binary_weight(draw, shape, dtype), "reduction": _reduction(draw)}
    return Case(
        "binary_cross_entropy",
        f"input {shape} {dtype}, {_describe(kw)}",
        dtype,
        [probs],
        lambda x: xentkit.binary_cross_entropy(x, target, **kw),
        lambda x: F.binary_cross_entropy(x, target, **kw),
    )


def _bce_logits_case(draw: _Draw, backend: str | None) -> Case:
    dtype = _dtype(draw)
    shape = tuple(draw.r.randint(1, 5) for _ in range(draw.r.randint(1, 3)))
    logits = draw.randn(*shape, dtype=dtype, scale=3.0)
    target = _binary_target(draw, shape, dtype)
    pos_weight = draw.rand(shape[-1], dtype=dtype) + 0.5 if draw.r.random() < 0.5 else None
    kw = {
        "weight": _binary_weight(draw, shape, dtype),
        "reduction": _reduction(draw),
        "pos_weight": pos_weight,
    }
    return Case(
        "binary_cross_entropy_with_logits",
        f"input {shape} {dtype}, {_describe(kw)}",
        dtype,
        [logits, target],
        lambda x, y: xentkit.binary_cross_entropy_with_logits(x, y, **kw),
        lambda x, y: F.binary_cross_entropy_with_logits(x, y, **kw),
    )


def _binary_target(draw: _Draw, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    target = draw.rand(*shape, dtype=dtype)
    return target if draw.r.random() < 0.5 else target.round()


def _binary_weight(draw: _Draw, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor | None:
    """None, one weight per element, or one per class (broadcast over the leading dims)."""
    kind = draw.r.choice(["none", "elements", "classes"])
    if kind == "none":
        return None
    return draw.rand(*(shape if kind == "elements" else shape[-1:]), dtype=dtype) + 0.1


def _linear_case(draw: _Draw, backend: str | None) -> Case:
    dtype = _dtype(draw)
    lead = tuple(draw.r.randint(1, 4) for _ in range(draw.r.randint(1, 2)))
    dim, vocab = draw.r.randint(2, 8), draw.r.randint(2, 12)
    hidden = draw.randn(*lead, dim, dtype=dtype)
    weight = draw.randn(vocab, dim, dtype=dtype)
    bias = draw.randn(vocab, dtype=dtype) if draw.r.random() < 0.5 else None
    target, ignore_index = draw.index_target((math.prod(lead), vocab), 1)
    target = target.reshape(lead)
    kw = _ce_options(draw, vocab, dtype)
    class_weight = kw.pop("weight")
    kw["ignore_index"] = ignore_index
    leaves = [hidden, weight] + ([bias] if bias is not None else [])

    def theirs(h: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        logits = F.linear(h, w, b).flatten(0, -2)
        loss = F.cross_entropy(logits, target.flatten(), weight=class_weight, **kw)
        return loss.reshape(target.shape) if kw["reduction"] == "none" else loss

    return Case(
        "linear_cross_entropy",
        f"input {(*lead, dim)} weight {(vocab, dim)} bias={bias is not None} {dtype}, "
        f"{_describe({'class_weight': class_weight, **kw})}",
        dtype,
        leaves,
        lambda h, w, b=None: xentkit.linear_cross_entropy(
            h, w, target, b, class_weight=class_weight, **kw, backend=backend
        ),
        theirs,
    )


def _reduction(draw: _Draw) -> str:
    return draw.r.choice(["mean", "sum", "none"])


def _describe(options: dict[str, Any]) -> str:
    shown = []
    for key, value in options.items():
        if isinstance(value, Tensor):
            value = f"tensor{tuple(value.shape)}"
        shown.append(f"{key}={value}")
    return ", ".join(shown)


_REPORT_ORDER = [
    "softmax",
    "log_softmax",
    "nll_loss",
    "cross_entropy (index)",
    "cross_entropy (one-hot)",
    "cross_entropy (probabilities)",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "linear_cross_entropy",
]


def _check(args: argparse.Namespace) -> int:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    if args.cases < 1:
        raise UsageError(f"--cases must be a positive number of cases, got {args.cases}.")
    # The tensors are tiny: extra intra-op threads only add synchronisation (4x slower on a
    # busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        cases = check_cases(args.seed, args.cases, args.backend)
        results = [run_case(case, args.seed + i) for i, case in enumerate(cases)]
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)

    table = Table(
        title=f"xentkit vs torch.nn.functional, worst relative errors (seed {args.seed})",
        box=box.SIMPLE_HEAD,
        padding=(0, 1, 0, 0),
        show_edge=False,
    )
    table.add_column("function", no_wrap=True)
    for column in ("cases", "failed", "value err", "grad err"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("result")
    for name in sorted({r.case.function for r in results}, key=_REPORT_ORDER.index):
        rows = [r for r in results if r.case.function == name]
        failed = sum(not r.ok for r in rows)
        table.add_row(
            name,
            str(len(rows)),
            str(failed),
            f"{max(r.value_error for r in rows):.1e}",
            f"{max(r.grad_error for r in rows):.1e}",
            "[red]FAIL[/red]" if failed else "[green]pass[/green]",
        )
    console = Console(highlight=False)
    console.print(table)
    failures = [r for r in results if not r.ok]
    for r in failures[:10]:
        detail = r.error or f"value {r.value_error:.1e}, grad {r.grad_error:.1e}"
        line = f"FAIL {r.case.function}: {r.case.description}: {detail}"
        console.print(line, markup=False, style="red")
    tolerance = ", ".join(f"{str(d)[6:]} {t:.0e}" for d, t in TOLERANCES.items())
    console.print(
        f"{len(results)} cases in {elapsed:.1f} s, {len(failures)} failed "
        f"(tolerance: {tolerance} relative)."
    )
    return 1 if failures else 0


# --------------------------------------------------------------------------------------------
# bench


def bench_script() -> Path:
    """Where the benchmarks' entry point is in a source checkout (not in a wheel)."""
    return Path(xentkit.__file__).resolve().parents[1] / "benchmarks" / "run.py"


def bench(argv: list[str]) -> int:
    """Run ``benchmarks/run.py`` of the source checkout with ``argv``, in this interpreter."""
    script = bench_script()
    if not script.is_file():
        print(
            f"xentkit bench: error: {script} not found. The benchmarks live in the source "
            "repository, not in the installed package: run xentkit bench from a git checkout "
            "installed with pip install -e .",
            file=sys.stderr,
        )
        return 2
    return subprocess.call([sys.executable, str(script), *argv])
