"""The :func:`explain` function: validate, find mistakes, compute, assemble."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from xentkit import _checks, functional
from xentkit.explain import terms
from xentkit.explain.explanation import Explanation, Finding
from xentkit.explain.findings import Context, find
from xentkit.explain.options import LOSSES, OPTIONS


def explain(
    input: Tensor,
    target: Tensor,
    loss: str = "cross_entropy",
    *,
    class_dim: int | None = None,
    max_rows: int = 8,
    max_classes: int = 8,
    grad: bool = False,
    **kwargs: Any,
) -> Explanation:
    r"""Explain a loss term by term: every intermediate quantity per position, the reduction
    with its denominator, the final value, the batch's statistics and the mistakes the data
    suggests.

    For cross entropy each position shows the logits :math:`x`, :math:`m = \max_c x_c`,
    :math:`\mathrm{lse} = m + \log\sum_c e^{x_c - m}`, the softmax :math:`e^{x - \mathrm{lse}}`,
    the target :math:`t`, the picked :math:`\log p_t = x_t - \mathrm{lse}`, its weight
    :math:`w_t`, the smoothing and z-loss terms and the position's loss
    :math:`\ell = -w_t \log p_t` (see :func:`xentkit.reference.cross_entropy_terms`);
    ``nll_loss`` starts from log-probabilities, the binary losses are elementwise. When the
    input has more positions than ``max_rows``, the table shows those with the highest loss;
    with more classes than ``max_classes``, each vector shows the most probable classes and the
    target with its rank.

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
        grad: add each shown position's gradient of the returned loss with respect to its
            input (a ``grad`` column) and a line saying why it is what it is.
        **kwargs: the function's own options: ``weight``, ``ignore_index``, ``reduction``,
            ``label_smoothing``, ``z_loss``, ``softcap``, ``pos_weight``.
    Returns:
        an :class:`~xentkit.explain.Explanation`; ``.value`` is exactly what the xentkit
        function returns, ``.findings`` the likely mistakes, ``.stats`` the batch in numbers
        (index-target cross entropy and nll).
    Raises:
        the function's own exception for input it rejects, the findings' messages appended to
        its text and the :class:`~xentkit.explain.Finding` objects as its ``findings``.

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
        >>> round(e.stats.accuracy, 2), round(e.stats.uniform_loss, 4)
        (1.0, 1.0986)
        >>> xentkit.explain(logits.softmax(1), torch.tensor([2, 1])).kinds
        ['probabilities-as-logits']

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

    context = Context(name, input, target, options)
    with torch.no_grad():
        try:
            value = getattr(functional, name)(input, target, **kwargs)
        except (ValueError, RuntimeError, IndexError, TypeError) as error:
            found = find(context)
            if not found:
                raise
            raise _with_findings(error, found) from error
        if name in ("binary_cross_entropy", "binary_cross_entropy_with_logits"):
            logits = name == "binary_cross_entropy_with_logits"
            parts = terms.binary(input, target, options, max_rows, logits, grad)
        else:
            breakdown = terms.cross_entropy if name == "cross_entropy" else terms.nll_loss
            parts = breakdown(input, target, options, max_rows, max_classes, grad)
    parts["computed"] = parts["computed"].reshape(value.shape)  # rows -> the loss's layout
    context.stats = parts["stats"]
    return Explanation(
        loss=name,
        notes=notes + parts.pop("notes"),
        value=value,
        findings=find(context),
        **parts,
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


def _with_findings(error: Exception, found: list[Finding]) -> Exception:
    """The same kind of exception, its message followed by the findings' messages, and the
    findings themselves as its ``findings``."""
    listed = "\n".join(f"- [{f.kind}] {f.message}" for f in found)
    message = f"{error}\n\nxentkit.explain noticed, before the call failed:\n{listed}"
    try:
        raised = type(error)(message)
    except TypeError:  # an exception type with its own constructor: keep it as it was
        raised = error
    raised.findings = found
    return raised
