"""The terms of each loss, per position: one breakdown function per loss, each returning the
:class:`~xentkit.explain.explanation.Explanation`'s fields but the value and the findings.

Every quantity comes from :mod:`xentkit.reference`'s ``*_terms`` functions; nothing here
re-derives a formula. For a large input the per-position terms are computed over chunks of rows
(the full ``(M, C)`` log-probabilities are never held at once), and the table's vectors and
gradients are recomputed, by the same functions, for the shown positions only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from xentkit import _checks, reference
from xentkit._layout import to_rows
from xentkit.explain.explanation import Stats
from xentkit.explain.format import TopClasses, count, number
from xentkit.explain.options import OPTIONS

# Rows per chunk are chosen so that a chunk holds about this many logits (4 MiB in float32):
# small enough to stay in cache between the passes over it, large enough to amortise the loop.
CHUNK_ELEMENTS = 1 << 20
RANK_QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}


class Batch(NamedTuple):
    """Per-row quantities of index targets that the statistics need (all ``(M,)``)."""

    entropy: Tensor  # of the predicted distribution
    rank: Tensor  # classes scoring strictly higher than the target
    hit: Tensor  # bool: no class scores higher than the target (argmax = target, ties hit)


def _per_row(
    x: Tensor, target: Tensor, terms: Callable[[Tensor, Tensor], NamedTuple], index: bool
) -> tuple[NamedTuple, Batch | None]:
    """``terms`` over chunks of rows, its per-row fields concatenated and its scalars summed
    (the ``(M, C)`` fields are dropped); with index targets, the statistics' per-row parts."""
    rows, classes = x.shape
    step = max(1, CHUNK_ELEMENTS // max(classes, 1))
    fields: dict[str, list[Tensor]] = {}
    batch: list[Batch] = []
    for start in range(0, rows, step) if rows else [0]:
        t = terms(x[start : start + step], target[start : start + step])
        for name, value in t._asdict().items():
            fields.setdefault(name, []).append(value)
        if index and classes:
            # nll_terms has no logits: its input is the log-probabilities themselves
            logits = getattr(t, "logits", x[start : start + step])
            log_probs = getattr(t, "log_probs", logits)
            batch.append(_batch_part(logits, log_probs, target[start : start + step]))
    merged = {}
    for name, parts in fields.items():
        if parts[0].dim() == 0:
            merged[name] = torch.stack(parts).sum()
        elif parts[0].dim() == 1:
            merged[name] = torch.cat(parts)
        else:
            merged[name] = None
    stats = Batch(*(torch.cat(p) for p in zip(*batch, strict=True))) if batch else None
    return type(t)(**merged), stats


def _batch_part(logits: Tensor, log_probs: Tensor, target: Tensor) -> Batch:
    p = log_probs.exp()
    # H = -Σ p log p as one dot product per row (a batched matrix product reads each operand
    # once); a row with a -inf log-probability (a masked class) makes 0 * -inf = NaN there,
    # so those rows are redone with entr, which takes 0 log 0 as 0 (and keeps a NaN row NaN).
    entropy = -(p[:, None, :] @ log_probs[:, :, None]).flatten()
    redo = entropy.isnan().nonzero().flatten()
    if redo.numel():
        entropy[redo] = torch.special.entr(p[redo]).sum(-1)
    picked = logits.gather(1, target.clamp(0, logits.shape[1] - 1)[:, None])
    rank = (logits > picked).sum(-1)
    return Batch(entropy, rank, rank == 0)


def _stats(counted: Tensor, nll: Tensor, denominator: Tensor, batch: Batch, classes: int) -> Stats:
    n, kept = counted.numel(), int(counted.sum())
    loss = float(nll.sum() / denominator) if kept else math.nan
    ranks = batch.rank[counted].double()
    quantiles = {}
    if kept:
        levels = torch.tensor(list(RANK_QUANTILES.values()), dtype=ranks.dtype)
        values = torch.quantile(ranks, levels)
        quantiles = dict(zip(RANK_QUANTILES, values.tolist(), strict=True))
        quantiles["max"] = float(ranks.max())
    return Stats(
        positions=n,
        counted=kept,
        loss=loss,
        uniform_loss=math.log(classes),
        perplexity=math.exp(loss) if loss < 700 else math.inf,
        accuracy=float(batch.hit[counted].double().mean()) if kept else math.nan,
        mean_entropy=float(batch.entropy[counted].double().mean()) if kept else math.nan,
        ignored_fraction=1 - kept / n if n else 0.0,
        target_rank=quantiles,
    )


def shown_positions(loss: Tensor, max_rows: int) -> tuple[list[int], str]:
    """Every position in order when they fit, else the ``max_rows`` highest losses (NaN first,
    ties in position order)."""
    flat = loss.detach().flatten()
    if flat.numel() <= max_rows:
        return list(range(flat.numel())), "all"
    key = flat.double().nan_to_num(nan=math.inf)
    order = torch.sort(key, descending=True, stable=True).indices[:max_rows]
    return order.tolist(), "worst"


def position_labels(shape: tuple[int, ...], names: list[str], flat: list[int]) -> list[str]:
    """``"n=0, t=3"``-style labels of flat positions of ``shape``."""
    if not shape:
        return ["(unbatched)" for _ in flat]
    labels = []
    for i in flat:
        index = []
        for size in reversed(shape):
            index.append(i % size)
            i //= size
        labels.append(", ".join(f"{n}={j}" for n, j in zip(names, reversed(index), strict=True)))
    return labels


def class_layout_names(ndim: int) -> list[str]:
    """Names of the position dims of a class-layout loss: ``n``, ``n, t``, ``n, d1, d2``."""
    if ndim <= 2:
        return ["n", "t"][:ndim]
    return ["n", *(f"d{i}" for i in range(1, ndim))]


def elementwise_names(ndim: int) -> list[str]:
    """Names of the dims of an elementwise (binary) loss: ``n``, ``n, c``, ``n, d1, c``."""
    if ndim <= 2:
        return ["n", "c"][:ndim]
    return ["n", *(f"d{i}" for i in range(1, ndim - 1)), "c"]


def reduction_text(
    reduction: str, parts: list[tuple[str, Tensor, Tensor]], computed: Tensor, shape: tuple
) -> tuple[str, float | None, float | None]:
    """The reduction written out; ``parts`` are ``(formula, numerator, denominator)`` of a
    mean (cross entropy's z-loss part has its own denominator)."""
    if reduction == "none":
        return f"none: one loss per position (the loss column), shape {shape}", None, None
    if reduction == "sum":
        return f"sum = Σ loss = {number(float(computed))}", float(computed), None
    formula = " + ".join(f for f, _, _ in parts)
    numbers = " + ".join(f"{number(float(n))} / {number(float(d))}" for _, n, d in parts)
    text = f"mean = {formula} = {numbers} = {number(float(computed))}"
    return text, float(parts[0][1]), float(parts[0][2])


def options_note(options: dict[str, Any], defaults: dict[str, Any]) -> str:
    """The options that differ from PyTorch's defaults, and the reduction."""
    shown = [f"reduction={options['reduction']!r}"]
    for key, default in defaults.items():
        value = options[key]
        if key == "reduction" or value is None:
            continue
        if not isinstance(value, Tensor) and value == default:
            continue
        if isinstance(value, Tensor):
            flat = value.flatten()[:8].tolist()
            more = " …" if value.numel() > 8 else ""
            value = f"[{' '.join(map(number, flat))}{more}]"
        shown.append(f"{key}={value}")
    return "Options: " + ", ".join(shown) + "."


def _gradient(shown: Tensor, scaled: Callable[[Tensor], Tensor]) -> Tensor:
    """The gradient of the returned loss (summed, for ``reduction="none"``) with respect to the
    shown positions' inputs: autograd through the reference terms of those positions, scaled
    as the reduction scales them."""
    x = shown.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(scaled(x).sum(), x)
    return grad


class Vectors:
    """The vector cells of the shown positions: every class when they fit in ``k``, else the
    ``k`` most probable classes and the target with its rank."""

    def __init__(self, probs: Tensor, target: Tensor | None, counted: list[bool], k: int):
        self.classes, self.k = probs.shape[1], k
        self.full = self.classes <= k
        self.target, self.counted = target, counted
        if not self.full:
            self.top = probs.topk(k, dim=1).indices
            if target is not None:
                picked = probs.gather(1, target.clamp(0, self.classes - 1)[:, None])
                self.rank = (probs > picked).sum(1).tolist()

    def cells(self, matrix: Tensor) -> list[Any]:
        """One cell per shown position of an ``(S, C)`` matrix."""
        if self.full:
            return matrix.tolist()
        values = matrix.gather(1, self.top).tolist()
        cells = []
        for i, classes in enumerate(self.top.tolist()):
            t = None
            if self.target is not None and self.counted[i]:
                t = int(self.target[i])
            cells.append(
                TopClasses(
                    classes=classes,
                    values=values[i],
                    hidden=self.classes - self.k,
                    target=t,
                    target_value=None if t is None else float(matrix[i, t]),
                    target_rank=None if t is None else self.rank[i],
                )
            )
        return cells


def _index_cells(target: Tensor, counted: Tensor, picked: Tensor) -> tuple[list, list]:
    """The target and picked log-probability cells; ignored positions say so."""
    flags = counted.tolist()
    targets = [t if c else f"{t} (ignored)" for t, c in zip(target.tolist(), flags, strict=True)]
    return targets, [v if c else None for v, c in zip(picked.tolist(), flags, strict=True)]


def _table(shape: tuple, names: list[str], shown: list[int], values: dict, columns: list[str]):
    labels = position_labels(shape, names, shown)
    return [
        {"position": label, **{c: values[c][i] for c in columns[1:]}}
        for i, label in enumerate(labels)
    ]


def cross_entropy(
    input: Tensor, target: Tensor, o: dict[str, Any], max_rows: int, k: int, grad: bool
) -> dict[str, Any]:
    """The breakdown of :func:`xentkit.cross_entropy` (see
    :func:`xentkit.reference.cross_entropy_terms`)."""
    cdim = _checks.class_dim(input)
    index = target.shape != input.shape
    rows = to_rows(input, target.long() if index else target, cdim)
    options = (o["weight"], o["ignore_index"], o["label_smoothing"], o["z_loss"], o["softcap"])

    def terms(x: Tensor, t: Tensor) -> reference.CrossEntropyTerms:
        return reference.cross_entropy_terms(x, t, *options)

    full, batch = _per_row(rows.input, rows.target, terms, index)
    computed = reference.reduce_cross_entropy(full, o["reduction"])
    num_classes = input.shape[cdim]
    shown, order = shown_positions(full.loss, max_rows)
    at = torch.tensor(shown, dtype=torch.long)
    part = terms(rows.input[at], rows.target[at])

    smoothed, z = o["label_smoothing"] > 0, o["z_loss"] > 0
    picked = "log p[target]" if index else ("Σ y' log p" if smoothed else "Σ y log p")
    columns = ["position", "logits"] + (["capped logits"] if o["softcap"] else [])
    columns += ["max", "logsumexp", "softmax", "target", picked]
    columns += ["weight"] if index else []
    columns += ["nll", "smoothing"] if smoothed and index else []
    columns += ["z-loss"] if z else []
    columns += ["loss"] + (["grad"] if grad else [])

    softmax = reference.softmax(part.logits)
    flags = part.counted.tolist()
    vectors = Vectors(softmax, rows.target[at] if index else None, flags, k)
    values = {
        "logits": vectors.cells(rows.input[at]),
        "capped logits": vectors.cells(part.logits),
        "max": part.logits.amax(-1).tolist() if num_classes else [None] * len(shown),
        "logsumexp": part.lse.tolist(),
        "softmax": vectors.cells(softmax),
        "target": vectors.cells(rows.target[at]) if not index else None,
        picked: part.target_log_prob.tolist(),
        "weight": part.target_weight.tolist(),
        "nll": part.nll.tolist(),
        "smoothing": part.smooth.tolist(),
        "z-loss": part.z.tolist(),
        "loss": part.loss.tolist(),
    }
    if index:
        values["target"], values[picked] = _index_cells(
            rows.target[at], part.counted, part.target_log_prob
        )

    def scaled(x: Tensor) -> Tensor:
        t = terms(x, rows.target[at])
        if o["reduction"] != "mean":
            return t.loss
        return t.ce / full.denominator + t.z / full.z_denominator

    gradient_note = None
    if grad:
        values["grad"] = vectors.cells(_gradient(rows.input[at], scaled))
        gradient_note = _ce_gradient_note(o, index, full)

    # PyTorch's mean divides the cross-entropy part by the summed target weights (the number
    # of positions for probability targets), the z-loss part by the counted positions.
    per = "Σ weight[target]" if index else "positions"
    ce_sum = "Σ (loss - z-loss)" if z else "Σ loss"
    mean = [(f"{ce_sum} / {per}", full.ce.sum(), full.denominator)]
    if z:
        mean.append(("Σ z-loss / counted positions", full.z.sum(), full.z_denominator))
    text, numerator, denominator = reduction_text(o["reduction"], mean, computed, rows.shape)

    kind = "class indices" if index else "class probabilities"
    summary = (
        f"cross_entropy of input {tuple(input.shape)} (logits, classes in dim {cdim}, "
        f"C = {num_classes}) and target {tuple(target.shape)} ({kind}), "
        f"{count(full.loss.numel(), 'position')}"
    )
    notes = [options_note(o, OPTIONS["cross_entropy"])]
    if o["softcap"]:
        cap = o["softcap"]
        notes.append(f"Logits are soft-capped first: {cap} * tanh(logits / {cap}).")
    if smoothed and index:
        eps = o["label_smoothing"]
        notes.append(f"Label smoothing: loss = {1 - eps:g} * nll + {eps:g} * smoothing.")
    elif smoothed:
        eps = o["label_smoothing"]
        notes.append(f"Targets smoothed first: y' = {1 - eps:g} y + {eps:g} / C.")
    if o["weight"] is not None and not index:
        notes.append("Class weights scale each class's term: loss = -Σ w y log p.")
    if z:
        notes.append(f"z-loss = {o['z_loss']:g} * logsumexp² per counted position.")
    stats = None
    if batch is not None:
        stats = _stats(full.counted, full.nll, full.denominator, batch, num_classes)
    return {
        "summary": summary,
        "notes": notes,
        "columns": columns,
        "rows": _table(rows.shape, class_layout_names(len(rows.shape)), shown, values, columns),
        "shown": shown,
        "order": order,
        "positions": full.loss.numel(),
        "classes": num_classes,
        "classes_shown": min(k, num_classes),
        "reduction": o["reduction"],
        "reduction_text": text,
        "numerator": numerator,
        "denominator": denominator,
        "computed": computed,
        "losses": full.loss,
        "ranks": None if batch is None else batch.rank[full.counted],
        "stats": stats,
        "gradient_note": gradient_note,
    }


def _over(reduction: str, denominator: str, value: float) -> str:
    """The division the mean applies, written out; nothing for the other reductions."""
    return f" / {denominator} (= {number(value)})" if reduction == "mean" else ""


def _ce_gradient_note(o: dict[str, Any], index: bool, full: NamedTuple) -> str:
    """Why cross entropy's gradient column is what it is."""
    if index:
        over = _over(o["reduction"], "Σ weight[target]", float(full.denominator))
        text = (
            f"∂loss/∂logits = (softmax − one-hot(target)) × weight[target]{over}: every logit "
            "is pushed down by its probability and the target's up by 1 − p, so each row sums "
            "to 0; a confident right answer gets almost none, a confident wrong one the most."
        )
    else:
        over = _over(o["reduction"], "positions", float(full.denominator))
        text = (
            f"∂loss/∂logits = softmax × Σ y − y (weighted by class){over}: each logit moves by "
            "how far its probability is from its target probability; each row sums to 0 when "
            "the target sums to 1."
        )
    if o["label_smoothing"] > 0:
        text += " Label smoothing mixes in (softmax − 1/C), so no class is pushed to 0."
    if o["z_loss"] > 0:
        text += " z-loss adds 2 z logsumexp × softmax, pulling the logsumexp toward 0."
    if o["softcap"]:
        text += " Soft-capping multiplies by 1 − tanh²(x / c): capped logits learn slower."
    return text


def nll_loss(
    input: Tensor, target: Tensor, o: dict[str, Any], max_rows: int, k: int, grad: bool
) -> dict[str, Any]:
    """The breakdown of :func:`xentkit.nll_loss` (see :func:`xentkit.reference.nll_terms`)."""
    cdim = _checks.class_dim(input)
    rows = to_rows(input, target.long(), cdim)
    dtype = reference.accumulation_dtype(input.dtype)

    def terms(x: Tensor, t: Tensor) -> reference.NLLTerms:
        return reference.nll_terms(x.to(dtype), t, o["weight"], o["ignore_index"])

    full, batch = _per_row(rows.input, rows.target, terms, index=True)
    denominator = full.target_weight.sum()
    computed = reference.reduce(full.loss, o["reduction"], denominator)
    num_classes = input.shape[cdim]
    shown, order = shown_positions(full.loss, max_rows)
    at = torch.tensor(shown, dtype=torch.long)
    log_probs = rows.input[at].to(dtype)
    part = terms(log_probs, rows.target[at])
    columns = ["position", "log-probs", "probs", "Σ probs", "target", "log p[target]"]
    columns += ["weight", "loss"] + (["grad"] if grad else [])
    probs = log_probs.exp()  # shown so that rows which are not log-probabilities stand out
    vectors = Vectors(probs, rows.target[at], part.counted.tolist(), k)
    targets, picked = _index_cells(rows.target[at], part.counted, part.target_log_prob)
    values = {
        "log-probs": vectors.cells(log_probs),
        "probs": vectors.cells(probs),
        "Σ probs": probs.sum(-1).tolist(),
        "target": targets,
        "log p[target]": picked,
        "weight": part.target_weight.tolist(),
        "loss": part.loss.tolist(),
    }
    gradient_note = None
    if grad:

        def scaled(x: Tensor) -> Tensor:
            loss = terms(x, rows.target[at]).loss
            return loss / denominator if o["reduction"] == "mean" else loss

        values["grad"] = vectors.cells(_gradient(log_probs, scaled))
        over = _over(o["reduction"], "Σ weight[target]", float(denominator))
        gradient_note = (
            f"∂loss/∂input = −weight[target]{over} at the target's log-probability and 0 "
            "elsewhere: nll_loss only picks; the softmax before it (log_softmax, or "
            "cross_entropy) is what spreads the gradient over the classes."
        )
    mean = [("Σ loss / Σ weight[target]", full.loss.sum(), denominator)]
    text, numerator, denominator_ = reduction_text(o["reduction"], mean, computed, rows.shape)
    summary = (
        f"nll_loss of input {tuple(input.shape)} (log-probabilities, classes in dim {cdim}, "
        f"C = {num_classes}) and target {tuple(target.shape)} (class indices), "
        f"{count(full.loss.numel(), 'position')}"
    )
    stats = None
    if batch is not None:
        stats = _stats(full.counted, full.loss, denominator, batch, num_classes)
    return {
        "summary": summary,
        "notes": [options_note(o, OPTIONS["nll_loss"])],
        "columns": columns,
        "rows": _table(rows.shape, class_layout_names(len(rows.shape)), shown, values, columns),
        "shown": shown,
        "order": order,
        "positions": full.loss.numel(),
        "classes": num_classes,
        "classes_shown": min(k, num_classes),
        "reduction": o["reduction"],
        "reduction_text": text,
        "numerator": numerator,
        "denominator": denominator_,
        "computed": computed,
        "losses": full.loss,
        "ranks": None if batch is None else batch.rank[full.counted],
        "stats": stats,
        "gradient_note": gradient_note,
    }


def binary(
    input: Tensor, target: Tensor, o: dict[str, Any], max_rows: int, logits: bool, grad: bool
) -> dict[str, Any]:
    """Both binary losses: one position per element."""
    name = "binary_cross_entropy_with_logits" if logits else "binary_cross_entropy"
    weight, pos_weight = o["weight"], o.get("pos_weight")

    def terms(x: Tensor, y: Tensor) -> Tensor:
        if logits:
            return reference.binary_cross_entropy_with_logits_terms(x, y, weight, pos_weight)
        return reference.binary_cross_entropy_terms(x, y, weight)

    loss = terms(input, target)
    computed = reference.reduce(loss, o["reduction"])
    shown, order = shown_positions(loss, max_rows)
    at = torch.tensor(shown, dtype=torch.long)

    def pick(t: Tensor | None) -> list[float]:
        return [] if t is None else t.expand(input.shape).flatten()[at].tolist()

    x, y = input.flatten()[at], target.expand(input.shape).flatten()[at]
    ones, zeros = torch.ones_like(x), torch.zeros_like(x)
    # With a target of 1 (or 0) the loss is -log σ(x) (or -log(1 - σ(x))): the two logs.
    if logits:
        log_yes = -reference.binary_cross_entropy_with_logits_terms(x, ones)
        log_no = -reference.binary_cross_entropy_with_logits_terms(x, zeros)
        columns = ["position", "logit", "sigmoid", "target", "log σ(x)", "log(1 - σ(x))"]
        columns += ["pos_weight"] if pos_weight is not None else []
    else:
        log_yes = -reference.binary_cross_entropy_terms(x, ones)
        log_no = -reference.binary_cross_entropy_terms(x, zeros)
        columns = ["position", "p", "target", "log p", "log(1 - p)"]
    columns += ["weight"] if weight is not None else []
    columns += ["loss"] + (["grad"] if grad else [])
    values = {
        "logit": x.tolist(),
        "p": x.tolist(),
        "sigmoid": torch.sigmoid(x.to(log_yes.dtype)).tolist(),
        "target": y.tolist(),
        "log σ(x)": log_yes.tolist(),
        "log p": log_yes.tolist(),
        "log(1 - σ(x))": log_no.tolist(),
        "log(1 - p)": log_no.tolist(),
        "pos_weight": pick(pos_weight),
        "weight": pick(weight),
        "loss": loss.flatten()[at].tolist(),
    }
    gradient_note = None
    if grad:
        # the whole input goes through the terms (weights broadcast against its shape); only
        # the shown elements' gradients are kept
        def scaled(v: Tensor) -> Tensor:
            out = terms(v, target)
            return out / out.numel() if o["reduction"] == "mean" else out

        values["grad"] = _gradient(input, scaled).flatten()[at].tolist()
        over = _over(o["reduction"], "elements", input.numel())
        gradient_note = (
            f"∂loss/∂x = (σ(x) − y) × weight{over} (pos_weight scales the y term): the "
            "error of the probability itself, bounded by 1, which is why logits train stably."
            if logits
            else f"∂loss/∂p = (p − y) / (p (1 − p)) × weight{over}: it grows without bound "
            "as p nears 0 or 1, the reason to give logits to binary_cross_entropy_with_logits."
        )
    mean = [("Σ loss / elements", loss.sum(), torch.tensor(float(loss.numel())))]
    text, numerator, denominator = reduction_text(
        o["reduction"], mean, computed, tuple(input.shape)
    )
    kind = "logits" if logits else "probabilities"
    summary = (
        f"{name} of input {tuple(input.shape)} ({kind}) and target {tuple(target.shape)}, "
        f"elementwise: {count(input.numel(), 'position')}"
    )
    notes = [options_note(o, OPTIONS[name])]
    if logits and pos_weight is not None:
        notes.append("pos_weight multiplies the positive (y) term of each class.")
    if not logits:
        notes.append("Each log is floored at -100, as in PyTorch, so p = 0 or 1 stays finite.")
    names = elementwise_names(input.dim())
    return {
        "summary": summary,
        "notes": notes,
        "columns": columns,
        "rows": _table(tuple(input.shape), names, shown, values, columns),
        "shown": shown,
        "order": order,
        "positions": input.numel(),
        "classes": None,
        "classes_shown": 0,
        "reduction": o["reduction"],
        "reduction_text": text,
        "numerator": numerator,
        "denominator": denominator,
        "computed": computed,
        "losses": loss.flatten(),
        "stats": None,
        "gradient_note": gradient_note,
    }
