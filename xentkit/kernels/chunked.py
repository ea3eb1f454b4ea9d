"""Fused cross entropy in torch ops: the loss and its gradient in one pass over the logits.

Once a row's log-sum-exp is known, the gradient of cross entropy with respect to that row's
logits is known in closed form, so the forward pass writes it into one buffer and the backward
pass only scales that buffer by ``grad_output``. The row passes (max, sum of exponentials,
gradient) live in one function, :func:`_fused_rows`, that runs three ways:

* for index targets in float32 or bfloat16 without a softcap, as a C kernel built on first use
  (:mod:`xentkit.kernels.native`): the same formulas with one exponential per logit instead
  of two, each row read once and written once;
* compiled by ``torch.compile``'s C++ (inductor) backend, once per dtype and set of options,
  with dynamic shapes so that a new batch size never recompiles: the generated loop walks the
  rows one at a time and runs all three passes over a row while it is in cache, so the logits
  are read from memory once and the gradient written once;
* eagerly, over chunks of rows sized to stay in cache: for inputs below
  :data:`COMPILE_MIN_ELEMENTS`, and where no C++ compiler is available (chosen automatically
  when compiling fails, which leaves the C kernel on where it applies, or forced with
  ``XENTKIT_NO_COMPILE=1`` or :func:`set_compile`, which turn off the C kernel too).

The first call for a dtype and set of options compiles (seconds; :func:`reset_compiled` lets a
benchmark time it again). A large gradient buffer is mapped with transparent huge pages on
Linux (:func:`_gradient_buffer`): faulting in its 4 KiB pages one by one would otherwise cost
more than the kernel itself.

The formulas are those of :func:`xentkit.reference.cross_entropy_terms`; the tests hold every
way to it and to PyTorch.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from xentkit import reference
from xentkit.kernels import _memory, native, row_stats
from xentkit.kernels._fused_op import fused_cross_entropy

# Elements per chunk of rows in the eager path: about 2 MiB of float32, so a chunk and the
# few temporaries made from it stay in the L2/L3 cache between the passes.
EAGER_CHUNK_ELEMENTS = 1 << 19

# Smaller inputs run the eager kernel: a compilation (seconds, once per dtype and set of
# options) would not pay for itself, and the eager kernel is fast enough on them.
COMPILE_MIN_ELEMENTS = 1 << 20

# The user's switch (XENTKIT_NO_COMPILE, set_compile) of the C and the compiled kernels.
_compile_enabled = os.environ.get("XENTKIT_NO_COMPILE", "") in ("", "0")
# Set when compiling a kernel that does not write over its logits failed: every call that the
# C kernel does not take then runs eagerly.
_compile_failed = False
# The compiled form of each row function (index targets, probability targets), made on first use.
_compiled: dict = {}
# Set when compiling a kernel that writes the gradient over its own logits failed (torch
# 2.13's inductor fails to alias them at large V): such calls then run eagerly, others stay
# compiled.
_inplace_compile_failed = False


def set_compile(enabled: bool) -> None:
    """Use the C and compiled kernels (``True``, the default unless ``XENTKIT_NO_COMPILE=1``
    is set; it also tries compiling again after a failure) or the eager one (``False``)."""
    global _compile_enabled, _compile_failed
    _compile_enabled, _compile_failed = enabled, False


def compile_enabled() -> bool:
    """Whether the next call tries the compiled kernel (False after compiling has failed for a
    call that does not write its gradient over its logits)."""
    return _compile_enabled and not _compile_failed


def inplace_compile_failed() -> bool:
    """Whether compiling a kernel that writes its gradient over its own logits has failed in
    this process (such calls then run the eager kernel)."""
    return _inplace_compile_failed


def reset_compiled() -> None:
    """Forget the compiled kernel, so that the next call compiles again (what the benchmarks
    time as the first call). Compiled code lives in torch's dynamo cache, which this resets
    for every function."""
    global _compile_failed, _inplace_compile_failed
    _compiled.clear()
    _compile_failed = _inplace_compile_failed = False
    torch._dynamo.reset()


def _gradient_buffer(logits: Tensor) -> Tensor:
    """An uninitialised tensor like ``logits`` for the gradient: huge-page mapped when large
    (:mod:`xentkit.kernels._memory`), since faulting in its 4 KiB pages one by one would cost
    more than the kernel itself."""
    if not logits.is_contiguous():
        return torch.empty_like(logits)
    return _memory.large_empty(logits.shape, logits.dtype, logits.device)


def _fused_rows(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    smooth: bool,
    softcap: Tensor | None,
    p_coef: Tensor | None,
    t_coef: Tensor | None,
    s_coef: Tensor | None,
    z_coef: Tensor | None,
    out: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    r"""The row passes over ``(m, V)`` logits: row maxima, sums of exponentials, the smoothing
    sums and, when ``out`` is given, the gradient written into it.

    With :math:`x' = c \tanh(x / c)` (``softcap``) and :math:`s_i = \max_j x'_{ij}`
    (0 when infinite), it returns :math:`\max_j x'_{ij}`, :math:`S_i = \sum_j e^{x'_{ij} - s_i}`
    and (``smooth``) :math:`\sum_j w_j (x'_{ij} - s_i)`, and writes

    .. math:: g_{ij} = \frac{e^{x'_{ij} - s_i}}{S_i}\,(P_i + Z_i\,\mathrm{lse}_i)
              - T_i [j = t_i] - E_i w_j

    times :math:`1 - \tanh^2(x_{ij}/c)` with a softcap, where ``p_coef``, ``t_coef``,
    ``s_coef``, ``z_coef`` are the per-row :math:`P, T, E, Z` of
    :func:`xentkit.kernels.row_stats.cross_entropy_coefficients` (``s_coef``/``z_coef`` None
    for zero terms). ``target`` holds valid class ids (ignored rows have zero coefficients) and
    ``weight`` is in the accumulation dtype.
    """
    acc = reference.accumulation_dtype(logits.dtype)
    x = logits.to(acc)

    # The capped logits are recomputed in each pass instead of kept: inductor on CPU stores a
    # reused tanh as a full (m, V) buffer, which splits the one loop over rows into several.
    def capped() -> Tensor:
        return x if softcap is None else softcap * torch.tanh(x / softcap)

    row_max = capped().amax(-1, keepdim=True)
    # An all -inf row keeps a shift of 0 so that exp(-inf - shift) is 0, not NaN; a +inf
    # maximum stays, so that the row's loss is inf - inf = NaN, as in PyTorch.
    shift = torch.where(row_max == float("-inf"), 0.0, row_max)
    smooth_sum = None
    if smooth:
        shifted = capped() - shift
        smooth_sum = (shifted if weight is None else shifted * weight).sum(-1)
    # In-place updates of fresh temporaries keep the eager kernel to few (m, V) allocations
    # (each a fresh mapping whose pages fault in); compiled, they are plain values.
    exps = (capped() - shift).exp_()
    sum_exp = exps.sum(-1, keepdim=True)

    if out is not None:
        coef = p_coef.unsqueeze(1)
        if z_coef is not None:
            # The log of the broadcast sum keeps the log-sum-exp inside the row loop: inductor
            # would store a per-row log as its own buffer and split the loop.
            lse = shift + torch.log(sum_exp.expand_as(exps))
            coef = coef + z_coef.unsqueeze(1) * lse
        grad = exps.mul_(coef / sum_exp)
        # The one-hot term: a compare inside the row loop when compiled, a scatter of one
        # value per row eagerly (where it would cost two (m, V) temporaries).
        if torch.compiler.is_compiling():
            classes = torch.arange(x.shape[-1], device=x.device)
            grad = grad - torch.where(classes == target.unsqueeze(1), t_coef.unsqueeze(1), 0.0)
        else:
            grad.scatter_add_(1, target.unsqueeze(1), -t_coef.unsqueeze(1))
        if s_coef is not None:
            s = s_coef.unsqueeze(1)
            grad.sub_(s if weight is None else s * weight)
        if softcap is not None:
            tanh = torch.tanh(x / softcap)
            grad.mul_(1 - tanh * tanh)  # d(c tanh(x / c)) / dx
        out.copy_(grad)
    return row_max.squeeze(1), sum_exp.squeeze(1), smooth_sum


def _soft_rows(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    label_smoothing: float,
    softcap: Tensor | None,
    a_coef: Tensor | None,
    z_coef: Tensor | None,
    out: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""The row passes over ``(m, V)`` logits with probability targets ``(m, V)``.

    With :math:`x'` and the shift :math:`s_i` as in :func:`_fused_rows`, smoothed targets
    :math:`y' = (1-\varepsilon) y + \varepsilon / V` and :math:`u = w y'` (:math:`y'`
    without weights), it returns :math:`\max_j x'_{ij}`, :math:`S_i = \sum_j e^{x'_{ij} - s_i}`,
    :math:`U_i = \sum_j u_{ij}` and :math:`\sum_j u_{ij} (x'_{ij} - s_i)`, and writes

    .. math:: g_{ij} = \frac{e^{x'_{ij} - s_i}}{S_i}\,(A_i U_i + Z_i\,\mathrm{lse}_i)
              - A_i u_{ij}

    (times :math:`1 - \tanh^2(x_{ij}/c)` with a softcap): the gradient of
    :math:`A_i \sum_j u_{ij}(\mathrm{lse}_i - x'_{ij}) + Z_i \mathrm{lse}_i^2 / 2`, the terms
    of :func:`xentkit.reference.cross_entropy_terms` for probability targets.
    """
    acc = reference.accumulation_dtype(logits.dtype)
    x = logits.to(acc)

    def capped() -> Tensor:  # recomputed per pass, as in _fused_rows
        return x if softcap is None else softcap * torch.tanh(x / softcap)

    row_max = capped().amax(-1, keepdim=True)
    shift = torch.where(row_max == float("-inf"), 0.0, row_max)
    y = target.to(acc)
    if label_smoothing:
        y = y * (1 - label_smoothing) + label_smoothing / x.shape[-1]
    u = y if weight is None else y * weight
    u_sum = u.sum(-1)
    ux_sum = (u * (capped() - shift)).sum(-1)
    exps = (capped() - shift).exp_()
    sum_exp = exps.sum(-1, keepdim=True)
    if out is not None:
        coef = a_coef.unsqueeze(1) * u_sum.unsqueeze(1)
        if z_coef is not None:
            lse = shift + torch.log(sum_exp.expand_as(exps))  # kept in the row loop, as above
            coef = coef + z_coef.unsqueeze(1) * lse
        grad = exps.mul_(coef / sum_exp).sub_(a_coef.unsqueeze(1) * u)
        if softcap is not None:
            tanh = torch.tanh(x / softcap)
            grad.mul_(1 - tanh * tanh)
        out.copy_(grad)
    return row_max.squeeze(1), sum_exp.squeeze(1), u_sum, ux_sum


def _run_rows(rows_fn, logits: Tensor, out: Tensor | None, *args) -> tuple[Tensor | None, ...]:
    """``rows_fn`` (:func:`_fused_rows` or :func:`_soft_rows`) over all rows: compiled in one
    call, or eagerly chunk by chunk."""
    global _compile_failed, _inplace_compile_failed
    m, num_classes = logits.shape
    # The C kernel first, where it applies (index targets, float32/bfloat16, no softcap).
    if (
        rows_fn is _fused_rows
        and _compile_enabled
        and native.applies(logits, out, args[3])
        and native.library() is not None
    ):
        target, weight, smooth, _softcap, *coefs = args
        return native.fused_rows(logits, target, weight, smooth, *coefs, out)
    in_place = out is not None and out.data_ptr() == logits.data_ptr()
    compiled = compile_enabled() and not (in_place and _inplace_compile_failed)
    # torch.compile specialises sizes 0 and 1 even with dynamic shapes: one row or one class
    # stays eager rather than cost a compilation of its own.
    if compiled and m > 1 and num_classes > 1 and m * num_classes >= COMPILE_MIN_ELEMENTS:
        if rows_fn not in _compiled:
            _compiled[rows_fn] = torch.compile(rows_fn, dynamic=True)
        # In place, `out` is the logits: a detached alias keeps the two arguments distinct
        # objects without autograd state, as inductor needs. Each row is read before its
        # gradient is written over it.
        dest = None if out is None else out.detach()
        try:
            return _compiled[rows_fn](logits, *args, dest)
        except Exception as error:  # no C++ compiler, or an unsupported platform
            result = _eager_rows(rows_fn, logits, out, *args)  # raises when the input is at fault
            if in_place:
                _inplace_compile_failed = True
            else:
                _compile_failed = True
            calls = "calls that write the gradient over the logits" if in_place else "every call"
            warnings.warn(
                f"xentkit: compiling the fused cross-entropy kernel failed ({error!r:.200}); "
                f"using the eager kernel for {calls} from now on. Set XENTKIT_NO_COMPILE=1 to "
                "skip the try.",
                RuntimeWarning,
                stacklevel=2,
            )
            return result
    return _eager_rows(rows_fn, logits, out, *args)


def _eager_rows(rows_fn, logits: Tensor, out: Tensor | None, *args) -> tuple[Tensor | None, ...]:
    """``rows_fn`` over chunks of rows sized to stay in cache; ``args`` are the target (sliced
    with the rows), the class weight, an option, the softcap and per-row coefficients."""
    target, weight, option, softcap, *coefs = args
    m, num_classes = logits.shape
    if m == 0:
        return rows_fn(logits, *args, out)
    rows = max(1, EAGER_CHUNK_ELEMENTS // max(num_classes, 1))
    parts = []
    for start in range(0, m, rows):
        chunk = slice(start, start + rows)
        chunk_coefs = [None if c is None else c[chunk] for c in coefs]
        dest = None if out is None else out[chunk]
        parts.append(
            rows_fn(logits[chunk], target[chunk], weight, option, softcap, *chunk_coefs, dest)
        )
    return tuple(None if p[0] is None else torch.cat(p) for p in zip(*parts, strict=True))


def loss_and_grad(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    ce_scale: float | Tensor | None,
    z_scale: float | Tensor = 1.0,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    r"""Per-row cross entropy and z-loss of a chunk of logits, and their scaled gradient.

    With :math:`x' = c \tanh(x / c)` (``softcap``), :math:`p = \mathrm{softmax}(x')`,
    :math:`\varepsilon` = ``label_smoothing``, :math:`C` classes and
    :math:`W = \sum_c w_c` (:math:`C` without weights), the terms of
    :func:`xentkit.reference.cross_entropy_terms` are
    :math:`\mathrm{ce}_i = (1-\varepsilon)\,w_{t_i}(\mathrm{lse}_i - x'_{i,t_i})
    + \tfrac{\varepsilon}{C}\sum_c w_c(\mathrm{lse}_i - x'_{i,c})` and
    :math:`z_i = z\,\mathrm{lse}_i^2` (both 0 where ``target`` is ``ignore_index``), and the
    gradient of :math:`\sum_i a_i \mathrm{ce}_i + b_i z_i` (:math:`a` = ``ce_scale``,
    :math:`b` = ``z_scale``) is

    .. math:: \frac{\partial}{\partial x'_{i,j}} = p_{i,j}\big(a_i((1-\varepsilon)w_{t_i}
              + \varepsilon W / C) + 2 b_i z\,\mathrm{lse}_i\big)
              - a_i\big((1-\varepsilon)\,w_{t_i}[j = t_i] + \varepsilon\, w_j / C\big)

    times :math:`1 - (x'_{i,j}/c)^2` with a softcap.

    Args:
        logits: ``(m, V)`` logits, any floating dtype.
        target: ``(m,)`` int64 class ids or ``ignore_index``.
        weight: optional ``(V,)`` class weights.
        ignore_index, label_smoothing, z_loss, softcap: as in :func:`xentkit.cross_entropy`.
        ce_scale: ``a``, a scalar or ``(m,)``; None computes no gradient.
        z_scale: ``b``, a scalar or ``(m,)``.
        out: ``(m, V)`` buffer for the gradient (may be ``logits`` itself); allocated when None,
            left alone when ``ce_scale`` is None.
    Returns:
        ``(ce, z, grad)``: ``ce`` and ``z`` ``(m,)`` in float32 (float64 for float64 logits);
        ``grad`` ``(m, V)`` in the logits' dtype, or None when ``ce_scale`` is None.

    Example:
        >>> logits = torch.tensor([[1.0, 0.5, 2.0], [0.5, 3.0, 1.0]])
        >>> ce, z, grad = loss_and_grad(logits, torch.tensor([2, 1]), None, -100, 0.0, 0.0,
        ...                             None, ce_scale=0.5)
        >>> ce
        tensor([0.4644, 0.1967])
        >>> grad
        tensor([[ 0.1156,  0.0701, -0.1857],
                [ 0.0337, -0.0893,  0.0556]])
    """
    acc = reference.accumulation_dtype(logits.dtype)
    num_classes = logits.shape[-1]
    if num_classes == 0:  # valid only when every target is ignored: nothing to compute
        zeros = logits.new_zeros(target.shape, dtype=acc)
        grad = torch.empty_like(logits) if out is None else out
        return zeros, zeros.clone(), None if ce_scale is None else grad
    eps = label_smoothing
    counted = target != ignore_index
    safe_target = torch.where(counted, target, 0)
    w = None if weight is None else weight.to(acc)
    w_t = counted.to(acc) if w is None else torch.where(counted, w[safe_target], 0.0)
    total_w = num_classes if w is None else w.sum()
    cap = None if softcap is None else torch.tensor(softcap, dtype=acc, device=logits.device)

    # The target logits are read first: the gradient may be written over the logits.
    x_t = reference.apply_softcap(
        logits.gather(1, safe_target.unsqueeze(1)).squeeze(1).to(acc), softcap
    )
    coefs, dest = (None,) * 4, None
    if ce_scale is not None:
        coefs = row_stats.cross_entropy_coefficients(
            counted, w_t, total_w, num_classes, eps, z_loss, ce_scale, z_scale
        )
        dest = _gradient_buffer(logits) if out is None else out
    source = logits.detach()
    if not source.is_contiguous():
        source = source.contiguous()
    with torch.no_grad():
        row_max, sum_exp, smooth_sum = _run_rows(
            _fused_rows, source, dest, safe_target, w if eps else None, bool(eps), cap, *coefs
        )

    shift = torch.where(row_max == float("-inf"), 0.0, row_max)
    log_sum = sum_exp.log()
    # lse - x'_t as log_sum - (x'_t - shift): the large common shift never enters a sum.
    ce = torch.where(counted, w_t * (log_sum - (x_t - shift)), 0.0)
    if eps:
        smooth = torch.where(counted, (total_w * log_sum - smooth_sum) / num_classes, 0.0)
        ce = (1 - eps) * ce + eps * smooth
    lse = shift + log_sum
    z = torch.where(counted, z_loss * lse * lse, 0.0) if z_loss else torch.zeros_like(lse)
    return ce, z, dest


def soft_loss_and_grad(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    ce_scale: float | Tensor | None,
    z_scale: float | Tensor = 1.0,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    r"""Per-row cross entropy and z-loss of logits with probability targets, and their scaled
    gradient, in one pass over the logits and the targets (:func:`_soft_rows`).

    With :math:`u = w\,((1-\varepsilon) y + \varepsilon / V)`:
    :math:`\mathrm{ce}_i = \sum_j u_{ij} (\mathrm{lse}_i - x'_{ij})` and
    :math:`z_i = z\,\mathrm{lse}_i^2` (:func:`xentkit.reference.cross_entropy_terms`); the
    gradient is that of :math:`\sum_i a\,\mathrm{ce}_i + b\,z_i` (``ce_scale``, ``z_scale``),
    none when ``ce_scale`` is None.

    Example:
        >>> logits = torch.tensor([[1.0, 0.5, 2.0], [0.5, 3.0, 1.0]])
        >>> probs = torch.tensor([[0.0, 0.0, 1.0], [0.2, 0.8, 0.0]])
        >>> ce, z, grad = soft_loss_and_grad(logits, probs, None, 0.0, 0.0, None, ce_scale=0.5)
        >>> ce
        tensor([0.4644, 0.6967])
        >>> grad
        tensor([[ 0.1156,  0.0701, -0.1857],
                [-0.0663,  0.0107,  0.0556]])
    """
    acc = reference.accumulation_dtype(logits.dtype)
    num_rows = logits.shape[0]
    cap = None if softcap is None else torch.tensor(softcap, dtype=acc, device=logits.device)
    w = None if weight is None else weight.to(acc)
    a_coef = z_coef = dest = None
    if ce_scale is not None:
        a_coef = torch.as_tensor(ce_scale, dtype=acc, device=logits.device).expand(num_rows)
        if z_loss:
            b = torch.as_tensor(z_scale, dtype=acc, device=logits.device)
            z_coef = (2 * z_loss * b).expand(num_rows)
        dest = _gradient_buffer(logits) if out is None else out
    # contiguous() is the tensor itself when it already is
    source, target = logits.detach().contiguous(), target.detach().contiguous()
    with torch.no_grad():
        row_max, sum_exp, u_sum, ux_sum = _run_rows(
            _soft_rows, source, dest, target, w, label_smoothing, cap, a_coef, z_coef
        )
    shift = torch.where(row_max == float("-inf"), 0.0, row_max)
    log_sum = sum_exp.log()
    # sum_j u_j (lse - x'_j) as U log S - sum_j u_j (x'_j - shift): no large common shift.
    ce = u_sum * log_sum - ux_sum
    lse = shift + log_sum
    z = z_loss * lse * lse if z_loss else torch.zeros_like(lse)
    return ce, z, dest


def _forward(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    compute_grad: bool,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The reduced loss of :func:`cross_entropy` and the gradient of that loss (before
    ``grad_output``) when ``compute_grad``, written into ``out`` (allocated when None)."""
    acc = reference.accumulation_dtype(logits.dtype)
    if target.is_floating_point():  # probability targets: every row counts
        scale = 1 / logits.shape[0] if reduction == "mean" and logits.shape[0] else 1.0
        options = (label_smoothing, z_loss, softcap, scale if compute_grad else None, scale, out)
        ce, z, grad = soft_loss_and_grad(logits, target, weight, *options)
        loss = ce + z if z_loss else ce
        if reduction == "none":
            return loss, grad
        # A mean over no row is 0 / 0 = NaN, as in PyTorch.
        return (loss.sum() if reduction == "sum" else loss.sum() / logits.shape[0]), grad
    ce_scale = z_scale = 1.0
    if reduction == "mean":
        # The denominators of reference.reduce_cross_entropy: sum of the counted rows'
        # target weights for the cross entropy, number of counted rows for the z-loss.
        counted = target != ignore_index
        if weight is None:
            denominator = counted.sum().to(acc)
        else:
            safe_target = torch.where(counted, target, 0)
            denominator = torch.where(counted, weight.to(acc)[safe_target], 0.0).sum()
        count = counted.sum().to(acc)
        ce_scale, z_scale = 1 / denominator, 1 / count
    scale = ce_scale if compute_grad else None
    ce, z, grad = loss_and_grad(
        logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, scale, z_scale, out
    )
    if reduction == "none":
        return (ce + z if z_loss else ce), grad
    if reduction == "sum":
        return (ce + z).sum() if z_loss else ce.sum(), grad
    loss = ce.sum() / denominator
    return (loss + z.sum() / count if z_loss else loss), grad


_fused_cross_entropy = fused_cross_entropy("chunked_cross_entropy", _forward)


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    inplace_backward: bool = False,
) -> Tensor:
    r"""Cross entropy of index (or probability) targets with the gradient computed in the
    forward pass.

    Values and gradients are those of :func:`xentkit.reference.cross_entropy` (see
    :func:`loss_and_grad` for the per-row terms and their gradient); the backward pass only
    multiplies the stored gradient by ``grad_output`` (row by row for ``reduction="none"``),
    so it has no second derivative (differentiating twice raises). No gradient is computed when
    ``logits`` does not require one; a ``weight`` that requires grad runs the reference maths,
    the one path that differentiates with respect to it. It is a ``torch.library`` custom op
    (:mod:`xentkit.kernels._fused_op`), so ``torch.compile`` of a caller traces through it.

    Args:
        logits: ``(M, C)`` rows of logits, any floating dtype (accumulated in float32,
            float64 for float64).
        target: ``(M,)`` int64 class ids or ``ignore_index``, or ``(M, C)`` class
            probabilities (:func:`soft_loss_and_grad`; no gradient flows into them).
        weight, ignore_index, reduction, label_smoothing, z_loss, softcap: as in
            :func:`xentkit.cross_entropy` (already validated).
        inplace_backward: write the gradient over ``logits`` instead of a new ``(M, C)``
            buffer; the logits' values are destroyed by the call.
    Returns:
        ``(M,)`` for ``reduction="none"``, else a scalar; in float32 (float64 for float64).

    Example:
        >>> logits = torch.tensor([[1.0, 0.5, 2.0], [0.5, 3.0, 1.0]], requires_grad=True)
        >>> loss = cross_entropy(logits, torch.tensor([2, 1]), None, -100, "mean", 0.0, 0.0, None)
        >>> loss.detach()
        tensor(0.3306)
        >>> loss.backward()
        >>> logits.grad
        tensor([[ 0.1156,  0.0701, -0.1857],
                [ 0.0337, -0.0893,  0.0556]])
    """
    options = (weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
    return _fused_cross_entropy(logits, target, *options, inplace_backward)
