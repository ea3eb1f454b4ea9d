"""The mistakes :func:`xentkit.explain` can see: one detector per mistake, in one registry.

A detector is a function of a :class:`Context` decorated with ``@detector(kind, *losses)``; it
returns ``(message, evidence)`` when it sees its mistake, else None. Its docstring names the
mistake and the fix, its message the evidence in numbers and the fix. Detectors look only at
the data and never raise; one that could fire on ordinary data needs evidence chance would not
produce (healthy inputs give no finding: ``tests/test_explain.py`` holds both directions).
Adding a mistake is adding one function here.

Where a full pass over a large input is needed, a cheap global test goes first (the input's
minimum and maximum, computed once), so that healthy logits cost one pass in all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from xentkit import reference
from xentkit._layout import class_rows
from xentkit.explain.explanation import Finding, Stats
from xentkit.explain.format import number

Evidence = dict[str, Any]
Detector = Callable[["Context"], "tuple[str, Evidence] | None"]

CLASS_LOSSES = ("cross_entropy", "nll_loss")
BINARY_LOSSES = ("binary_cross_entropy", "binary_cross_entropy_with_logits")

# Tolerance for "this row sums to 1" / "this row's logsumexp is 0" with float16/bfloat16
# input (1e-4 otherwise): loose enough for rounded rows of a few thousand classes, far tighter
# than anything random logits come near.
HALF_TOL = 1e-3


@dataclass
class Context:
    """What a detector looks at: the call's loss, input, target and options, and (when the
    function did not raise) the batch statistics. Derived views are computed once, on demand."""

    loss: str
    input: Tensor
    target: Tensor
    options: dict[str, Any]
    stats: Stats | None = None

    @property
    def class_dim(self) -> int:
        return 0 if self.input.dim() == 1 else 1

    @property
    def classes(self) -> int:
        return self.input.shape[self.class_dim] if self.input.dim() else 0

    @property
    def tol(self) -> float:
        return HALF_TOL if self.input.dtype in (torch.float16, torch.bfloat16) else 1e-4

    @property
    def index_target(self) -> bool:
        return self.target.shape != self.input.shape and not self.target.is_floating_point()

    @cached_property
    def range(self) -> tuple[float, float]:
        """The input's minimum and maximum (NaN when it holds a NaN; 0, 0 when empty)."""
        if self.input.numel() == 0:
            return 0.0, 0.0
        low, high = torch.aminmax(self.input.detach())
        return float(low), float(high)

    @cached_property
    def rows(self) -> Tensor:
        """The input as ``(M, C)`` rows, classes last."""
        return class_rows(self.input, self.class_dim)

    def counted(self) -> Tensor:
        """The index targets that are not ``ignore_index``."""
        return self.target[self.target != self.options["ignore_index"]]


@dataclass(frozen=True)
class Registered:
    kind: str
    losses: tuple[str, ...]
    find: Detector


DETECTORS: list[Registered] = []


def detector(kind: str, *losses: str) -> Callable[[Detector], Detector]:
    """Registers a detector of the mistake ``kind`` for ``losses``."""

    def register(find: Detector) -> Detector:
        DETECTORS.append(Registered(kind, losses, find))
        return find

    return register


def find(context: Context) -> list[Finding]:
    """Every registered detector's finding for ``context``, in registry order."""
    found = []
    for d in DETECTORS:
        if context.loss in d.losses and context.input.dim() > 0:
            seen = d.find(context)
            if seen is not None:
                found.append(Finding(d.kind, *seen))
    return found


# --- helpers shared by several detectors ------------------------------------------------------


def _sums_to_one(x: Tensor, dim: int, tol: float) -> tuple[bool, float]:
    """Whether every slice of ``x`` along ``dim`` lies in [0, 1] and sums to 1 (the caller has
    checked the range), and the largest |sum - 1|."""
    if x.shape[dim] < 2 or x.numel() == 0:  # a single entry always "sums to 1"
        return False, math.nan
    error = float((x.sum(dim, dtype=torch.float64) - 1).abs().max())
    return error <= tol, error


