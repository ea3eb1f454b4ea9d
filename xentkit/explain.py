"""Why a loss is the number it is: a term-by-term breakdown, and the mistakes it can see.

:func:`explain` computes a loss the way the library does and shows every step. The xentkit
function is called once for the final value (so the input is validated exactly as it is there);
every intermediate quantity comes from :mod:`xentkit.reference`'s ``*_terms`` functions, laid
out as rows by :mod:`xentkit._layout`. Nothing here re-derives a formula: the table is the
reference's own terms, and the reduction line recomputes the value from them.

Before computing, it looks at the data for mistakes that give a wrong number (or an error) and
names each with its evidence: probabilities passed as logits, a class dimension in the wrong
place, one-hot or float targets where class indices were meant, labels that start at 1, logits
given to ``binary_cross_entropy`` and probabilities given to
``binary_cross_entropy_with_logits``. When the function itself rejects the input, the error is
raised again with those findings appended.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from xentkit import _checks, functional, reference
from xentkit._layout import class_rows, to_rows

# Accepted spellings of each loss (the CLI's short names included).
LOSSES = {
    "cross_entropy": "cross_entropy",
    "ce": "cross_entropy",
    "nll_loss": "nll_loss",
    "nll": "nll_loss",
    "binary_cross_entropy": "binary_cross_entropy",
    "bce": "binary_cross_entropy",
    "binary_cross_entropy_with_logits": "binary_cross_entropy_with_logits",
    "bce-logits": "binary_cross_entropy_with_logits",
}

# Each function's own options, with the defaults that keep PyTorch's behaviour.
OPTIONS: dict[str, dict[str, Any]] = {
    "cross_entropy": {
        "weight": None,
        "ignore_index": -100,
        "reduction": "mean",
        "label_smoothing": 0.0,
        "z_loss": 0.0,
        "softcap": None,
    },
    "nll_loss": {"weight": None, "ignore_index": -100, "reduction": "mean"},
    "binary_cross_entropy": {"weight": None, "reduction": "mean"},
    "binary_cross_entropy_with_logits": {"weight": None, "reduction": "mean", "pos_weight": None},
}

# Tolerance for "this row sums to 1" / "this row's logsumexp is 0" with float16/bfloat16
# input (1e-4 otherwise): loose enough for rounded rows of a few thousand classes, far tighter
# than anything random logits come near.
_HALF_TOL = 1e-3


@dataclass
class Explanation:
    """The breakdown of one loss: ``str()`` is a plain-text table; also :meth:`to_markdown`,
    :meth:`to_dict` (JSON-able) and rich rendering (``rich.print(explanation)``).

    Attributes:
        loss: the function's name, e.g. ``"cross_entropy"``.
        summary: one line naming the input, target and layout.
        notes: layout and option remarks (moved class dimension, smoothed targets, ...).
        columns: the table's column names.
        rows: one dict per shown position, column -> number, list of numbers, int or text.
        positions: the number of positions (rows of the full table).
        classes: the number of classes (None for the elementwise binary losses).
        classes_shown: how many classes each vector cell shows.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.
        reduction_text: the reduction written out with its numerator and denominator.
        numerator, denominator: the mean's parts (``denominator`` None unless a mean).
        computed: the value recomputed from the terms in the table (the reference maths).
        value: the library's own result, what the xentkit function returns.
        warnings: likely mistakes, each with its evidence and the fix.
    """

    loss: str
    summary: str
    notes: list[str]
    columns: list[str]
    rows: list[dict[str, Any]]
    positions: int
    classes: int | None
    classes_shown: int
    reduction: str
    reduction_text: str
    numerator: float | None
    denominator: float | None
    computed: Tensor
    value: Tensor
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self) -> str:
        return (
            f"<Explanation {self.loss} = {self._value_text()} "
            f"({_count(self.positions, 'position')}, {_count(len(self.warnings), 'warning')})>"
        )

    def _cell(self, value: Any) -> str:
        """A table cell as text; vectors say how many classes they leave out."""
        if value is None:
            return "—"
        if isinstance(value, list):
            hidden = (self.classes or 0) - len(value)
            tail = f" … +{hidden}" if hidden > 0 else ""
            return "[" + " ".join(_number(v) for v in value) + tail + "]"
        if isinstance(value, float):
            return _number(value)
        return str(value)

    def _elided(self) -> list[str]:
        lines = []
        if self.positions > len(self.rows):
            lines.append(
                f"… {self.positions - len(self.rows)} more positions not shown "
                f"({len(self.rows)} of {self.positions}); all of them are in the reduction."
            )
        if self.classes is not None and self.classes > self.classes_shown:
            lines.append(f"Vectors show the first {self.classes_shown} of {self.classes} classes.")
        return lines

    def _value_text(self) -> str:
        if self.value.dim() == 0:
            return _number(float(self.value))
        shown = self.value.flatten()[:8].tolist()
        more = " …" if self.value.numel() > 8 else ""
        return f"tensor of shape {tuple(self.value.shape)} [{' '.join(map(_number, shown))}{more}]"

    def _footer(self) -> list[str]:
        return [
            f"reduction: {self.reduction_text}",
            f"value: {self._value_text()}  (xentkit.{self.loss}, {self.value.dtype})",
        ]

    def to_text(self) -> str:
        """The plain-text table with its summary, reduction, value and warnings."""
        cells = [self.columns] + [[self._cell(r.get(c)) for c in self.columns] for r in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]
        table = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in cells
        ]
        table.insert(1, "  ".join("-" * w for w in widths))
        lines = [self.summary, *self.notes, "", *table, *self._elided(), "", *self._footer()]
        if self.warnings:
            lines += ["", "Warnings:", *(f"- {w}" for w in self.warnings)]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """The same content as a markdown table with the notes and warnings as text."""

        def row(cells: list[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        lines = [f"**{self.summary}**", ""]
        lines += [f"- {n}" for n in self.notes]
        lines += ["", row(self.columns), row(["---"] * len(self.columns))]
        lines += [row([self._cell(r.get(c)) for c in self.columns]) for r in self.rows]
        lines += ["", *(f"*{e}*" for e in self._elided())]
        lines += [f"{line}  " for line in self._footer()]
        if self.warnings:
            lines += ["", "**Warnings**", "", *(f"- {w}" for w in self.warnings)]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON types; non-finite numbers become ``"nan"``, ``"inf"``."""
        value = self.value.tolist()
        return {
            "loss": self.loss,
            "summary": self.summary,
            "notes": self.notes,
            "columns": self.columns,
            "rows": [{k: _json(v) for k, v in r.items()} for r in self.rows],
            "positions": self.positions,
            "classes": self.classes,
            "classes_shown": self.classes_shown,
            "reduction": {
                "kind": self.reduction,
                "text": self.reduction_text,
                "numerator": _json(self.numerator),
                "denominator": _json(self.denominator),
            },
            "value": _json(value),
            "warnings": self.warnings,
        }

    def __rich_console__(self, console, options):
        """Rich rendering (``rich.print(explanation)``, the ``xentkit explain`` terminal view):
        a table when it fits the terminal's width, one block per position when it does not."""
        from rich import box
        from rich.measure import Measurement
        from rich.table import Table
        from rich.text import Text

        yield Text(self.summary, style="bold")
        yield from (Text(n, style="dim") for n in self.notes)
        # Text, not str: rich would read "log p[target]" and vectors "[...]" as markup
        cells = [[Text(self._cell(r.get(c))) for c in self.columns] for r in self.rows]
        headers = [Text(c) for c in self.columns]
        table = Table(box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), show_edge=False)
        for header in headers:
            table.add_column(header, no_wrap=True)
        for row in cells:
            table.add_row(*row)
        unbounded = options.update_width(1 << 20)  # Measurement clamps to the width it is given
        if Measurement.get(console, unbounded, table).maximum <= options.max_width:
            yield table
        else:  # too wide for the terminal: each position as a column-name / value list
            for row in cells:
                block = Table.grid(padding=(0, 2))
                block.add_column(style="cyan", no_wrap=True)
                block.add_column()
                for name, cell in zip(headers[1:], row[1:], strict=True):
                    block.add_row(name, cell)
                yield Text(str(row[0]), style="bold")
                yield block
        yield from (Text(e, style="dim") for e in self._elided())
        yield from (Text(line, style="bold") for line in self._footer())
        if self.warnings:
            yield Text("Warnings:", style="bold yellow")
            yield from (Text(f"- {w}", style="yellow") for w in self.warnings)


