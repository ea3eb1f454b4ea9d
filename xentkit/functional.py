"""Drop-in replacements for ``torch.nn.functional``'s cross-entropy family.

Every call valid for the PyTorch function of the same name is valid here, gives the same
values and gradients (within float rounding) and raises the same kind of exception for bad
input. Each function validates (:mod:`xentkit._checks`), lays the input out as rows
(:mod:`xentkit._layout`), picks a backend (:func:`resolve_backend`) and calls it.

Keyword-only extensions, after PyTorch's arguments, whose defaults keep PyTorch's behaviour:
``z_loss`` (PaLM's ``z_loss * logsumexp**2`` per counted position), ``softcap`` (Gemma 2's
``softcap * tanh(logits / softcap)`` applied first), ``backend`` (``"reference"``,
``"chunked"`` or ``"triton"``; chosen by device when None) and ``inplace_backward``.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from xentkit import _autocast, _checks, reference
from xentkit._layout import to_rows
from xentkit.kernels import row_stats

BACKENDS = ("reference", "chunked", "triton")

# The backend each fused function runs when none is forced, by device type. The reference
# backend is the exact maths of :mod:`xentkit.reference` in torch ops. On CUDA the linear
# cross entropy's default is the chunked design (cuBLAS matrix products on token chunks, each
# chunk's gradient written in place by the Triton row kernel), whose products run at cuBLAS
# speed by construction; the fully fused Triton kernels stay ``backend="triton"`` until a GPU
# measurement (benchmarks/gpu.sh) says otherwise.
DEFAULT_BACKENDS = {
    ("cross_entropy", "cpu"): "chunked",
    ("cross_entropy", "cuda"): "triton",
    ("linear_cross_entropy", "cpu"): "chunked",
    ("linear_cross_entropy", "cuda"): "chunked",
    # Token chunks as above; "triton" runs only the row passes in Triton (log-probs: the
    # per-row statistics and their gradient; distillation: both heads' rows, loss and
    # gradient), so the products are cuBLAS's here too.
    ("linear_log_probs", "cpu"): "chunked",
    ("linear_log_probs", "cuda"): "triton",
    ("linear_distillation_loss", "cpu"): "chunked",
    ("linear_distillation_loss", "cuda"): "triton",
}

# Whether Triton can be imported, looked up once (a lookup is not traceable by torch.compile).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_installed() -> bool:
    return _TRITON_INSTALLED


def resolve_backend(
    backend: str | None,
    function: str,
    device: torch.device,
    weight: Tensor | None = None,
    target: Tensor | None = None,
) -> str:
    """The backend to run: ``backend`` when given, else the default for ``device`` (where
    that is ``"triton"`` and Triton is not installed, ``"chunked"``). A class ``weight`` or a
    probability ``target`` that needs a gradient always runs the reference: the fused kernels
    differentiate the logits only.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(
            f"backend must be one of {', '.join(map(repr, BACKENDS))} or None, got {backend!r}."
        )
    differentiated = any(t is not None and t.requires_grad for t in (weight, target))
    if differentiated and torch.is_grad_enabled():
        return "reference"
    name = backend or DEFAULT_BACKENDS.get((function, device.type), "reference")
    if name == "triton" and backend is None and not _triton_installed():
        return "chunked"
    return name


def kernel(backend: str, function: str) -> Callable[..., Tensor]:
    """The fused implementation of ``function`` in ``backend`` (not ``"reference"``). Its module
    is imported on first use, so Triton never is on CPU; an import statement (unlike
    ``importlib``) is something ``torch.compile`` traces."""
    if backend == "triton":
        from xentkit.kernels import triton as module
    elif function == "cross_entropy":
        from xentkit.kernels import chunked as module
    else:
        from xentkit.kernels import linear_chunked as module
    return getattr(module, function)


def _softmax_dim(name: str, ndim: int) -> int:
    warnings.warn(
        f"Implicit dimension choice for {name} has been deprecated. "
        "Change the call to include dim=X as an argument.",
        UserWarning,
        stacklevel=3,
    )
    return 0 if ndim in (0, 1, 3) else 1


def _normalize(fn, input: Tensor, dim: int | None, dtype: torch.dtype | None, name: str) -> Tensor:
    if dtype is not None:
        input = input.to(dtype)
    elif isinstance(input, Tensor):
        (input,) = _autocast.float32(name, input)
    _checks.check_floating_input(input)
    if dim is None:
        dim = _softmax_dim(name, input.dim())
    _checks.check_dim(input, dim)
    if input.dim() == 0:
        return fn(input.unsqueeze(0).to(reference.accumulation_dtype(input.dtype)), 0)[0].to(
            input.dtype
        )
    return fn(input.to(reference.accumulation_dtype(input.dtype)), dim).to(input.dtype)