def _lse_zero(x: Tensor, dim: int, tol: float) -> tuple[bool, float]:
    """Whether every slice of ``x`` along ``dim`` has logsumexp 0 (log-probabilities), and the
    largest |logsumexp| over the slices with a finite one."""
    if x.shape[dim] < 2 or x.numel() == 0:
        return False, math.nan
    lse = reference.logsumexp(x.to(torch.float64), dim=dim)
    finite = lse[torch.isfinite(lse)]
    if finite.numel() == 0:
        return False, math.nan
    error = float(finite.abs().max())
    return error <= tol, error


def _unit(context: Context) -> bool:
    low, high = context.range
    return low >= 0 and high <= 1


def _distributions(context: Context) -> float | None:
    """The largest |sum - 1| of the class rows when every row is a probability distribution
    (in [0, 1], summing to 1 within the tolerance); None otherwise."""
    if not _unit(context):
        return None
    ok, error = _sums_to_one(context.rows, 1, context.tol)
    return error if ok else None


# --- the input: probabilities, log-probabilities, logits, in the right dimension -------------


@detector("probabilities-as-logits", "cross_entropy")
def probabilities_as_logits(c: Context) -> tuple[str, Evidence] | None:
    """A softmax output given to cross_entropy, which applies softmax again: the loss is
    squashed toward ln C and learning stalls. Fix: pass the logits from before the softmax, or
    nll_loss(probs.log(), target)."""
    error = _distributions(c)
    if error is None:
        return None
    rows = c.rows.shape[0]
    return (
        f"input looks like probabilities, not logits: all {rows} rows lie in [0, 1] and sum to "
        f"1 (largest |sum - 1| = {error:.1e}), so cross_entropy would apply softmax a second "
        "time. Pass the logits from before the softmax, or use nll_loss(probs.log(), target).",
        {"rows": rows, "max_sum_error": error},
    )


@detector("probabilities-as-logits", "binary_cross_entropy_with_logits")
def probabilities_as_binary_logits(c: Context) -> tuple[str, Evidence] | None:
    """A sigmoid output given to binary_cross_entropy_with_logits, which applies a sigmoid
    again. Fix: pass the logits, or use binary_cross_entropy on probabilities."""
    # Eight values all in [0, 1] by chance has odds under 2e-4 for standard-normal logits.
    if c.input.numel() < 8 or not _unit(c):
        return None
    low, high = c.range
    return (
        f"all {c.input.numel()} values of input lie in [0, 1] (min {number(low)}, max "
        f"{number(high)}): they look like probabilities, but binary_cross_entropy_with_logits "
        "applies a sigmoid first, squashing them into [0.5, 0.7311]. Pass the logits, or use "
        "binary_cross_entropy (loss='bce') on probabilities.",
        {"elements": c.input.numel(), "min": low, "max": high},
    )


@detector("log-probabilities-as-logits", "cross_entropy")
def log_probabilities_as_logits(c: Context) -> tuple[str, Evidence] | None:
    """A log_softmax output given to cross_entropy: harmless (log_softmax is idempotent) but
    redundant. Fix: nll_loss(input, target), or drop the log_softmax."""
    if not c.range[1] <= c.tol:  # log-probabilities are never above 0
        return None
    ok, error = _lse_zero(c.rows, 1, c.tol)
    if not ok:
        return None
    rows = c.rows.shape[0]
    return (
        f"input rows are already log-probabilities: the logsumexp of each of the {rows} rows "
        f"is 0 (largest |logsumexp| = {error:.1e}). cross_entropy applies log_softmax again, "
        "which changes nothing (it is idempotent), so the loss is right, but the extra "
        "log_softmax is redundant: nll_loss(input, target) is the direct call.",
        {"rows": rows, "max_abs_logsumexp": error},
    )


