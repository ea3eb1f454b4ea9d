"""PyTorch's loss layouts to rows and back.

The losses accept ``(C)``, ``(N, C)`` and ``(N, C, d1, ..., dk)`` inputs, with the classes in
dimension 1 (0 when unbatched). Every backend works on rows: ``(M, C)`` with the classes last,
where ``M`` counts the positions. :func:`to_rows` moves the class dimension last and flattens;
the per-position output of ``reduction="none"`` is then reshaped to :attr:`Rows.shape`.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Rows(NamedTuple):
    input: Tensor  # (M, C)
    target: Tensor  # (M,) indices or (M, C) probabilities
    shape: tuple[int, ...]  # the shape of the per-position loss: input.shape without classes


def class_rows(x: Tensor, class_dim: int) -> Tensor:
    """``(..., C, ...)`` with the classes at ``class_dim`` to ``(M, C)`` (a view when it can be)."""
    moved = x.movedim(class_dim, -1)
    # an explicit row count, since -1 cannot be inferred when there are no classes
    return moved.reshape(moved.shape[:-1].numel(), x.shape[class_dim])


def to_rows(input: Tensor, target: Tensor, class_dim: int) -> Rows:
    """Rows of ``input`` and the matching rows of an index or probability ``target``."""
    shape = tuple(input.shape[:class_dim] + input.shape[class_dim + 1 :])
    rows = class_rows(input, class_dim)
    if target.shape == input.shape:
        return Rows(rows, class_rows(target, class_dim), shape)
    return Rows(rows, target.reshape(-1), shape)