def softmax(input: Tensor, dim: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
    r"""Softmax along ``dim``: :math:`e^{x_i - m} / \sum_j e^{x_j - m}` with :math:`m = \max_j x_j`.

    Computed in float32 for half/bfloat16 input (float64 for float64); ``dtype`` casts the input
    first, as in PyTorch.

    Example:
        >>> import torch, xentkit
        >>> xentkit.softmax(torch.tensor([1.0, 0.5, 2.0]), dim=0)
        tensor([0.2312, 0.1402, 0.6285])

    See also :func:`log_softmax`.
    """
    return _normalize(reference.softmax, input, dim, dtype, "softmax")


def log_softmax(input: Tensor, dim: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
    r"""Log-softmax along ``dim``: :math:`x_i - m - \log \sum_j e^{x_j - m}`.

    Example:
        >>> import torch, xentkit
        >>> xentkit.log_softmax(torch.tensor([1.0, 0.5, 2.0]), dim=0)
        tensor([-1.4644, -1.9644, -0.4644])

    See also :func:`softmax`, :func:`nll_loss`.
    """
    return _normalize(reference.log_softmax, input, dim, dtype, "log_softmax")


def _finish(loss: Tensor, reduction: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Per-position losses back to the target's shape; the result in the input's dtype."""
    if reduction == "none":
        loss = loss.reshape(shape)
    return loss.to(dtype)


def nll_loss(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Negative log-likelihood of class indices, given log-probabilities.

    .. math:: \ell_n = -w_{y_n}\, x_{n, y_n}, \qquad
              \text{mean} = \sum_n \ell_n \Big/ \sum_{n:\, y_n \ne \text{ignore\_index}} w_{y_n}

    Args:
        input: log-probabilities ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``.
        target: class indices ``()``, ``(N)`` or ``(N, d1, ..., dk)`` (Long or Byte).
        weight: optional ``(C,)`` class weights.
    Returns:
        the target's shape for ``reduction="none"``, else a scalar.

    Example:
        >>> import torch, xentkit
        >>> logp = torch.tensor([[-1.4644, -1.9644, -0.4644], [-2.6967, -0.1967, -2.1967]])
        >>> xentkit.nll_loss(logp, torch.tensor([2, 1]))
        tensor(0.3306)

    See also :func:`cross_entropy` (which applies :func:`log_softmax` first).
    """
    reduction = _checks.legacy_reduction(size_average, reduce, reduction)
    _checks.check_reduction(reduction)
    _checks.check_floating_input(input)
    input, weight = _autocast.float32("nll_loss", input, weight)
    _checks.check_index_target(input, target, ignore_index)
    cdim = _checks.class_dim(input)
    _checks.check_class_weight(weight, input.shape[cdim], input.dtype)
    rows = to_rows(input, target.long(), cdim)
    acc = reference.accumulation_dtype(input.dtype)
    loss = reference.nll_loss(rows.input.to(acc), rows.target, weight, ignore_index, reduction)
    return _finish(loss, reduction, rows.shape, input.dtype)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    backend: str | None = None,
    inplace_backward: bool = False,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, reference.LossStats]:
    r"""Cross entropy between logits and class-index or class-probability targets.

    .. math:: \ell_n = -\sum_c w_c\, y_{n,c} \log \frac{e^{x_{n,c}}}{\sum_j e^{x_{n,j}}}

    Index targets (``y`` one-hot at :math:`t_n`) with label smoothing :math:`\varepsilon` use
    :math:`(1-\varepsilon)\,\ell_n + \varepsilon\,(-\tfrac1C\sum_c w_c \log p_{n,c})`; the mean
    divides by :math:`\sum_n w_{t_n}` over targets that are not ``ignore_index``. Probability
    targets (a floating target of the input's shape) are smoothed to
    :math:`(1-\varepsilon) y + \varepsilon / C` and the mean divides by the number of positions.

    Args:
        input: logits ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``.
        target: class indices of the input's shape without the class dimension (Long or Byte),
            or class probabilities of the input's shape.
        weight: optional ``(C,)`` class weights.
        z_loss: adds ``z_loss * logsumexp(logits)**2`` per counted position (its mean is over
            counted positions, unweighted).
        softcap: replaces the logits by ``softcap * tanh(logits / softcap)`` first.
        backend: ``"reference"``, ``"chunked"`` or ``"triton"``; None picks by device.
        inplace_backward: lets a fused backend write the gradient into ``input``'s storage
            (its values are destroyed); ignored by the reference backend.
        return_stats: also return :class:`~xentkit.reference.LossStats` (index targets):
            ``z_loss`` (the z-loss part of the loss, same reduction), ``accuracy`` (counted
            positions whose argmax is the target), ``lse`` (per position, 0 where ignored) and
            ``entropy`` (mean over counted positions), detached, from one more read of the
            logits before the kernel runs (no gradient, no extra ``N x C`` memory).
    Returns:
        the target's shape (index) or the input's shape without classes (probabilities) for
        ``reduction="none"``, else a scalar; in the input's dtype. ``(loss, stats)`` with
        ``return_stats``.

    Example:
        >>> import torch, xentkit
        >>> logits = torch.tensor([[1.0, 0.5, 2.0], [0.5, 3.0, 1.0]])
        >>> xentkit.cross_entropy(logits, torch.tensor([2, 1]))
        tensor(0.3306)
        >>> loss, stats = xentkit.cross_entropy(logits, torch.tensor([2, 0]), return_stats=True)
        >>> stats.accuracy, stats.lse, stats.entropy
        (tensor(0.5000), tensor([2.4644, 3.1967]), tensor(0.7468))

    See also :func:`nll_loss`, :func:`linear_cross_entropy`, :func:`xentkit.explain`.
    """
    reduction = _checks.legacy_reduction(size_average, reduce, reduction)
    _checks.check_reduction(reduction)
    _checks.check_floating_input(input)
    if _checks.is_dtensor(input, target, weight):
        from xentkit import distributed

        if return_stats:
            raise NotImplementedError(
                "return_stats is not supported for DTensor logits yet: call "
                "xentkit.distributed.vocab_parallel_cross_entropy(logits.to_local(), target, "
                "group=..., return_stats=True) on the local shard."
            )
        return distributed.dtensor_cross_entropy(
            input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap
        )
    input, target, weight = _autocast.float32("cross_entropy", input, target, weight)
    cdim = _checks.class_dim(input)
    _checks.check_options(label_smoothing, z_loss, softcap)
    out_dtype = input.dtype
    if target.shape == input.shape:
        if return_stats:
            raise ValueError(
                "return_stats needs class-index targets (accuracy and the counted positions "
                "are defined by a target class); got probability targets of the input's shape."
            )
        _checks.check_probability_target(input, target, ignore_index)
        # probability targets promote like torch's elementwise product: input * target * weight
        _checks.check_class_weight(weight, input.shape[cdim], None)
        for other in (target, weight):
            out_dtype = out_dtype if other is None else torch.promote_types(out_dtype, other.dtype)
    else:
        _checks.check_index_target(input, target, ignore_index)
        _checks.check_class_weight(weight, input.shape[cdim], input.dtype)
        target = target.long()
    rows = to_rows(input, target, cdim)
    options = (weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
    name = resolve_backend(backend, "cross_entropy", input.device, weight, rows.target)
    stats = None
    if return_stats:  # read before an in-place kernel writes the gradient over the logits
        triton_rows = name == "triton"
        per_row = row_stats.logits_loss_rows(
            rows.input, rows.target, ignore_index, softcap, triton_rows
        )
        stats = _shaped_stats(reference.loss_stats(*per_row, z_loss, reduction), rows.shape)
    # No classes: nothing for a fused kernel to do (index targets: every one is ignored).
    if name == "reference" or (rows.target.is_floating_point() and not rows.input.shape[-1]):
        loss = reference.cross_entropy(rows.input, rows.target, *options)
    else:
        loss = kernel(name, "cross_entropy")(rows.input, rows.target, *options, inplace_backward)
    loss = _finish(loss, reduction, rows.shape, out_dtype)
    return loss if stats is None else (loss, stats)


def _shaped_stats(stats: reference.LossStats, shape: tuple[int, ...]) -> reference.LossStats:
    """Per-position statistics (``lse``; ``z_loss`` for ``reduction="none"``) in the target's
    shape."""
    z = stats.z_loss.reshape(shape) if stats.z_loss.dim() else stats.z_loss
    return stats._replace(lse=stats.lse.reshape(shape), z_loss=z)


def binary_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Binary cross entropy between probabilities and targets in [0, 1].

    .. math:: \ell = -w\,[\,y \log p + (1 - y) \log(1 - p)\,]

    each log floored at -100 as in PyTorch; the mean is over all elements.

    Example:
        >>> import torch, xentkit
        >>> xentkit.binary_cross_entropy(torch.tensor([0.9, 0.2]), torch.tensor([1.0, 0.0]))
        tensor(0.1643)

    See also :func:`binary_cross_entropy_with_logits`, the stable choice for logits.
    """
    reduction = _checks.legacy_reduction(size_average, reduce, reduction)
    _checks.check_reduction(reduction)
    _checks.check_floating_input(input)
    input, target, weight = _autocast.float32("binary_cross_entropy", input, target, weight)
    _checks.check_same_shape(input, target, "binary_cross_entropy")
    _checks.check_target_dtype(input, target, "binary_cross_entropy", exact=True)
    _checks.check_broadcastable(weight, input, "weight")
    _checks.check_unit_interval(input, "input")
    _checks.check_unit_interval(target, "target")
    loss = reference.binary_cross_entropy(input, target, weight, reduction)
    return loss.to(input.dtype)


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    pos_weight: Tensor | None = None,
) -> Tensor:
    r"""Binary cross entropy on logits, stable for any logit; multi-label with ``pos_weight``.

    .. math:: \ell = -w\,[\,p_w\, y \log \sigma(x) + (1 - y) \log(1 - \sigma(x))\,]

    computed as :math:`(1 - y)\,x + (1 + (p_w - 1)\,y)(\log(1 + e^{-|x|}) + \max(-x, 0))`;
    ``pos_weight`` broadcasts against the last (class) dimension; the mean is over all elements.

    Example:
        >>> import torch, xentkit
        >>> logits, target = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0])
        >>> xentkit.binary_cross_entropy_with_logits(logits, target)
        tensor(0.2201)

    See also :func:`binary_cross_entropy`.
    """
    reduction = _checks.legacy_reduction(size_average, reduce, reduction)
    _checks.check_reduction(reduction)
    _checks.check_floating_input(input)
    input, target, weight, pos_weight = _autocast.float32(
        "binary_cross_entropy_with_logits", input, target, weight, pos_weight
    )
    _checks.check_same_shape(input, target, "binary_cross_entropy_with_logits")
    _checks.check_target_dtype(input, target, "binary_cross_entropy_with_logits", exact=False)
    _checks.check_broadcastable(weight, input, "weight")
    _checks.check_broadcastable(pos_weight, input, "pos_weight")
    loss = reference.binary_cross_entropy_with_logits(input, target, weight, reduction, pos_weight)
    return loss.to(input.dtype)


def linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    class_weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    process_group=None,
    backend: str | None = None,
    return_stats: bool = False,
    filter_eps: float | None = None,
) -> Tensor | tuple[Tensor, reference.LossStats]:
    r"""The LM head and the loss in one op: ``cross_entropy(input @ weight.T + bias, target)``.

    .. math:: \ell_n = -\log \mathrm{softmax}(W h_n + b)_{t_n}

    Args:
        input: hidden states ``(..., D)``.
        weight: classifier ``(V, D)``, the layout of ``nn.Linear(D, V).weight``.
        target: class indices ``(...)``.
        bias: optional ``(V,)``.
        class_weight, ignore_index, reduction, label_smoothing, z_loss, softcap: as in
            :func:`cross_entropy`.
        chunk_size: tokens per chunk for the fused backends (chosen from V and D when None).
        process_group: a ``torch.distributed`` group holding vocabulary shards of ``weight``.
        return_stats: also return :class:`~xentkit.reference.LossStats` as
            :func:`cross_entropy` does, computed from each chunk of logits in the same pass
            (no extra matrix product).
        filter_eps: gradient filtering (off when None): the backward products skip, per
            block of 128 tokens, the classes whose gradient stays below ``filter_eps`` (e.g.
            ``2**-12``) for every token of the block, as Cut Cross-Entropy does; the loss is
            unchanged, the gradients of ``input`` and ``weight`` approximate. Chunked backend,
            ``reduction="mean"``/``"sum"``, no label smoothing; see
            :mod:`xentkit.kernels.grad_filter`.
    Returns:
        the target's shape for ``reduction="none"``, else a scalar; ``(loss, stats)`` with
        ``return_stats``.

    Example:
        >>> import torch, xentkit
        >>> h, w = torch.eye(2), torch.tensor([[1.0, 0.5], [0.5, 3.0], [2.0, 1.0]])
        >>> xentkit.linear_cross_entropy(h, w, torch.tensor([2, 1]))
        tensor(0.3306)

    See also :func:`cross_entropy`, :class:`xentkit.nn.LinearCrossEntropyLoss`.
    """
    args = (input, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing)
    options = (z_loss, softcap, chunk_size, process_group, backend)
    loss = _linear_cross_entropy(*args, *options, return_stats=return_stats, filter_eps=filter_eps)
    # Under autocast the head runs in the autocast dtype and the loss, like F.cross_entropy's,
    # comes back in float32.
    if return_stats:
        loss, stats = loss
        return loss.to(_autocast.loss_dtype(input)), stats
    return loss.to(_autocast.loss_dtype(input))


def _linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    class_weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    chunk_size: int | None,
    process_group,
    backend: str | None,
    return_stats: bool = False,
    filter_eps: float | None = None,
) -> Tensor | tuple[Tensor, reference.LossStats]:
    """:func:`linear_cross_entropy` with the loss left in the accumulation dtype (float32,
    float64 for float64 input), as ``transformers`` computes its loss from upcast logits."""
    options = (class_weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
    if filter_eps is not None and (process_group is not None or _checks.is_dtensor(input, weight)):
        raise ValueError(
            "filter_eps (gradient filtering) is not supported vocab-parallel (process_group= "
            "or DTensor arguments); pass filter_eps=None."
        )
    if _checks.is_dtensor(input, weight, target, bias):
        from xentkit import distributed

        if return_stats:
            raise NotImplementedError(
                "return_stats is not supported with DTensor arguments yet: pass the local "
                "shards (weight.to_local(), bias.to_local()) with process_group= the group of "
                "the mesh dim that splits the vocabulary (mesh.get_group(dim))."
            )
        return distributed.dtensor_linear_cross_entropy(
            input, weight, target, bias, *options, chunk_size
        )
    if process_group is not None:
        from xentkit import distributed

        # Every check runs inside, agreed over the group: a rank that failed alone here would
        # leave the others waiting in their first collective.
        return distributed._linear(
            input, weight, target, bias, class_weight, options[1:], chunk_size, process_group,
            stats=return_stats,
        )  # fmt: skip
    _checks.check_reduction(reduction)
    _checks.check_options(label_smoothing, z_loss, softcap)
    _checks.check_chunk_size(chunk_size)
    input, weight, bias = _autocast.lower(input, weight, bias)
    (class_weight,) = _autocast.float32("cross_entropy", class_weight)
    _checks.check_linear(input, weight, target, bias)
    hidden, labels = input.reshape(-1, input.shape[-1]), target.reshape(-1).long()
    _checks.check_class_weight(
        class_weight, weight.shape[0], _autocast.loss_dtype(input), "class_weight"
    )
    _checks.check_target_range(labels, weight.shape[0], ignore_index)
    name = resolve_backend(backend, "linear_cross_entropy", input.device, class_weight)
    _checks.check_filter_eps(filter_eps, reduction, label_smoothing, name)
    # Only the chunked kernel takes the argument.
    extra = {} if filter_eps is None else {"filter_eps": filter_eps}
    per_row = None
    if name == "reference":
        logits = F.linear(hidden, weight, bias)
        if return_stats:
            per_row = reference.logits_stats(logits, labels, ignore_index, softcap)
        loss = reference.cross_entropy(logits, labels, *options)
    elif return_stats:
        fused = kernel(name, "linear_cross_entropy")
        loss, per_row = fused(
            hidden, weight, labels, bias, *options, chunk_size, stats=True, **extra
        )
        per_row = (*per_row, labels != ignore_index)
    else:
        fused = kernel(name, "linear_cross_entropy")
        loss = fused(hidden, weight, labels, bias, *options, chunk_size, **extra)
    loss = loss.reshape(target.shape) if reduction == "none" else loss
    if per_row is None:
        return loss
    return loss, _shaped_stats(reference.loss_stats(*per_row, z_loss, reduction), target.shape)


def linear_log_probs(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    process_group=None,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Per-token log-probability of the target (and entropy) from the LM head, without the
    ``(..., V)`` logits: what RL fine-tuning (PPO, GRPO) takes from a policy.

    .. math:: \log p_n = s_{n,t_n} - \log \textstyle\sum_j e^{s_{n,j}}, \qquad
              H_n = -\textstyle\sum_j p_{n,j} \log p_{n,j}, \qquad s_n = (W h_n + b) / T

    equal, values and gradients (through both outputs, to ``input``, ``weight`` and ``bias``),
    to ``log_softmax(F.linear(input, weight, bias) / T, -1).gather(-1, target)`` and
    ``-(p * log p).sum(-1)``; see :func:`xentkit.reference.token_statistics`. The fused backend
    walks the tokens in chunks, so its extra memory does not grow with the number of tokens.

    Args:
        input: hidden states ``(..., D)``.
        weight: classifier ``(V, D)``, the layout of ``nn.Linear(D, V).weight``.
        target: class indices ``(...)``: the sampled tokens.
        bias: optional ``(V,)``.
        temperature: :math:`T > 0`, the sampling temperature the logits are divided by.
        return_entropy: also return the entropy of each position's distribution.
        ignore_index: positions with this target get 0 (and no gradient).
        chunk_size: tokens per chunk for the fused backend (chosen from V and D when None).
        process_group: a ``torch.distributed`` group whose ranks each hold a slice of the
            head's rows (``weight``/``bias``), as for :func:`linear_cross_entropy`; ``input``
            and ``target`` the same on every rank.
        backend: ``"chunked"`` (the CPU default: token chunks, torch ops), ``"triton"`` (the
            CUDA default: the same chunks and matrix products, the row passes Triton kernels)
            or ``"reference"`` (builds the logits).
    Returns:
        ``log_prob`` of the target's shape, or ``(log_prob, entropy)`` with
        ``return_entropy``; in the input's dtype (float32 under autocast, where the head runs
        in the autocast dtype).

    Example:
        >>> import torch, xentkit
        >>> h, w = torch.eye(2), torch.tensor([[1.0, 0.5], [0.5, 3.0], [2.0, 1.0]])
        >>> xentkit.linear_log_probs(h, w, torch.tensor([2, 1]), return_entropy=True)
        (tensor([-0.4644, -0.1967]), tensor([0.9060, 0.5876]))
        >>> xentkit.linear_log_probs(h, w, torch.tensor([2, -100]), temperature=2.0)
        tensor([-0.7318,  0.0000])

    See also :func:`linear_cross_entropy` (whose ``reduction="none"`` loss is ``-log_prob``).
    """
    outputs = linear_head_outputs(
        input, weight, target, bias, temperature=temperature,
        outputs=("entropy",) if return_entropy else (), ignore_index=ignore_index,
        chunk_size=chunk_size, process_group=process_group, backend=backend,
    )  # fmt: skip
    return (outputs.log_probs, outputs.entropy) if return_entropy else outputs.log_probs


HEAD_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def linear_head_outputs(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    outputs: tuple[str, ...] | list[str] = ("entropy",),
    ignore_index: int | None = -100,
    chunk_size: int | None = None,
    process_group=None,
    backend: str | None = None,
):
    r"""Every per-token output a training loop takes from the LM head, without the logits:
    the target's log-probability and, as asked by ``outputs``, the entropy, :math:`\log \sum_j
    p_j^2`, the mean logit and whether the target is the top-1 prediction (TRL's fused head).

    With :math:`z = W h + b` and :math:`s = c \tanh(\lambda z / c) / T`
    (:func:`xentkit.reference.token_statistics` is the spec), the same sums as the loss
    (:mod:`xentkit.kernels.row_stats`). ``log_probs`` and ``entropy`` carry gradients to
    ``input``, ``weight`` and ``bias``; the others are statistics without gradient.

    Args:
        input, weight, target, bias, temperature, chunk_size, process_group, backend: as
            :func:`linear_log_probs`.
        logit_scale: :math:`\lambda`, multiplies the head's output first.
        softcap: :math:`c`, the final-logit softcapping (Gemma 2), or None.
        outputs: names from ``("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")``.
        ignore_index: positions with this target get 0 (False for ``is_top1``) and no
            gradient; None when every target is a class.
    Returns:
        :class:`xentkit.kernels.linear_log_probs.HeadOutputs`: each field of the target's
        shape (None when not asked for), in the input's dtype (float32 under autocast;
        ``is_top1`` bool).

    Example:
        >>> import torch
        >>> h, w = torch.eye(2), torch.tensor([[1.0, 0.5], [0.5, 3.0], [2.0, 1.0]])
        >>> out = linear_head_outputs(h, w, torch.tensor([2, 0]), outputs=("is_top1",))
        >>> out.log_probs, out.is_top1
        (tensor([-0.4644, -2.6967]), tensor([ True, False]))
    """
    from xentkit.kernels import linear_log_probs as fused

    unknown = sorted(set(outputs) - set(HEAD_OUTPUTS))
    if unknown or isinstance(outputs, str):
        raise ValueError(
            f"outputs must be a tuple of names from {HEAD_OUTPUTS}, got {outputs!r}; "
            "log_probs is always returned."
        )
    _checks.check_chunk_size(chunk_size)
    _checks.check_temperature(temperature)
    _checks.check_positive("logit_scale", logit_scale)
    if softcap is not None:
        _checks.check_positive("softcap", softcap)
    _checks.check_floating_input(input)
    if process_group is not None or _checks.is_dtensor(input, weight, target, bias):
        from xentkit import distributed

        return distributed.linear_head_outputs(
            input, weight, target, bias, temperature=temperature, logit_scale=logit_scale,
            softcap=softcap, outputs=tuple(outputs), ignore_index=ignore_index,
            chunk_size=chunk_size, group=process_group,
        )  # fmt: skip
    out_dtype = _autocast.loss_dtype(input)
    input, weight, bias = _autocast.lower(input, weight, bias)
    _checks.check_linear(input, weight, target, bias)
    hidden, labels = input.reshape(-1, input.shape[-1]), target.reshape(-1).long()
    # ``None``: every target must be a class; the kernels then compare with a value no int64
    # class id takes.
    ignore = fused.NO_IGNORE if ignore_index is None else ignore_index
    _checks.check_target_range(labels, weight.shape[0], ignore)
    name = resolve_backend(backend, "linear_log_probs", input.device)
    wanted = fused.Outputs(*(field in outputs for field in HEAD_OUTPUTS))
    transform = fused.Transform(temperature, logit_scale, softcap)
    if name == "reference":
        logits = F.linear(hidden, weight, bias)
        stats = reference.token_statistics(logits, labels, *transform[:1], ignore, *transform[1:])
        result = fused.HeadOutputs(
            *(value if asked else None for value, asked in zip(stats, (True, *wanted), strict=True))
        )
    else:
        result = fused.head_outputs(
            hidden, weight, labels, bias, transform, ignore, wanted, chunk_size, name == "triton"
        )
    return fused.HeadOutputs(
        *(
            None
            if value is None
            else value.reshape(target.shape).to(
                value.dtype if value.dtype == torch.bool else out_dtype
            )
            for value in result
        )
    )


def linear_distillation_loss(
    student_input: Tensor,
    student_weight: Tensor,
    teacher_input: Tensor,
    teacher_weight: Tensor,
    target: Tensor | None = None,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    beta: float = 0.0,
    temperature: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    backend: str | None = None,
) -> Tensor:
    r"""Knowledge distillation from the LM heads, without either model's ``(..., V)`` logits:
    TRL's generalized Jensen-Shannon divergence between the student's and the teacher's
    token distributions at ``temperature``, optionally mixed with a hard cross entropy.

    With :math:`p = \mathrm{softmax}((W_s h_s + b_s) / T)`,
    :math:`q = \mathrm{softmax}((W_t h_t + b_t) / T)` and :math:`m = \beta q + (1-\beta) p`,
    per token

    .. math:: \ell = (1-\lambda)\,D_\beta + \lambda\,\mathrm{ce}(W_s h_s + b_s, y), \qquad
              D_0 = \mathrm{KL}(q \,\|\, p), \quad D_1 = \mathrm{KL}(p \,\|\, q), \quad
              D_\beta = \beta\,\mathrm{KL}(q \,\|\, m) + (1-\beta)\,\mathrm{KL}(p \,\|\, m)

    (TRL's ``GKDTrainer.generalized_jsd_loss``; :func:`xentkit.reference.distillation_terms`
    is the spec). The hard term, weighted by :math:`\lambda` = ``hard_weight``, is the cross
    entropy of the student's *raw* logits (temperature 1, as Liger Kernel's distillation
    losses take it). Only the student is trained: ``student_input``, ``student_weight`` and
    ``student_bias`` get gradients, the teacher's tensors are detached. The fused backend walks
    the tokens in chunks and computes the student's gradients in the forward pass (four matrix
    products for ``"mean"`` and ``"sum"``), so its extra memory does not grow with the number
    of tokens.

    Args:
        student_input: student hidden states ``(..., D)``.
        student_weight: student head ``(V, D)``, the layout of ``nn.Linear(D, V).weight``.
        teacher_input: teacher hidden states ``(..., D')`` of the same tokens (``D'`` may
            differ from ``D``).
        teacher_weight: teacher head ``(V, D')`` over the same vocabulary.
        target: labels ``(...)``: tokens whose label is ``ignore_index`` (the prompt, padding)
            count for nothing; None counts every token.
        student_bias, teacher_bias: optional ``(V,)``.
        beta: :math:`\beta \in [0, 1]`: 0 the forward KL (the default, classic KD), 1 the
            reverse KL, 0.5 the Jensen-Shannon divergence (TRL's GKD default).
        temperature: :math:`T > 0`, which both models' logits are divided by (no
            :math:`T^2` factor, as in TRL).
        hard_weight: :math:`\lambda \in [0, 1]`; above 0 it needs ``target``.
        ignore_index: the label of tokens that do not count.
        reduction: ``"mean"`` over the counted tokens (with none counted 0 / 0 = NaN, as
            PyTorch's ``cross_entropy`` gives), ``"sum"``, or ``"none"`` (the tokens' shape, 0
            where ignored).
        chunk_size: tokens per chunk for the fused backend (chosen from V and D when None).
        backend: ``"chunked"`` (the default: token chunks, torch ops, on any device),
            ``"triton"`` (the same chunks and matrix products, each chunk's row passes one
            Triton kernel) or ``"reference"`` (builds both logits).
    Returns:
        a scalar, or the tokens' shape for ``reduction="none"``; in the student's dtype
        (float32 under autocast, where both heads run in the autocast dtype).

    Example:
        >>> import torch, xentkit
        >>> h, w = torch.eye(2), torch.tensor([[1.0, 0.5], [0.5, 3.0], [2.0, 1.0]])
        >>> teacher_w = torch.tensor([[2.0, 0.5], [0.5, 3.0], [1.0, 1.0]])
        >>> xentkit.linear_distillation_loss(h, w, h, teacher_w)
        tensor(0.1987)
        >>> xentkit.linear_distillation_loss(h, w, h, teacher_w, torch.tensor([2, -100]),
        ...                                  beta=0.5, temperature=2.0, reduction="none")
        tensor([0.0234, 0.0000])

    See also :func:`linear_cross_entropy`, :class:`xentkit.nn.LinearDistillationLoss`.
    """
    _checks.check_reduction(reduction)
    _checks.check_chunk_size(chunk_size)
    _checks.check_temperature(temperature)
    _checks.check_distillation_options(beta, hard_weight, target)
    out_dtype = _autocast.loss_dtype(student_input)
    heads = (student_input, student_weight, student_bias, teacher_input, teacher_weight)
    # Both heads run in the autocast dtype, as F.linear would run them.
    *heads, teacher_bias = _autocast.lower(*heads, teacher_bias)
    student_input, student_weight, student_bias, teacher_input, teacher_weight = heads
    # The teacher is not trained: no gradient flows into its tensors.
    teacher_input, teacher_weight = teacher_input.detach(), teacher_weight.detach()
    teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    _checks.check_distillation_heads(
        student_input, student_weight, student_bias, teacher_input, teacher_weight,
        teacher_bias, target,
    )  # fmt: skip
    student = student_input.reshape(-1, student_input.shape[-1])
    teacher = teacher_input.reshape(-1, teacher_input.shape[-1])
    labels = None if target is None else target.reshape(-1).long()
    if labels is not None:
        _checks.check_target_range(labels, student_weight.shape[0], ignore_index)
    options = (beta, temperature, hard_weight, ignore_index)
    name = resolve_backend(backend, "linear_distillation_loss", student.device)
    if name == "reference":
        student_logits = F.linear(student, student_weight, student_bias)
        teacher_logits = F.linear(teacher, teacher_weight, teacher_bias)
        loss = reference.distillation_loss(
            student_logits, teacher_logits, labels, *options, reduction
        )
    else:
        from xentkit.kernels import linear_distill as fused

        # "triton": the same token chunks and matrix products, each chunk's row passes one
        # Triton kernel.
        loss = fused.linear_distillation_loss(
            student, student_weight, teacher, teacher_weight, labels, student_bias,
            teacher_bias, *options, reduction, chunk_size, name == "triton",
        )  # fmt: skip
    if reduction == "none":
        loss = loss.reshape(student_input.shape[:-1])
    return loss.to(out_dtype)