@detector("softmax-wrong-dim", "cross_entropy", "nll_loss")
def softmax_wrong_dim(c: Context) -> tuple[str, Evidence] | None:
    """A softmax (or log_softmax) taken over a dimension other than the classes (time, batch)
    and then given to the loss, e.g. nn.Softmax(dim=2) on (N, C, T) logits. Fix: give
    cross_entropy the raw logits (or log_softmax over dim 1 for nll_loss)."""
    if c.input.dim() < 2:
        return None
    unit, nonpositive = _unit(c), c.range[1] <= c.tol
    if not unit and not nonpositive:
        return None
    classes_ok = _sums_to_one if unit else _lse_zero
    if classes_ok(c.input, c.class_dim, c.tol)[0]:
        return None  # normalised over the classes: another detector's case
    for dim in range(c.input.dim()):
        if dim == c.class_dim:
            continue
        ok, error = classes_ok(c.input, dim, c.tol)
        if not ok:
            continue
        what = "softmax" if unit else "log_softmax"
        if unit:
            sums = c.input.sum(c.class_dim, dtype=torch.float64)
            spread = f"the sums over the {c.classes} classes run from"
        else:
            sums = reference.logsumexp(c.input.to(torch.float64), dim=c.class_dim)
            spread = f"the logsumexp over the {c.classes} classes runs from"
        lo, hi = float(sums.min()), float(sums.max())
        fix = (
            "cross_entropy wants the raw logits: drop the softmax"
            if c.loss == "cross_entropy"
            else "nll_loss wants log_softmax over dim 1 (the classes)"
        )
        measure = "sums to 1 (largest |sum - 1|" if unit else "has logsumexp 0 (largest |lse|"
        return (
            f"input looks like a {what} over dim {dim} (size {c.input.shape[dim]}), not over "
            f"the classes (dim {c.class_dim}): every slice along dim {dim} {measure} = "
            f"{error:.1e}), while {spread} {number(lo)} to {number(hi)}. {fix}; if you need "
            f"probabilities elsewhere, take them over dim {c.class_dim}.",
            {"dim": dim, "max_error": error, "class_min": lo, "class_max": hi, "op": what},
        )
    return None


@detector("probabilities-as-log-probabilities", "nll_loss")
def probabilities_as_log_probabilities(c: Context) -> tuple[str, Evidence] | None:
    """Probabilities given to nll_loss, which wants log-probabilities: the loss is -p, not
    -log p. Fix: pass probs.log(), or give the logits to cross_entropy."""
    error = _distributions(c)
    if error is None:
        return None
    rows = c.rows.shape[0]
    return (
        f"nll_loss takes log-probabilities, but all {rows} rows lie in [0, 1] and sum to 1 "
        f"(largest |sum - 1| = {error:.1e}): these are probabilities. Pass probs.log(), or "
        "give the logits to cross_entropy.",
        {"rows": rows, "max_sum_error": error},
    )


@detector("logits-as-log-probabilities", "nll_loss")
def logits_as_log_probabilities(c: Context) -> tuple[str, Evidence] | None:
    """Logits given to nll_loss, which only picks the target's entry: nothing normalises them,
    and the loss can go below 0. Fix: log_softmax first, or call cross_entropy."""
    if _unit(c) or c.rows.shape[1] < 2 or c.rows.shape[0] == 0:
        return None
    lse = reference.logsumexp(c.rows.to(torch.float64), dim=-1)
    bad = torch.isfinite(lse) & (lse.abs() > c.tol)
    if not bool(bad.any()) or softmax_wrong_dim(c) is not None:
        return None
    first = int(bad.nonzero()[0, 0])
    return (
        f"nll_loss takes log-probabilities (the exp of each row sums to 1, logsumexp 0), but "
        f"{int(bad.sum())} of {c.rows.shape[0]} rows are not (row {first}: logsumexp "
        f"{number(float(lse[first]))}): these look like logits. Apply log_softmax first, or "
        "call cross_entropy, which does.",
        {"rows": int(bad.sum()), "first_row": first, "logsumexp": float(lse[first])},
    )


@detector("logits-as-probabilities", "binary_cross_entropy")
def logits_as_probabilities(c: Context) -> tuple[str, Evidence] | None:
    """Logits given to binary_cross_entropy, which wants probabilities (the call fails).
    Fix: binary_cross_entropy_with_logits, which applies the sigmoid stably."""
    x = c.input[torch.isfinite(c.input)]
    outside = (x < 0) | (x > 1)
    if not bool(outside.any()):
        return None
    low, high = float(x.min()), float(x.max())
    return (
        f"input has {int(outside.sum())} of {c.input.numel()} values outside [0, 1] (min "
        f"{number(low)}, max {number(high)}): binary_cross_entropy takes probabilities and "
        "these look like logits. Pass them to binary_cross_entropy_with_logits "
        "(loss='bce-logits'), which applies the sigmoid stably.",
        {"outside": int(outside.sum()), "min": low, "max": high},
    )