def _number(v: float) -> str:
    """Four decimals for ordinary magnitudes, scientific notation for tiny or huge ones."""
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    v += 0.0  # -0.0 (an ignored position's -w * 0) prints as 0.0000
    if v == 0 or 1e-3 <= abs(v) < 1e6:
        return f"{v:.4f}"
    return f"{v:.3e}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _json(v: Any) -> Any:
    if isinstance(v, list):
        return [_json(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return _number(v)
    return v


def explain(
    input: Tensor,
    target: Tensor,
    loss: str = "cross_entropy",
    *,
    class_dim: int | None = None,
    max_rows: int = 8,
    max_classes: int = 8,
    **kwargs: Any,
) -> Explanation:
    r"""Explain a loss term by term: every intermediate quantity per position, the reduction
    with its denominator, the final value and the mistakes the data suggests.

    For cross entropy each position shows the logits :math:`x`, :math:`m = \max_c x_c`,
    :math:`\mathrm{lse} = m + \log\sum_c e^{x_c - m}`, the softmax :math:`e^{x - \mathrm{lse}}`,
    the target :math:`t`, the picked :math:`\log p_t = x_t - \mathrm{lse}`, its weight
    :math:`w_t`, the smoothing and z-loss terms and the position's loss
    :math:`\ell = -w_t \log p_t` (see :func:`xentkit.reference.cross_entropy_terms`);
    ``nll_loss`` starts from log-probabilities, the binary losses are elementwise.

    Args:
        input: what the function takes: logits ``(C)``, ``(N, C)`` or ``(N, C, d1, ...)`` for
            cross entropy, log-probabilities for ``nll_loss``, probabilities or logits of any
            shape for the binary losses.
        target: class indices ``()``, ``(N)``, ``(N, d1, ...)``, or probabilities of the
            input's shape.
        loss: ``"cross_entropy"``/``"ce"``, ``"nll_loss"``/``"nll"``,
            ``"binary_cross_entropy"``/``"bce"`` or
            ``"binary_cross_entropy_with_logits"``/``"bce-logits"``.
        class_dim: where the classes are when not where PyTorch wants them (dim 1); the input
            is moved there first (``input.movedim(class_dim, 1)``), and the notes say so.
        max_rows: positions shown in the table (all are in the reduction).
        max_classes: classes shown in each vector cell.
        **kwargs: the function's own options: ``weight``, ``ignore_index``, ``reduction``,
            ``label_smoothing``, ``z_loss``, ``softcap``, ``pos_weight``.
    Returns:
        an :class:`Explanation`; ``.value`` is exactly what the xentkit function returns.
    Raises:
        the function's own exception for input it rejects, with the mistakes found appended.

    Example:
        >>> import torch, xentkit
        >>> logits = torch.tensor([[1.0, 0.5, 2.0], [0.5, 3.0, 1.0]])
        >>> e = xentkit.explain(logits, torch.tensor([2, 1]))
        >>> e.value
        tensor(0.3306)
        >>> print(e.reduction_text)
        mean = Σ loss / Σ weight[target] = 0.6611 / 2.0000 = 0.3306
        >>> [round(r["log p[target]"], 4) for r in e.rows]
        [-0.4644, -0.1967]

    See also :func:`xentkit.cross_entropy`, :func:`xentkit.reference.cross_entropy_terms`.
    """
    name = _loss_name(loss)
    options = _options(name, kwargs)
    _checks.check_floating_input(input)
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}.")
    if max_rows < 0 or max_classes < 1:
        raise ValueError(
            f"max_rows must be >= 0 and max_classes >= 1, got {max_rows} and {max_classes}."
        )
    input, target = input.detach(), target.detach()
    notes: list[str] = []
    if class_dim is not None:
        input, target = _move_classes(name, input, target, class_dim, notes)

    found = _mistakes(name, input, target, options)
    with torch.no_grad():
        try:
            value = getattr(functional, name)(input, target, **kwargs)
        except (ValueError, RuntimeError, IndexError, TypeError) as error:
            if not found:
                raise
            raise _with_findings(error, found) from error
        parts = _BREAKDOWNS[name](input, target, options, max_rows, max_classes)
    parts["computed"] = parts["computed"].reshape(value.shape)  # rows -> the loss's layout
    return Explanation(
        loss=name, notes=notes + parts.pop("notes"), value=value, warnings=found, **parts
    )


def _loss_name(loss: str) -> str:
    if loss not in LOSSES:
        raise ValueError(
            f"loss must be one of {', '.join(map(repr, LOSSES))}, got {loss!r}; "
            "cross_entropy takes logits, nll_loss log-probabilities, "
            "binary_cross_entropy probabilities."
        )
    return LOSSES[loss]


def _options(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(kwargs) - set(OPTIONS[name]))
    if unknown:
        raise TypeError(
            f"explain(loss={name!r}) got unexpected option(s) {', '.join(unknown)}: {name} "
            f"takes {', '.join(OPTIONS[name])}."
        )
    return {**OPTIONS[name], **kwargs}


def _move_classes(
    name: str, input: Tensor, target: Tensor, class_dim: int, notes: list[str]
) -> tuple[Tensor, Tensor]:
    """Move the classes from ``class_dim`` to where PyTorch wants them, and say so."""
    if name not in ("cross_entropy", "nll_loss"):
        raise ValueError(
            f"class_dim applies to cross_entropy and nll_loss; {name} is elementwise (its "
            "pos_weight broadcasts against the last dimension)."
        )
    if not -input.dim() <= class_dim < input.dim():
        raise ValueError(
            f"class_dim={class_dim} is out of range for input of shape {tuple(input.shape)}: "
            f"use a dimension in [{-input.dim()}, {input.dim() - 1}]."
        )
    wanted = 0 if input.dim() == 1 else 1
    source = class_dim % input.dim()
    if source == wanted:
        return input, target
    before = tuple(input.shape)
    if target.shape == input.shape:
        target = target.movedim(source, wanted)
    input = input.movedim(source, wanted)
    notes.append(
        f"Classes moved from dim {class_dim} to dim {wanted}: input.movedim({class_dim}, "
        f"{wanted}) turns {before} into {tuple(input.shape)}."
    )
    return input, target


def _with_findings(error: Exception, found: list[str]) -> Exception:
    """The same kind of exception, its message followed by what :func:`explain` noticed."""
    findings = "\n".join(f"- {w}" for w in found)
    message = f"{error}\n\nxentkit.explain noticed, before the call failed:\n{findings}"
    try:
        return type(error)(message)
    except TypeError:  # an exception type with its own constructor: keep it as it was
        return error


# --------------------------------------------------------------------------------------------
# Breakdowns: one per loss, each returning the Explanation's fields but the value and warnings.


def _position_labels(shape: tuple[int, ...], names: list[str], count: int) -> list[str]:
    """``"n=0, t=3"``-style labels of the first ``count`` positions of ``shape``."""
    if not shape:
        return ["(unbatched)"][:count]
    labels = []
    for flat in range(min(count, math.prod(shape))):
        index = []
        for size in reversed(shape):
            index.append(flat % size)
            flat //= size
        labels.append(", ".join(f"{n}={i}" for n, i in zip(names, reversed(index), strict=True)))
    return labels


def _class_layout_names(ndim: int) -> list[str]:
    """Names of the position dims of a class-layout loss: ``n``, ``n, t``, ``n, d1, d2``."""
    if ndim <= 2:
        return ["n", "t"][:ndim]
    return ["n", *(f"d{i}" for i in range(1, ndim))]


def _elementwise_names(ndim: int) -> list[str]:
    """Names of the dims of an elementwise (binary) loss: ``n``, ``n, c``, ``n, d1, c``."""
    if ndim <= 2:
        return ["n", "c"][:ndim]
    return ["n", *(f"d{i}" for i in range(1, ndim - 1)), "c"]


def _reduction_text(
    reduction: str, parts: list[tuple[str, Tensor, Tensor]], computed: Tensor, shape: tuple
) -> tuple[str, float | None, float | None]:
    """The reduction written out; ``parts`` are ``(formula, numerator, denominator)`` of a
    mean (cross entropy's z-loss part has its own denominator)."""
    if reduction == "none":
        return f"none: one loss per position (the loss column), shape {shape}", None, None
    if reduction == "sum":
        return f"sum = Σ loss = {_number(float(computed))}", float(computed), None
    formula = " + ".join(f for f, _, _ in parts)
    numbers = " + ".join(f"{_number(float(n))} / {_number(float(d))}" for _, n, d in parts)
    text = f"mean = {formula} = {numbers} = {_number(float(computed))}"
    return text, float(parts[0][1]), float(parts[0][2])


def _options_note(options: dict[str, Any], name: str) -> str:
    """The options that differ from PyTorch's defaults, and the reduction."""
    shown = [f"reduction={options['reduction']!r}"]
    for key, default in OPTIONS[name].items():
        value = options[key]
        if key == "reduction" or value is None:
            continue
        if not isinstance(value, Tensor) and value == default:
            continue
        if isinstance(value, Tensor):
            flat = value.flatten()[:8].tolist()
            more = " …" if value.numel() > 8 else ""
            value = f"[{' '.join(map(_number, flat))}{more}]"
        shown.append(f"{key}={value}")
    return "Options: " + ", ".join(shown) + "."


def _cross_entropy(
    input: Tensor, target: Tensor, o: dict[str, Any], max_rows: int, max_classes: int
) -> dict[str, Any]:
    cdim = _checks.class_dim(input)
    index = target.shape != input.shape
    rows = to_rows(input, target.long() if index else target, cdim)
    terms = reference.cross_entropy_terms(
        rows.input, rows.target, o["weight"], o["ignore_index"], o["label_smoothing"],
        o["z_loss"], o["softcap"],
    )  # fmt: skip
    computed = reference.reduce_cross_entropy(terms, o["reduction"])
    num_classes, k = input.shape[cdim], max_classes
    smoothed, z = o["label_smoothing"] > 0, o["z_loss"] > 0
    picked = "log p[target]" if index else ("Σ y' log p" if smoothed else "Σ y log p")
    columns = ["position", "logits"] + (["capped logits"] if o["softcap"] else [])
    columns += ["max", "logsumexp", "softmax", "target", picked]
    columns += ["weight"] if index else []
    columns += ["nll", "smoothing"] if smoothed and index else []
    columns += ["z-loss"] if z else []
    columns.append("loss")

    n = max_rows
    softmax = reference.softmax(terms.logits[:n])
    values = {
        "logits": rows.input[:n, :k].tolist(),
        "capped logits": terms.logits[:n, :k].tolist(),
        "max": terms.logits[:n].amax(-1).tolist() if num_classes else [],
        "logsumexp": terms.lse[:n].tolist(),
        "softmax": softmax[:, :k].tolist(),
        picked: terms.target_log_prob[:n].tolist(),
        "weight": terms.target_weight[:n].tolist(),
        "nll": terms.nll[:n].tolist(),
        "smoothing": terms.smooth[:n].tolist(),
        "z-loss": terms.z[:n].tolist(),
        "loss": terms.loss[:n].tolist(),
    }
    if index:
        values["target"], values[picked] = _index_cells(
            rows.target, terms.counted, terms.target_log_prob, n
        )
    else:
        values["target"] = rows.target[:n, :k].tolist()
    labels = _position_labels(rows.shape, _class_layout_names(len(rows.shape)), n)
    table = [
        {"position": label, **{c: values[c][i] for c in columns[1:]}}
        for i, label in enumerate(labels)
    ]

    # PyTorch's mean divides the cross-entropy part by the summed target weights (the number
    # of positions for probability targets), the z-loss part by the counted positions.
    per = "Σ weight[target]" if index else "positions"
    ce_sum = "Σ (loss - z-loss)" if z else "Σ loss"
    mean = [(f"{ce_sum} / {per}", terms.ce.sum(), terms.denominator)]
    if z:
        mean.append(("Σ z-loss / counted positions", terms.z.sum(), terms.z_denominator))
    text, numerator, denominator = _reduction_text(o["reduction"], mean, computed, rows.shape)

    kind = "class indices" if index else "class probabilities"
    summary = (
        f"cross_entropy of input {tuple(input.shape)} (logits, classes in dim {cdim}, "
        f"C = {num_classes}) and target {tuple(target.shape)} ({kind}), "
        f"{_count(terms.loss.numel(), 'position')}"
    )
    notes = [_options_note(o, "cross_entropy")]
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
    return {
        "summary": summary,
        "notes": notes,
        "columns": columns,
        "rows": table,
        "positions": terms.loss.numel(),
        "classes": num_classes,
        "classes_shown": min(k, num_classes),
        "reduction": o["reduction"],
        "reduction_text": text,
        "numerator": numerator,
        "denominator": denominator,
        "computed": computed,
    }


def _index_cells(
    target: Tensor, counted: Tensor, picked: Tensor, n: int
) -> tuple[list[Any], list[float | None]]:
    """The target and picked log-probability cells; ignored positions say so."""
    flags = counted[:n].tolist()
    targets = [
        t if c else f"{t} (ignored)" for t, c in zip(target[:n].tolist(), flags, strict=True)
    ]
    return targets, [v if c else None for v, c in zip(picked[:n].tolist(), flags, strict=True)]


def _nll_loss(
    input: Tensor, target: Tensor, o: dict[str, Any], max_rows: int, max_classes: int
) -> dict[str, Any]:
    cdim = _checks.class_dim(input)
    rows = to_rows(input, target.long(), cdim)
    log_probs = rows.input.to(reference.accumulation_dtype(input.dtype))
    terms = reference.nll_terms(log_probs, rows.target, o["weight"], o["ignore_index"])
    denominator = terms.target_weight.sum()
    computed = reference.reduce(terms.loss, o["reduction"], denominator)
    n, k, num_classes = max_rows, max_classes, input.shape[cdim]
    columns = ["position", "log-probs", "probs", "Σ probs", "target", "log p[target]"]
    columns += ["weight", "loss"]
    probs = log_probs[:n].exp()  # shown so that rows which are not log-probabilities stand out
    targets, picked = _index_cells(rows.target, terms.counted, terms.target_log_prob, n)
    values = {
        "log-probs": log_probs[:n, :k].tolist(),
        "probs": probs[:, :k].tolist(),
        "Σ probs": probs.sum(-1).tolist(),
        "target": targets,
        "log p[target]": picked,
        "weight": terms.target_weight[:n].tolist(),
        "loss": terms.loss[:n].tolist(),
    }
    labels = _position_labels(rows.shape, _class_layout_names(len(rows.shape)), n)
    table = [
        {"position": label, **{c: values[c][i] for c in columns[1:]}}
        for i, label in enumerate(labels)
    ]
    mean = [("Σ loss / Σ weight[target]", terms.loss.sum(), denominator)]
    text, numerator, denominator_ = _reduction_text(o["reduction"], mean, computed, rows.shape)
    summary = (
        f"nll_loss of input {tuple(input.shape)} (log-probabilities, classes in dim {cdim}, "
        f"C = {num_classes}) and target {tuple(target.shape)} (class indices), "
        f"{_count(terms.loss.numel(), 'position')}"
    )
    return {
        "summary": summary,
        "notes": [_options_note(o, "nll_loss")],
        "columns": columns,
        "rows": table,
        "positions": terms.loss.numel(),
        "classes": num_classes,
        "classes_shown": min(k, num_classes),
        "reduction": o["reduction"],
        "reduction_text": text,
        "numerator": numerator,
        "denominator": denominator_,
        "computed": computed,
    }


def _binary(
    input: Tensor, target: Tensor, o: dict[str, Any], max_rows: int, logits: bool
) -> dict[str, Any]:
    """Both binary losses: one position per element."""
    name = "binary_cross_entropy_with_logits" if logits else "binary_cross_entropy"
    ones, zeros = torch.ones_like(input), torch.zeros_like(input)
    weight, n = o["weight"], max_rows
    if logits:
        pos_weight = o["pos_weight"]
        loss = reference.binary_cross_entropy_with_logits_terms(input, target, weight, pos_weight)
        # With a target of 1 (or 0) the loss is -log σ(x) (or -log(1 - σ(x))): the two logs.
        log_yes = -reference.binary_cross_entropy_with_logits_terms(input, ones)
        log_no = -reference.binary_cross_entropy_with_logits_terms(input, zeros)
        shown = torch.sigmoid(input.to(log_yes.dtype))
        columns = ["position", "logit", "sigmoid", "target", "log σ(x)", "log(1 - σ(x))"]
        columns += ["pos_weight"] if pos_weight is not None else []
    else:
        loss = reference.binary_cross_entropy_terms(input, target, weight)
        log_yes = -reference.binary_cross_entropy_terms(input, ones)
        log_no = -reference.binary_cross_entropy_terms(input, zeros)
        shown, columns = None, ["position", "p", "target", "log p", "log(1 - p)"]
    columns += ["weight"] if weight is not None else []
    columns.append("loss")
    computed = reference.reduce(loss, o["reduction"])

    def first(t: Tensor | None) -> list[float]:
        return [] if t is None else t.expand(input.shape).flatten()[:n].tolist()

    values = {
        "logit": first(input),
        "p": first(input),
        "sigmoid": first(shown),
        "target": first(target),
        "log σ(x)": first(log_yes),
        "log p": first(log_yes),
        "log(1 - σ(x))": first(log_no),
        "log(1 - p)": first(log_no),
        "pos_weight": first(o.get("pos_weight")),
        "weight": first(weight),
        "loss": first(loss),
    }
    labels = _position_labels(tuple(input.shape), _elementwise_names(input.dim()), n)
    table = [
        {"position": label, **{c: values[c][i] for c in columns[1:]}}
        for i, label in enumerate(labels)
    ]
    mean = [("Σ loss / elements", loss.sum(), torch.tensor(float(loss.numel())))]
    text, numerator, denominator = _reduction_text(
        o["reduction"], mean, computed, tuple(input.shape)
    )
    kind = "logits" if logits else "probabilities"
    summary = (
        f"{name} of input {tuple(input.shape)} ({kind}) and target {tuple(target.shape)}, "
        f"elementwise: {_count(input.numel(), 'position')}"
    )
    notes = [_options_note(o, name)]
    if logits and o["pos_weight"] is not None:
        notes.append("pos_weight multiplies the positive (y) term of each class.")
    if not logits:
        notes.append("Each log is floored at -100, as in PyTorch, so p = 0 or 1 stays finite.")
    return {
        "summary": summary,
        "notes": notes,
        "columns": columns,
        "rows": table,
        "positions": input.numel(),
        "classes": None,
        "classes_shown": 0,
        "reduction": o["reduction"],
        "reduction_text": text,
        "numerator": numerator,
        "denominator": denominator,
        "computed": computed,
    }


_BREAKDOWNS = {
    "cross_entropy": _cross_entropy,
    "nll_loss": _nll_loss,
    "binary_cross_entropy": lambda i, t, o, rows, _: _binary(i, t, o, rows, logits=False),
    "binary_cross_entropy_with_logits": lambda i, t, o, rows, _: _binary(
        i, t, o, rows, logits=True
    ),
}


# --------------------------------------------------------------------------------------------
# Mistake detectors. Each looks only at the data, never raises, and names its evidence; a
# detector that could fire on ordinary data needs evidence that chance would not produce.


def _mistakes(name: str, input: Tensor, target: Tensor, o: dict[str, Any]) -> list[str]:
    if name in ("binary_cross_entropy", "binary_cross_entropy_with_logits"):
        return _binary_mistakes(name, input, target)
    if input.dim() == 0:
        return []
    cdim = 0 if input.dim() == 1 else 1
    found = []
    if input.shape[cdim] > 0:
        rows = class_rows(input, cdim).to(torch.float64)
        tol = _HALF_TOL if input.dtype in (torch.float16, torch.bfloat16) else 1e-4
        check = _normalized_as_logits if name == "cross_entropy" else _not_log_probabilities
        found += check(rows, tol)
    found += _transposed(input, target, o["ignore_index"])
    found += _target_form(name, input, target, cdim, o["weight"])
    found += _one_based(input, target, cdim, o["ignore_index"])
    return found


def _is_distribution(rows: Tensor, tol: float) -> tuple[bool, float]:
    """Whether every row lies in [0, 1] and sums to 1, and the largest |sum - 1|."""
    if rows.shape[0] == 0 or rows.shape[1] < 2:  # a single class always "sums to 1"
        return False, math.nan
    error = float((rows.sum(-1) - 1).abs().max())
    in_unit = bool(((rows >= 0) & (rows <= 1)).all())
    return in_unit and error <= tol, error


def _normalized_as_logits(rows: Tensor, tol: float) -> list[str]:
    """cross_entropy given probabilities or log-probabilities instead of logits."""
    is_dist, error = _is_distribution(rows, tol)
    if is_dist:
        return [
            f"input looks like probabilities, not logits: all {rows.shape[0]} rows lie in "
            f"[0, 1] and sum to 1 (largest |sum - 1| = {error:.1e}), so cross_entropy would "
            "apply softmax a second time. Pass the logits from before the softmax, or use "
            "nll_loss(probs.log(), target)."
        ]
    lse = reference.logsumexp(rows, dim=-1)
    finite = lse[torch.isfinite(lse)]
    if rows.shape[1] >= 2 and finite.numel() and float(finite.abs().max()) <= tol:
        return [
            f"input rows are already log-probabilities: the logsumexp of each of the "
            f"{finite.numel()} rows is 0 (largest |logsumexp| = {float(finite.abs().max()):.1e}). "
            "cross_entropy applies log_softmax again, which changes nothing (it is idempotent), "
            "but nll_loss(input, target) is the direct call."
        ]
    return []


def _not_log_probabilities(rows: Tensor, tol: float) -> list[str]:
    """nll_loss given probabilities or logits instead of log-probabilities."""
    is_dist, error = _is_distribution(rows, tol)
    if is_dist:
        return [
            f"nll_loss takes log-probabilities, but all {rows.shape[0]} rows lie in [0, 1] and "
            f"sum to 1 (largest |sum - 1| = {error:.1e}): these are probabilities. Pass "
            "probs.log(), or give the logits to cross_entropy."
        ]
    lse = reference.logsumexp(rows, dim=-1)
    bad = torch.isfinite(lse) & (lse.abs() > tol)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        return [
            f"nll_loss takes log-probabilities (the exp of each row sums to 1, logsumexp 0), "
            f"but {int(bad.sum())} of {rows.shape[0]} rows are not (row {first}: logsumexp "
            f"{_number(float(lse[first]))}): these look like logits. Apply log_softmax first, "
            "or call cross_entropy, which does."
        ]
    return []


def _transposed(input: Tensor, target: Tensor, ignore_index: int) -> list[str]:
    """A class dimension that is not where PyTorch looks for it (dim 1)."""
    if target.is_floating_point() and target.shape == input.shape:
        return []  # probability targets share the input's layout, right or wrong
    shape, given = tuple(input.shape), tuple(target.shape)
    if input.dim() == 2 and given == shape[1:] and shape[0] != shape[1]:
        return [
            f"input {shape} looks transposed: the target {given} has one entry per column, so "
            f"the {shape[0]} classes are in dim 0 where (N, C) is expected. Pass input.T "
            "(class_dim=0, --dim 0)."
        ]
    if input.dim() < 3:
        return []
    expected, classes_last = shape[:1] + shape[2:], shape[:-1]
    if given == classes_last and given != expected:
        return [
            f"the classes look like the last dimension: target {given} is input.shape[:-1], "
            f"the shape for an (N, ..., C) input {shape}, but PyTorch reads dim 1 as the "
            f"classes (N, C, d1, ...) and expects target {expected}. Pass "
            "input.movedim(-1, 1) (class_dim=-1, --dim -1)."
        ]
    if given != expected or target.is_floating_point():
        return []
    counted = target[target != ignore_index]
    if counted.numel() == 0:
        return []
    top = int(counted.max())
    if shape[1] <= top < shape[-1] and int(counted.min()) >= 0:
        return [
            f"the classes may be the last dimension: targets go up to {top}, but dim 1 of "
            f"input {shape} has only {shape[1]} classes, while the last dimension has "
            f"{shape[-1]}. If the input is (N, ..., C), pass input.movedim(-1, 1) "
            "(class_dim=-1, --dim -1) and a target of its shape[:-1]."
        ]
    return []


def _one_hot_rows(target: Tensor, cdim: int) -> bool:
    rows = class_rows(target, cdim)
    return rows.numel() > 0 and bool(
        (((rows == 0) | (rows == 1)).all(-1) & (rows.sum(-1) == 1)).all()
    )


def _target_form(
    name: str, input: Tensor, target: Tensor, cdim: int, weight: Tensor | None
) -> list[str]:
    """One-hot targets, and class indices stored as floats."""
    argmax = f"target.argmax(dim={cdim})"
    if target.shape == input.shape:
        # with a single class every probability row is [1.0]: one-hot by necessity
        if input.shape[cdim] < 2 or not _one_hot_rows(target, cdim):
            return []
        evidence = f"every one of the {target.numel() // input.shape[cdim]} target rows is "
        evidence += f"one-hot ({target.dtype}, a single 1)"
        if not target.is_floating_point():
            extra = " (or target.float() to use them as probabilities)"
            return [
                f"target has the input's shape {tuple(input.shape)} and {evidence}: these are "
                f"one-hot labels; class indices are {argmax}"
                + (extra if name == "cross_entropy" else "")
                + "."
            ]
        if name == "nll_loss":
            return [f"nll_loss takes class indices, but {evidence}: pass {argmax}."]
        differs = (
            " With weight given the two differ: probability targets divide the mean by the "
            "number of positions, indices by Σ weight[target]."
            if weight is not None
            else ""
        )
        return [
            f"{evidence}, so cross_entropy reads it as class probabilities. If class indices "
            f"were meant, {argmax} gives the same loss with less memory and allows "
            f"ignore_index.{differs}"
        ]
    if target.is_floating_point() and target.numel():
        finite = target[torch.isfinite(target)]
        if finite.numel() == target.numel() and bool((finite == finite.round()).all()):
            some = " ".join(_number(v) for v in target.flatten()[:5].tolist())
            some += " …" if target.numel() > 5 else ""
            return [
                f"target holds whole numbers stored as {target.dtype} ({some}): class "
                "indices must be integers; pass target.long()."
            ]
    return []


def _one_based(input: Tensor, target: Tensor, cdim: int, ignore_index: int) -> list[str]:
    """Labels numbered 1..C (or 1..C-1) where PyTorch counts classes from 0."""
    if target.is_floating_point() or target.shape == input.shape:
        return []
    expected = tuple(input.shape[:cdim] + input.shape[cdim + 1 :])
    if tuple(target.shape) != expected and not (input.dim() == 1 and target.numel() == 1):
        return []
    counted = target[target != ignore_index]
    if counted.numel() == 0:
        return []
    num_classes, lo, hi = input.shape[cdim], int(counted.min()), int(counted.max())
    if lo >= 1 and hi == num_classes:
        return [
            f"labels look 1-based: the targets run from {lo} to {hi} = C, but the classes are "
            f"0..{num_classes - 1}, so class 0 never appears and {hi} is out of range. "
            "Pass target - 1."
        ]
    n = counted.numel()
    # Only on large batches: with class 0 as common as the others, the chance that it never
    # appears in n targets is (1 - 1/C)^n, below 5e-5 from n = 10 C on.
    if (
        num_classes >= 3
        and lo == 1
        and hi == num_classes - 1
        and ignore_index != 0
        and n >= max(50, 10 * num_classes)
        and counted.unique().numel() == num_classes - 1
    ):
        chance = (1 - 1 / num_classes) ** n
        return [
            f"labels may be 1-based: in {n} targets every class 1..{num_classes - 1} appears "
            f"but class 0 never does (chance about {chance:.0e} if it were as common as the "
            f"others). If the labels start at 1, logit 0 is never a target and target - 1 "
            f"with {num_classes - 1} classes was meant; if class 0 is just absent from this "
            "data, ignore this."
        ]
    return []


def _binary_mistakes(name: str, input: Tensor, target: Tensor) -> list[str]:
    """Logits given to binary_cross_entropy, probabilities to the logits version, and
    targets outside [0, 1]."""
    found = []
    x = input[torch.isfinite(input)].to(torch.float64)
    outside = (x < 0) | (x > 1)
    span = f"min {_number(float(x.min()))}, max {_number(float(x.max()))}" if x.numel() else ""
    if name == "binary_cross_entropy" and bool(outside.any()):
        found.append(
            f"input has {int(outside.sum())} of {input.numel()} values outside [0, 1] ({span}): "
            "binary_cross_entropy takes probabilities and these look like logits. Pass them to "
            "binary_cross_entropy_with_logits (loss='bce-logits'), which applies the sigmoid "
            "stably."
        )
    # Eight values all in [0, 1] by chance has odds under 2e-4 for standard-normal logits.
    if (
        name == "binary_cross_entropy_with_logits"
        and input.numel() >= 8
        and x.numel() == input.numel()
        and not bool(outside.any())
    ):
        found.append(
            f"all {input.numel()} values of input lie in [0, 1] ({span}): they look like "
            "probabilities, but binary_cross_entropy_with_logits applies a sigmoid first, "
            "squashing them into [0.5, 0.7311]. Pass the logits, or use binary_cross_entropy "
            "(loss='bce') on probabilities."
        )
    if target.is_floating_point() and target.numel():
        y = target[torch.isfinite(target)].to(torch.float64)
        off = (y < 0) | (y > 1)
        if bool(off.any()):
            values = set(y.unique().tolist())
            fix = (
                "these are -1/+1 labels: pass (target + 1) / 2"
                if values <= {-1.0, 1.0}
                else "binary targets are probabilities in [0, 1]"
            )
            found.append(
                f"target has {int(off.sum())} of {target.numel()} values outside [0, 1] (min "
                f"{_number(float(y.min()))}, max {_number(float(y.max()))}): {fix}."
            )
    return found
