"""What :func:`xentkit.explain` returns: the breakdown, its findings and its statistics; every
view of it (text, markdown, HTML, rich, JSON, a picture) is one renderer module."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

from xentkit.explain.format import count, json_value, number


@dataclass(frozen=True)
class Finding:
    """A likely mistake seen in the data.

    Attributes:
        kind: a stable name, e.g. ``"probabilities-as-logits"``, for programs and tests.
        message: what was seen, the evidence in numbers, and the fix.
        evidence: the numbers the message cites, by name.
    """

    kind: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "message": self.message,
            "evidence": {k: json_value(v) for k, v in self.evidence.items()},
        }


@dataclass(frozen=True)
class Stats:
    """The whole batch of an index-target ``cross_entropy`` or ``nll_loss`` in a few numbers.

    Attributes:
        positions: positions in the batch.
        counted: positions whose target is not ``ignore_index``.
        loss: the mean negative log-likelihood of the targets, weighted as the ``"mean"``
            reduction weighs it, without label smoothing or z-loss.
        uniform_loss: :math:`\\ln C`, the loss of predicting every class equally likely.
        perplexity: :math:`e^{\\text{loss}}`.
        accuracy: fraction of counted positions whose most probable class is the target (no
            class scores higher; a tie counts as a hit).
        mean_entropy: mean entropy of the predicted distribution over counted positions (nats;
            :math:`\\ln C` at most).
        ignored_fraction: fraction of positions whose target is ``ignore_index``.
        target_rank: quantiles (``p50``, ``p90``, ``p99``, ``max``) over counted positions of
            the target's rank: how many classes score strictly higher (0 = the top class).
    """

    positions: int
    counted: int
    loss: float
    uniform_loss: float
    perplexity: float
    accuracy: float
    mean_entropy: float
    ignored_fraction: float
    target_rank: dict[str, float]

    def lines(self) -> list[str]:
        """The statistics as short lines of text."""
        ranks = ", ".join(f"{q} {v:g}" for q, v in self.target_rank.items())
        return [
            f"loss {number(self.loss)} (uniform ln C = {number(self.uniform_loss)}), "
            f"perplexity {number(self.perplexity)}",
            f"accuracy {self.accuracy:.2%}, mean entropy {number(self.mean_entropy)} nats, "
            f"{self.counted} of {self.positions} positions counted "
            f"({self.ignored_fraction:.2%} ignored)",
            f"target rank: {ranks or '—'}",
        ]

    def to_dict(self) -> dict[str, Any]:
        return {k: json_value(v) for k, v in asdict(self).items()}


@dataclass
class Explanation:
    """The breakdown of one loss. ``str()`` is a plain-text table; also :meth:`to_markdown`,
    :meth:`to_html` (and the notebook reprs), :meth:`to_dict` (JSON-able), :meth:`plot` and
    rich rendering (``rich.print(explanation)``).

    Attributes:
        loss: the function's name, e.g. ``"cross_entropy"``.
        summary: one line naming the input, target and layout.
        notes: layout and option remarks (moved class dimension, smoothed targets, ...).
        columns: the table's column names.
        rows: one dict per shown position, column -> number, list of numbers,
            :class:`~xentkit.explain.format.TopClasses`, int or text.
        shown: the flat index of each shown position, in the order of ``rows``.
        order: ``"all"`` (every position, in order) or ``"worst"`` (the highest losses first).
        positions: the number of positions (rows of the full table).
        classes: the number of classes (None for the elementwise binary losses).
        classes_shown: how many classes each vector cell shows.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.
        reduction_text: the reduction written out with its numerator and denominator.
        numerator, denominator: the mean's parts (``denominator`` None unless a mean).
        computed: the value recomputed from the terms (the reference maths).
        value: the library's own result, what the xentkit function returns.
        losses: every position's loss (flat), what the large-input plot draws.
        ranks: every counted position's target rank (index targets), or None.
        stats: the batch in numbers (index-target cross entropy and nll), or None.
        gradient_note: with ``grad=True``, why the gradient column is what it is.
        findings: likely mistakes, each with its evidence and the fix.
    """

    loss: str
    summary: str
    notes: list[str]
    columns: list[str]
    rows: list[dict[str, Any]]
    shown: list[int]
    order: str
    positions: int
    classes: int | None
    classes_shown: int
    reduction: str
    reduction_text: str
    numerator: float | None
    denominator: float | None
    computed: Tensor
    value: Tensor
    losses: Tensor
    ranks: Tensor | None = None
    stats: Stats | None = None
    gradient_note: str | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        """The findings' messages."""
        return [f.message for f in self.findings]

    @property
    def kinds(self) -> list[str]:
        """The findings' kinds."""
        return [f.kind for f in self.findings]

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self) -> str:
        return (
            f"<Explanation {self.loss} = {self.value_text()} "
            f"({count(self.positions, 'position')}, {count(len(self.findings), 'finding')})>"
        )

    def value_text(self) -> str:
        """The value: a number, or the shape and first entries of a tensor."""
        if self.value.dim() == 0:
            return number(float(self.value))
        shown = self.value.flatten()[:8].tolist()
        more = " …" if self.value.numel() > 8 else ""
        return f"tensor of shape {tuple(self.value.shape)} [{' '.join(map(number, shown))}{more}]"

    def elided(self) -> list[str]:
        """What the table leaves out, and how it chose what it shows."""
        lines = []
        if self.positions > len(self.rows):
            lines.append(
                f"Showing the {len(self.rows)} positions with the highest loss of "
                f"{self.positions}; all of them are in the reduction."
            )
        if self.classes is not None and self.classes > self.classes_shown:
            lines.append(
                f"Vectors show the {self.classes_shown} most probable of {self.classes} classes "
                "(class:value), then the target with its rank (0 = most probable)."
            )
        return lines

    def footer(self) -> list[str]:
        """The reduction and the value, with the gradient note when there is one."""
        lines = [
            f"reduction: {self.reduction_text}",
            f"value: {self.value_text()}  (xentkit.{self.loss}, {self.value.dtype})",
        ]
        if self.gradient_note:
            lines.append(f"grad: {self.gradient_note}")
        return lines

    def to_text(self) -> str:
        """The plain-text table with its summary, statistics, reduction, value and findings."""
        from xentkit.explain.render_text import render

        return render(self)

    def to_markdown(self) -> str:
        """The same content as a markdown table, with the notes and findings as text."""
        from xentkit.explain.render_markdown import render

        return render(self)

    def to_html(self) -> str:
        """A styled HTML table (no JavaScript), readable on light and dark backgrounds."""
        from xentkit.explain.render_html import render

        return render(self)

    def _repr_html_(self) -> str:
        return self.to_html()

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def __rich_console__(self, console, options):
        """Rich rendering (``rich.print(explanation)``, the ``xentkit explain`` terminal view)."""
        from xentkit.explain.render_rich import render

        yield from render(self, console, options)

    def plot(self, max_positions: int = 8):
        """A matplotlib ``Figure``: per position the softmax bars (target highlighted, its loss
        in the title) when the whole input fits the table, else the distribution of the
        per-position loss (ln C marked) and of the target's rank. Needs matplotlib
        (``pip install 'xentkit[plot]'``)."""
        from xentkit.explain.plot import plot

        return plot(self, max_positions)

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON types; non-finite numbers become ``"nan"``, ``"inf"``."""
        return {
            "loss": self.loss,
            "summary": self.summary,
            "notes": self.notes,
            "columns": self.columns,
            "rows": [{k: json_value(v) for k, v in r.items()} for r in self.rows],
            "shown": self.shown,
            "order": self.order,
            "positions": self.positions,
            "classes": self.classes,
            "classes_shown": self.classes_shown,
            "reduction": {
                "kind": self.reduction,
                "text": self.reduction_text,
                "numerator": json_value(self.numerator),
                "denominator": json_value(self.denominator),
            },
            "value": json_value(self.value.tolist()),
            "stats": None if self.stats is None else self.stats.to_dict(),
            "gradient_note": self.gradient_note,
            "findings": [f.to_dict() for f in self.findings],
            "warnings": self.warnings,
        }