@detector("non-finite-input", *CLASS_LOSSES, *BINARY_LOSSES)
def non_finite_input(c: Context) -> tuple[str, Evidence] | None:
    """NaN or +inf in the input: the loss becomes NaN (-inf logits, a mask, are fine). Fix:
    find where they come from (an overflow in half precision, a division by 0, a learning rate
    that diverged) before the loss."""
    low, high = c.range
    if math.isfinite(high) and not math.isnan(low):
        return None
    bad = torch.isnan(c.input) | (c.input == math.inf)
    first = int(bad.flatten().nonzero()[0, 0])
    n = int(bad.sum())
    return (
        f"input holds {n} NaN or +inf value(s) of {c.input.numel()} (the first at flat index "
        f"{first}): every position they reach has a NaN loss, and so has the mean. They come "
        "from before the loss (an overflow in float16, a division by zero, a diverged step); "
        "-inf logits, used as masks, are fine.",
        {"count": n, "first_index": first},
    )


@detector("single-class", "cross_entropy")
def single_class(c: Context) -> tuple[str, Evidence] | None:
    """Cross entropy over one class: log_softmax of one logit is 0, so the loss and its
    gradient are 0 everywhere. Fix: a yes/no problem wants one logit per position and
    binary_cross_entropy_with_logits, or two logits (C = 2)."""
    if c.classes != 1 or c.rows.shape[0] == 0:
        return None
    squeeze = ".squeeze(1)" if c.input.dim() > 1 else ""
    return (
        f"input has a single class (C = 1, shape {tuple(c.input.shape)}): the log_softmax of "
        "one logit is 0, so cross_entropy is 0 at every position whatever the logits, and "
        "nothing is learned. For a yes/no problem give one logit per position to "
        f"binary_cross_entropy_with_logits(input{squeeze}, target.float()), or give "
        "cross_entropy two logits per position (C = 2).",
        {"classes": 1, "positions": c.rows.shape[0]},
    )


# --- the target: its form and its numbering -------------------------------------------------


def _binary_rows(c: Context) -> Tensor | None:
    """The target's rows when it has the input's shape and holds only 0s and 1s."""
    if c.target.shape != c.input.shape or c.classes < 2 or c.target.numel() == 0:
        return None
    rows = class_rows(c.target, c.class_dim)
    return rows if bool(((rows == 0) | (rows == 1)).all()) else None


@detector("one-hot-target", *CLASS_LOSSES)
def one_hot_target(c: Context) -> tuple[str, Evidence] | None:
    """One-hot rows where class indices were meant (an error for integer targets and for
    nll_loss; a valid but heavier probability target for cross_entropy). Fix:
    target.argmax(dim=1)."""
    rows = _binary_rows(c)
    if rows is None or not bool((rows.sum(-1) == 1).all()):
        return None
    argmax = f"target.argmax(dim={c.class_dim})"
    n = rows.shape[0]
    evidence = {"rows": n, "dtype": str(c.target.dtype)}
    said = f"every one of the {n} target rows is one-hot ({c.target.dtype}, a single 1)"
    if not c.target.is_floating_point():
        extra = " (or target.float() to use them as probabilities)"
        return (
            f"target has the input's shape {tuple(c.input.shape)} and {said}: these are "
            f"one-hot labels; class indices are {argmax}"
            + (extra if c.loss == "cross_entropy" else "")
            + ".",
            evidence,
        )
    if c.loss == "nll_loss":
        return f"nll_loss takes class indices, but {said}: pass {argmax}.", evidence
    differs = (
        " With weight given the two differ: probability targets divide the mean by the "
        "number of positions, indices by Σ weight[target]."
        if c.options["weight"] is not None
        else ""
    )
    return (
        f"{said}, so cross_entropy reads it as class probabilities. If class indices were "
        f"meant, {argmax} gives the same loss with less memory and allows ignore_index.{differs}",
        evidence,
    )


