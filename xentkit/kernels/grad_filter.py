r"""Gradient filtering: skip the backward matrix products where the softmax is negligible.

After training, a language model's softmax is peaked: a token's gradient of its loss with
respect to the logits, :math:`g_{ic} = p_{ic} - y_{ic}` (scaled by its class weight, plus the
z-loss's :math:`2\zeta\,\mathrm{lse}_i\,p_{ic}`), is tiny for almost every class :math:`c`. A
chunk's two backward products, :math:`\nabla_H = G W` and :math:`\nabla_W \mathrel{+}= G^\top H`,
spend two thirds of the head's flops mostly on such entries. Filtering treats as zero every
entry of a block of :data:`BLOCK_ROWS` consecutive tokens (of a chunk's counted tokens) and one
class whose gradients all stay below ``eps`` in magnitude,

.. math:: \tilde G_{ic} = G_{ic}\,[\max_{j \in \mathrm{block}(i)} |G_{jc}| \ge \varepsilon],

and multiplies only the classes each block keeps: the rows of ``W`` and of ``G`` it keeps are
gathered, so a block costs :math:`4\,b\,K\,D` flops for its :math:`K` kept classes instead of
:math:`4\,b\,V\,D`. The forward product (the logits) and the loss are untouched; the bias
gradient (a sum, no product) stays exact. This is Cut Cross-Entropy's filtering, done on token
blocks and single classes, so no reordering of the vocabulary is needed.

``eps`` bounds what each dropped entry contributed to the unnormalised gradient of the summed
loss (:math:`2^{-12}` is below what a bfloat16 gradient resolves next to the kept entries of
order one), not what all of them did: a row drops thousands of classes, and their summed
probability, whose gradient pushes the tail of the softmax down, is lost with them. It is an
approximation, off unless asked for (``filter_eps=`` of :func:`xentkit.linear_cross_entropy`);
``benchmarks/bench_grad_filter.py`` measures its speed and the loss curve it trains (on the
demo's tiny LM, whose softmax keeps a heavy tail, ``2**-12`` trains a clearly worse model:
see ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Tokens per filtering block. Each block gathers its kept rows of the (V, D) weight, which costs
# memory traffic next to its 4 b K D flops: a short block keeps fewer classes, a long one pays
# less for the gather (32 to 256 rows kept 9% to 12% of the entries of the trained tiny LM;
# 128 and more ran fastest on the project's 2-core machine).
BLOCK_ROWS = 128
# A chunk whose blocks keep more than this fraction of their entries runs the dense products.
DENSE_FRACTION = 0.5


def kept_classes(grad: Tensor, eps: float, block_rows: int | None = None) -> Tensor:
    """``(ceil(m / block_rows), V)`` bool: the classes each block of ``grad``'s rows keeps (some
    row's gradient reaches ``eps`` in magnitude).

    Example:
        >>> g = torch.tensor([[0.5, 1e-5, -0.5], [-0.25, -1e-6, 0.25], [1e-5, -0.9, 0.9]])
        >>> kept_classes(g, 2**-12, block_rows=2)
        tensor([[ True, False,  True],
                [False,  True,  True]])
    """
    if grad.shape[0] == 0:
        return grad.new_zeros((0, grad.shape[1]), dtype=torch.bool)
    blocks = torch.split(grad, block_rows or BLOCK_ROWS)
    # max |g| as max(max g, -min g): two plain reductions, several times faster than abs().
    return torch.stack([torch.maximum(b.amax(0), b.amin(0).neg_()) for b in blocks]) >= eps


def chunk_filter(grad: Tensor, eps: float) -> Tensor | None:
    """:func:`kept_classes` of a chunk's gradient, or None when its blocks keep more than
    :data:`DENSE_FRACTION` of the entries: gathering would cost more than it saves, and the
    chunk's products are computed exactly."""
    kept = kept_classes(grad, eps)
    return None if kept.numel() == 0 or kept.float().mean() > DENSE_FRACTION else kept


def filtered(grad: Tensor, eps: float) -> Tensor:
    r""":math:`\tilde G` of one chunk's gradient ``grad``: the entries its blocks drop set to
    zero, or ``grad`` itself when :func:`chunk_filter` keeps it whole (the specification the
    gathered products of :func:`backward_products` follow)."""
    kept = chunk_filter(grad, eps)
    if kept is None:
        return grad
    return grad * kept.repeat_interleave(BLOCK_ROWS, 0)[: len(grad)]


def backward_products(
    grad: Tensor,
    eps: float,
    hidden: Tensor,
    weight: Tensor,
    grad_hidden: Tensor | None,
    grad_weight: Tensor | None,
) -> bool:
    r"""The chunk's two backward products with :math:`\tilde G` in place of ``grad`` ``(m, V)``:
    :math:`\tilde G W` written into ``grad_hidden`` ``(m, D)`` and :math:`\tilde G^\top H` added
    to ``grad_weight`` ``(V, D)`` (the accumulation dtype), each when not None, block by block
    over the classes each block keeps. Does nothing and returns False where
    :func:`chunk_filter` keeps the chunk whole: the caller runs the exact products."""
    kept = chunk_filter(grad, eps)
    if kept is None:
        return False
    for number, keep in enumerate(kept):
        rows = slice(number * BLOCK_ROWS, (number + 1) * BLOCK_ROWS)
        classes = keep.nonzero().squeeze(1)
        block = grad[rows].index_select(1, classes)
        if grad_hidden is not None:
            torch.mm(block, weight.index_select(0, classes), out=grad_hidden[rows])
        if grad_weight is not None:
            product = torch.mm(block.T, hidden[rows])
            grad_weight.index_add_(0, classes, product.to(grad_weight.dtype))
    return True