@detector("multi-hot-target", "cross_entropy")
def multi_hot_target(c: Context) -> tuple[str, Evidence] | None:
    """Several 1s in a target row (a multi-label problem) given to cross_entropy, which reads
    them as unnormalised probabilities over mutually exclusive classes. Fix:
    binary_cross_entropy_with_logits(input, target.float()), one independent yes/no per
    class."""
    rows = _binary_rows(c)
    if rows is None:
        return None
    positives = rows.sum(-1)
    multi = int((positives > 1).sum())
    if multi == 0:
        return None
    most = int(positives.max())
    return (
        f"target is multi-hot: {multi} of {rows.shape[0]} rows have more than one 1 (up to "
        f"{most}). cross_entropy treats classes as mutually exclusive and reads these rows as "
        "probabilities that sum to more than 1. For multi-label data use "
        "binary_cross_entropy_with_logits(input, target.float()) (loss='bce-logits'); if a "
        f"distribution over classes was meant, divide each row by its sum.",
        {"rows": multi, "of": rows.shape[0], "max_positives": most},
    )


@detector("float-index-targets", *CLASS_LOSSES)
def float_index_targets(c: Context) -> tuple[str, Evidence] | None:
    """Class indices stored as floats (the call fails: indices must be integers).
    Fix: target.long()."""
    t = c.target
    if not t.is_floating_point() or t.shape == c.input.shape or t.numel() == 0:
        return None
    if not bool(torch.isfinite(t).all()) or not bool((t == t.round()).all()):
        return None
    some = " ".join(number(v) for v in t.flatten()[:5].tolist())
    some += " …" if t.numel() > 5 else ""
    return (
        f"target holds whole numbers stored as {t.dtype} ({some}): class indices must be "
        "integers; pass target.long().",
        {"dtype": str(t.dtype), "elements": t.numel()},
    )


@detector("transposed-classes", *CLASS_LOSSES)
def transposed_classes(c: Context) -> tuple[str, Evidence] | None:
    """A class dimension that is not where PyTorch looks for it (dim 1): (C, N) for (N, C), or
    (N, T, C) for (N, C, T). Fix: input.T or input.movedim(-1, 1) (class_dim=, --dim)."""
    if c.target.is_floating_point() and c.target.shape == c.input.shape:
        return None  # probability targets share the input's layout, right or wrong
    shape, given = tuple(c.input.shape), tuple(c.target.shape)
    if c.input.dim() == 2 and given == shape[1:] and shape[0] != shape[1]:
        return (
            f"input {shape} looks transposed: the target {given} has one entry per column, so "
            f"the {shape[0]} classes are in dim 0 where (N, C) is expected. Pass input.T "
            "(class_dim=0, --dim 0).",
            {"input_shape": list(shape), "target_shape": list(given)},
        )
    if c.input.dim() < 3:
        return None
    expected, classes_last = shape[:1] + shape[2:], shape[:-1]
    evidence = {"input_shape": list(shape), "target_shape": list(given)}
    if given == classes_last and given != expected:
        return (
            f"the classes look like the last dimension: target {given} is input.shape[:-1], "
            f"the shape for an (N, ..., C) input {shape}, but PyTorch reads dim 1 as the "
            f"classes (N, C, d1, ...) and expects target {expected}. Pass "
            "input.movedim(-1, 1) (class_dim=-1, --dim -1).",
            evidence,
        )
    if given != expected or c.target.is_floating_point():
        return None
    counted = c.counted()
    if counted.numel() == 0:
        return None
    top = int(counted.max())
    if shape[1] <= top < shape[-1] and int(counted.min()) >= 0:
        return (
            f"the classes may be the last dimension: targets go up to {top}, but dim 1 of "
            f"input {shape} has only {shape[1]} classes, while the last dimension has "
            f"{shape[-1]}. If the input is (N, ..., C), pass input.movedim(-1, 1) "
            "(class_dim=-1, --dim -1) and a target of its shape[:-1].",
            {**evidence, "max_target": top},
        )
    return None


def _index_shaped(c: Context) -> bool:
    """Integer targets of the shape class indices have for this input."""
    if not c.index_target:
        return False
    expected = tuple(c.input.shape[: c.class_dim] + c.input.shape[c.class_dim + 1 :])
    return tuple(c.target.shape) == expected or (c.input.dim() == 1 and c.target.numel() == 1)


@detector("one-based-labels", *CLASS_LOSSES)
def one_based_labels(c: Context) -> tuple[str, Evidence] | None:
    """Labels numbered 1..C where PyTorch counts classes from 0 (C is out of range, and class
    0 never appears). Fix: target - 1."""
    if not _index_shaped(c):
        return None
    counted = c.counted()
    if counted.numel() == 0:
        return None
    classes, lo, hi, n = c.classes, int(counted.min()), int(counted.max()), counted.numel()
    evidence = {"min": lo, "max": hi, "classes": classes, "targets": n}
    if lo >= 1 and hi == classes:
        return (
            f"labels look 1-based: the targets run from {lo} to {hi} = C, but the classes are "
            f"0..{classes - 1}, so class 0 never appears and {hi} is out of range. "
            "Pass target - 1.",
            evidence,
        )
    # Only on large batches: with class 0 as common as the others, the chance that it never
    # appears in n targets is (1 - 1/C)^n, below 5e-5 from n = 10 C on.
    if (
        classes >= 3
        and lo == 1
        and hi == classes - 1
        and c.options["ignore_index"] != 0
        and n >= max(50, 10 * classes)
        and counted.unique().numel() == classes - 1
    ):
        chance = (1 - 1 / classes) ** n
        return (
            f"labels may be 1-based: in {n} targets every class 1..{classes - 1} appears but "
            f"class 0 never does (chance about {chance:.0e} if it were as common as the "
            f"others). If the labels start at 1, logit 0 is never a target and target - 1 with "
            f"{classes - 1} classes was meant; if class 0 is just absent from this data, "
            "ignore this.",
            {**evidence, "chance": chance},
        )
    return None


@detector("padding-not-ignored", *CLASS_LOSSES)
def padding_not_ignored(c: Context) -> tuple[str, Evidence] | None:
    """Padded sequences whose padding class is counted in the loss: one class fills the tail
    of the sequences and appears nowhere else. Fix: ignore_index=<that class>, or set the
    padding targets to -100."""
    t = c.target
    if not _index_shaped(c) or t.dim() < 2 or t.shape[-1] < 4:
        return None
    seqs = t.reshape(-1, t.shape[-1])
    if seqs.shape[0] < 2:
        return None
    value = int(seqs[:, -1].mode().values)
    if value == c.options["ignore_index"]:
        return None
    is_pad = seqs == value
    # the run of `value` at the end of each sequence: 1 while every later position is `value`
    tail = is_pad.flip(-1).long().cumprod(-1).sum(-1)
    padded = int((tail >= 2).sum())
    if padded < 2 or int(is_pad.sum()) != int(tail.sum()) or int(tail.min()) == seqs.shape[1]:
        return None
    fraction = float(tail.sum()) / max(int((t != c.options["ignore_index"]).sum()), 1)
    return (
        f"class {value} looks like padding counted in the loss: it fills the last "
        f"{int(tail[tail > 0].min())}–{int(tail.max())} positions of {padded} of "
        f"{seqs.shape[0]} sequences and appears nowhere else; it is {fraction:.0%} of the "
        f"counted targets, so the loss is partly how well the model predicts padding. Pass "
        f"ignore_index={value} (or set target[target == {value}] = -100).",
        {"value": value, "sequences": padded, "of": seqs.shape[0], "fraction": fraction},
    )


@detector("all-ignored", *CLASS_LOSSES)
def all_ignored(c: Context) -> tuple[str, Evidence] | None:
    """Every target is ignore_index: the mean is 0 / 0 = NaN. Fix: check the masking (a
    shifted label tensor, an ignore_index that equals a real class), or skip the batch."""
    if not c.index_target or c.target.numel() == 0 or c.options["reduction"] != "mean":
        return None
    if c.counted().numel():
        return None
    index = c.options["ignore_index"]
    return (
        f"every one of the {c.target.numel()} targets is ignore_index={index}, so the mean "
        "is 0 / 0 = nan. Check the masking (labels shifted out of range, an ignore_index that "
        "is a real class), or skip batches with nothing to learn from.",
        {"targets": c.target.numel(), "ignore_index": index},
    )


@detector("binary-target-out-of-range", *BINARY_LOSSES)
def binary_target_out_of_range(c: Context) -> tuple[str, Evidence] | None:
    """Binary targets outside [0, 1], often -1/+1 labels. Fix: (target + 1) / 2, or
    probabilities in [0, 1]."""
    if not c.target.is_floating_point() or c.target.numel() == 0:
        return None
    y = c.target[torch.isfinite(c.target)]
    off = (y < 0) | (y > 1)
    if not bool(off.any()):
        return None
    fix = (
        "these are -1/+1 labels: pass (target + 1) / 2"
        if set(y.unique().tolist()) <= {-1.0, 1.0}
        else "binary targets are probabilities in [0, 1]"
    )
    low, high = float(y.min()), float(y.max())
    return (
        f"target has {int(off.sum())} of {c.target.numel()} values outside [0, 1] (min "
        f"{number(low)}, max {number(high)}): {fix}.",
        {"outside": int(off.sum()), "min": low, "max": high},
    )


# --- the model: what a bad loss curve looks like in one batch ---------------------------------


@detector("overconfident-logits", "cross_entropy")
def overconfident_logits(c: Context) -> tuple[str, Evidence] | None:
    """A loss far above ln C (worse than guessing uniformly) with confident, wrong
    predictions: logits too large, the mark of a bad initialisation of the output layer (or a
    diverged step). Fix: initialise the head small (std about 1/sqrt(d), or zeros), lower the
    learning rate, or clip gradients."""
    s = c.stats
    if s is None or s.counted < 16 or c.classes < 2 or not math.isfinite(s.loss):
        return None
    # Random logits of std up to 3 stay under both bounds at every C; a head initialised with
    # std 10 is far above them.
    if s.loss < max(2 * s.uniform_loss, s.uniform_loss + 6) or s.mean_entropy > s.uniform_loss / 2:
        return None
    std = float(c.rows.to(torch.float64).std())
    return (
        f"the loss {number(s.loss)} is far above ln C = {number(s.uniform_loss)}, the loss of "
        f"predicting every class equally likely, while the predictions are confident (mean "
        f"entropy {number(s.mean_entropy)} nats, accuracy {s.accuracy:.1%}; logit std "
        f"{number(std)}): the logits are too large, the mark of a bad initialisation of the "
        "output layer or of a diverged step. Initialise the head small (std about 1/sqrt(d), "
        "or zeros), lower the learning rate, or clip gradients.",
        {
            "loss": s.loss,
            "uniform_loss": s.uniform_loss,
            "mean_entropy": s.mean_entropy,
            "logit_std": std,
        },
    )


@detector("collapsed-outputs", *CLASS_LOSSES)
def collapsed_outputs(c: Context) -> tuple[str, Evidence] | None:
    """Every position has the same (non-uniform) logits while the targets differ: the model
    ignores its input and predicts one fixed distribution (the class frequencies at best).
    Fix: check that the input reaches the head (detached or zeroed features, a broadcast
    bias, dead activations, a learning rate that blew up)."""
    rows = c.rows
    if rows.shape[0] < 8 or c.classes < 2 or not _index_shaped(c):
        return None
    if c.counted().unique().numel() < 2:
        return None
    first = rows[0].to(torch.float64)
    spread = float(first.max() - first.min())
    if not math.isfinite(spread) or spread <= 1e-6:
        return None  # uniform rows: an output layer initialised to zero, not a collapse
    tol = 1e-5 * max(1.0, float(first.abs().max()))
    # a few rows first: healthy outputs differ at once, without a pass over all of them
    if float((rows[1:8] - rows[0]).abs().max()) > tol:
        return None
    gap = float((rows - rows[0]).abs().max())
    if gap > tol:
        return None
    return (
        f"all {rows.shape[0]} positions have the same logits (largest difference from the "
        f"first {gap:.1e}, while the first spans {number(spread)} across its {c.classes} "
        f"classes) although their targets differ: the model ignores its input and predicts one "
        "fixed distribution. Check that the input reaches the head (detached or zeroed "
        "features, a broadcast bias, dead activations, a learning rate that blew up).",
        {"positions": rows.shape[0], "max_difference": gap, "row_spread": spread},
    )
