r"""Fused linear cross entropy in torch ops: the LM head and the loss over token chunks.

``cross_entropy(hidden @ weight.T + bias, target)`` for ``M`` tokens and ``V`` classes would
build ``M x V`` logits and as many gradients. Here the tokens are walked in chunks of ``m``
rows; for each chunk the logits are computed into one reused ``m x V`` buffer, the loss terms
and their gradient by :func:`xentkit.kernels.chunked.loss_and_grad` (the gradient written over
the logits), and that gradient is pushed through the head at once:

.. math:: G = \partial L / \partial Z_{\text{chunk}}, \qquad
          \nabla_H \mathrel{+}= G W, \quad \nabla_W \mathrel{+}= G^\top H_{\text{chunk}},
          \quad \nabla_b \mathrel{+}= \textstyle\sum_{\text{rows}} G

so the extra memory is one chunk of logits plus the float32 weight gradient, whatever ``M``
is: about :data:`CHUNK_BYTES`, at least :data:`MIN_CHUNK_ROWS` tokens, on the CPU (kept
between calls as a workspace, :func:`xentkit.kernels._memory.workspace`), traded for speed
by ``chunk_size``. On the CPU in float32 the chunks' logits products read the weight packed
once per pass (:mod:`xentkit.kernels.packed_gemm`, up to 2 GiB more, also kept) rather than
each packing it again.
Tokens whose target is ``ignore_index`` are dropped before the first matrix product.

For ``reduction="mean"`` and ``"sum"`` every gradient is computed in the forward pass and the
backward pass only multiplies it by ``grad_output``, or, on the CPU for ``loss.backward()``
(``grad_output`` 1), returns it as it is: no pass over the ``V x D`` weight gradient. For
half-precision parameters the forward computes the gradient of the *unnormalised* sum
:math:`\sum_i \mathrm{ce}_i + r\,z_i` (:math:`r` puts the z-loss's own denominator in the same
units) and the backward applies ``grad_output / denominator`` in float32: a half-precision
gradient of a mean over many tokens would otherwise underflow before a loss scaler could lift
it.

For ``reduction="none"`` the per-token ``grad_output`` is not known in the forward and the
weight gradient :math:`\sum_i g_i\, G_i^\top h_i` cannot be assembled without it, so the
forward computes the losses only (one matrix product) and the backward walks the chunks again
with each row's gradient scaled by its ``grad_output`` (three matrix products). Nothing of size
``M x V`` is kept in between.

Matrix products run in the input dtype; loss terms, gradients of the logits and the weight and
bias gradients accumulate in float32 (float64 for float64 input), as under ``torch.autocast``.

On CUDA (when Triton is installed) each chunk's row pass is Triton's row kernel,
:func:`triton_loss_and_grad`, which writes the chunk's gradient over its logits in one launch;
the matrix products stay cuBLAS's. On the CPU it is :func:`xentkit.kernels.chunked.loss_and_grad`
(:data:`ROW_KERNEL` forces either; Triton is imported on first use only).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from xentkit import reference
from xentkit.kernels import _memory, chunked, grad_filter, packed_gemm, row_stats
from xentkit.kernels._fused_op import scale_gradients
from xentkit.kernels.chunked import loss_and_grad

# About this many bytes of logits (plus the chunk's hidden rows and their gradient) per chunk
# on the CPU, and at least MIN_CHUNK_ROWS rows. Each chunk's matrix products run below the
# speed of the whole ones: the two with the weight read all of it (the logits product from a
# copy packed once per pass, xentkit.kernels.packed_gemm, where that applies; otherwise MKL
# packs it again for each), while a chunk's flops, 6 m V D, grow with its m rows (`python -m
# benchmarks.bench_paired --parts` measures the products in these chunks on their own). In
# `python -m benchmarks.bench_paired --shapes
# 2048x512x32768,2048x512x128256,2048x512x256000,8192x512x32768 --rounds 3 --chunk-sizes
# auto,1024,2048` on the project's 2-core VM (run at 0671813, when the minimum was 512 rows
# and D up to 1024), 1024-row chunks took 1.07x, 1.06x, 1.05x and 1.01x the three whole
# products against 1.07x, 1.14x, 1.12x and 1.05x for the 512 to 683 rows chosen then. On a
# host of that VM with 105 MiB of L3 (at 94dddc5, `--chunk-sizes auto,2048,4096` or
# `auto,2048` with `--vocab-major-floor`, auto then 1024 rows), 2048-row chunks took 1.016x
# (against 1.080x for 1024) at 8192x512x128256, 1.055x (1.112x) at 8192x1024x128256, 1.041x
# (1.056x) at 2048x512x128256, 1.064x (1.110x) at 2048x512x256000 and as long at
# 8192x512x256000 (1.092x, 1.093x); at V = 32768, N = 8192 the three noisy rounds disagree
# (1.065x against 1.068x at D = 1024, 1.077x against 1.005x at D = 512). Fewer chunks re-read
# the weight and the (V, D) weight-gradient accumulator fewer times. So the minimum is 2048
# rows: 2000 MiB of float32 logits at V = 256000, what torch's N=2048 logits alone take. One
# such buffer is used (the gradient overwrites the logits), whatever the number of tokens;
# `chunk_size=1024` halves it.
CHUNK_BYTES = 128 * 2**20
MIN_CHUNK_ROWS = 2048
# On a GPU the chunk is sized for the matrix products, not a cache: every chunk reads and
# writes the float32 (V, D) weight-gradient accumulator (about 12 bytes per entry with the
# half-precision partial product) while doing 6 m V D flops, which at ~700 TFLOP/s and
# ~4 TB/s costs about 350 / m of the products' time: 9% at m = 4096. About 1 GiB of logits
# (4096 rows at V = 128256 in bfloat16, 2048 at V = 256000), whatever the number of tokens.
CUDA_CHUNK_BYTES = 2**30
CUDA_MIN_CHUNK_ROWS = 1024

# Which row kernel a chunk runs: None picks by device (Triton's on CUDA where Triton is
# installed, the torch-ops one otherwise); "chunked" or "triton" forces one (the tests force
# "triton" on CPU tensors under TRITON_INTERPRET=1).
ROW_KERNEL: str | None = None
# Looked up once, without importing Triton.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def auto_chunk_size(
    num_classes: int, hidden_dim: int, dtype: torch.dtype, device_type: str = "cpu"
) -> int:
    """Tokens per chunk: about :data:`CHUNK_BYTES` of logits, hidden rows and their gradient.

    A chunk holds ``m (V + 2 D)`` elements (logits, gathered hidden rows, their gradient); the
    row count is a multiple of 32 and at least :data:`MIN_CHUNK_ROWS` (so that each chunk's
    products do enough work per read of the weight). On CUDA (``device_type="cuda"``)
    about :data:`CUDA_CHUNK_BYTES` of logits, a multiple of 256 rows, at least
    :data:`CUDA_MIN_CHUNK_ROWS`.

    Example:
        >>> auto_chunk_size(32768, 512, torch.float32)
        2048
        >>> auto_chunk_size(8192, 512, torch.float32)
        3616
        >>> auto_chunk_size(128256, 4096, torch.bfloat16)
        2048
        >>> auto_chunk_size(128256, 4096, torch.bfloat16, "cuda")
        4096
    """
    if device_type == "cuda":
        row_bytes = num_classes * torch.finfo(dtype).bits // 8
        return max(CUDA_MIN_CHUNK_ROWS, CUDA_CHUNK_BYTES // row_bytes // 256 * 256)
    row_bytes = (num_classes + 2 * hidden_dim) * torch.finfo(dtype).bits // 8
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // row_bytes // 32 * 32)


class Problem:
    """The inputs and options of one call, and the tokens that count."""

    def __init__(
        self,
        hidden: Tensor,
        weight: Tensor,
        target: Tensor,
        bias: Tensor | None,
        class_weight: Tensor | None,
        ignore_index: int,
        label_smoothing: float,
        z_loss: float,
        softcap: float | None,
        chunk_size: int | None,
        filter_eps: float | None = None,
    ) -> None:
        self.hidden, self.weight, self.target, self.bias = hidden, weight, target, bias
        # Gradient filtering (:mod:`xentkit.kernels.grad_filter`) of the backward products.
        self.filter_eps = filter_eps
        self.class_weight = None if class_weight is None else class_weight.detach()
        self.options = (ignore_index, label_smoothing, z_loss, softcap)
        self.acc = reference.accumulation_dtype(hidden.dtype)
        counted = target != ignore_index
        self.count = int(counted.sum())
        # Positions of the counted tokens, or None when all count and chunks can be plain views.
        self.index = None if self.count == target.numel() else counted.nonzero().squeeze(1)
        if chunk_size is None:
            rows = auto_chunk_size(
                weight.shape[0], weight.shape[1], hidden.dtype, hidden.device.type
            )
            # As many chunks as that size needs, of equal size: no short last chunk, whose
            # small matrix products would run far below the others' speed.
            if self.count:
                chunks = -(-self.count // rows)
                rows = -(-self.count // chunks)
        else:
            rows = chunk_size
        self.rows = max(1, min(rows, self.count))
        # The weight packed for the logits products, during a pass (:meth:`workspace`).
        self._packed: packed_gemm.PackedWeight | None = None
        # Whether the forward's gradients are of the reduced loss (the mean's denominator
        # applied) rather than of the unnormalised sum: where they are all in the accumulation
        # dtype (no half-precision rounding to underflow).
        params = [p.dtype for p in (hidden, weight, bias) if p is not None]
        self.normalised = all(dtype == self.acc for dtype in params)

    def chunks(self) -> Iterator[tuple[slice | Tensor, Tensor, Tensor]]:
        """``(positions, hidden rows, targets)`` of each chunk of counted tokens."""
        for start in range(0, self.count, self.rows):
            stop = min(start + self.rows, self.count)
            if self.index is None:
                where: slice | Tensor = slice(start, stop)
                yield where, self.hidden[where], self.target[where]
            else:
                where = self.index[start:stop]
                yield where, self.hidden.index_select(0, where), self.target[where]

    def logits(self, hidden: Tensor, buffer: Tensor) -> Tensor:
        """``hidden @ weight.T + bias`` written into the first rows of ``buffer`` (from the
        weight packed by :meth:`workspace` when it packed it)."""
        out = buffer[: hidden.shape[0]]
        if self._packed is not None:
            return self._packed.logits(hidden, self.bias, out)
        if self.bias is None:
            return torch.mm(hidden, self.weight.T, out=out)
        return torch.addmm(self.bias, hidden, self.weight.T, out=out)

    def buffer(self) -> Tensor:
        """An ``(m, V)`` buffer of the hidden states' dtype (huge-page mapped on the CPU: a
        fresh mapping of 4 KiB pages would fault in page by page)."""
        shape = (self.rows, self.weight.shape[0])
        return _memory.large_empty(shape, self.hidden.dtype, self.hidden.device)

    @contextlib.contextmanager
    def workspace(self) -> Iterator[Tensor]:
        """The ``(m, V)`` buffer every chunk of a pass reuses, for a ``with`` block: on the CPU
        the workspace kept between calls (:func:`xentkit.kernels._memory.workspace`). For the
        block, :meth:`logits` reads the weight packed once
        (:func:`xentkit.kernels.packed_gemm.pack`) where that applies."""
        shape = (self.rows, self.weight.shape[0])
        with _memory.workspace(shape, self.hidden.dtype, self.hidden.device) as buffer:
            if self.hidden.dtype == self.weight.dtype:
                self._packed = packed_gemm.pack(self.weight, self.rows, self.count)
            try:
                yield buffer
            finally:
                self._packed = None

    def denominators(self, reduction: str) -> tuple[Tensor, Tensor]:
        """What the cross-entropy and z-loss sums are divided by: for the mean, the summed
        class weight of the counted targets and the number of counted tokens."""
        one = torch.ones((), dtype=self.acc, device=self.hidden.device)
        if reduction != "mean":
            return one, one
        count = one * self.count
        if self.class_weight is None:
            return count, count
        counted = self.target if self.index is None else self.target[self.index]
        return self.class_weight.to(self.acc)[counted].sum(), count


def _gradient_buffers(
    hidden: Tensor, weight: Tensor, needs: tuple[bool, bool, bool], zero_hidden: bool
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The accumulators of the gradients asked for (``needs``: hidden, weight, bias): the hidden
    states' in their dtype (zeroed when ``zero_hidden``: rows no chunk visits), the weight's
    (uninitialised) and the bias's (zeroed) in the accumulation dtype."""
    acc = reference.accumulation_dtype(hidden.dtype)
    gh = gw = gb = None
    if needs[0]:
        alloc = torch.zeros_like if zero_hidden else torch.empty_like
        gh = alloc(hidden, memory_format=torch.contiguous_format)
    if needs[1]:
        # Uninitialised (:class:`_Gradients` writes the first chunk's product over it), in
        # plain pages kept resident for the next step's (a huge-page mapping, first touched by
        # the matrix product's threads, ran slower in paired runs on this project's VM).
        gw = _memory.cached_empty(tuple(weight.shape), acc, weight.device)
    if needs[2]:
        gb = torch.zeros(weight.shape[0], dtype=acc, device=weight.device)
    return gh, gw, gb


class _Gradients:
    """The gradients of the hidden states, weight and bias that were asked for, accumulated
    chunk by chunk (weight and bias in the accumulation dtype)."""

    def __init__(
        self, problem: Problem, needs: tuple[bool, bool, bool], scale: float | Tensor = 1.0
    ) -> None:
        self.problem = problem
        # What the chunks' gradients are scaled by against the per-token gradient of the summed
        # loss, whose units filtering's threshold is in.
        self.scale = scale
        # Ignored tokens are never visited, so their rows must start at zero.
        zero_hidden = problem.index is not None
        buffers = _gradient_buffers(problem.hidden, problem.weight, needs, zero_hidden)
        self.hidden, self.weight, self.bias = buffers
        # The weight gradient holds nothing yet: the first product is written over it rather
        # than added to zeros (one pass less over the V x D float32 matrix).
        self._weight_empty = self.weight is not None
        # Half-precision products are rounded once per chunk here, then summed in float32.
        self._partial = None
        if self.weight is not None and problem.weight.dtype != problem.acc:
            self._partial = torch.empty_like(self.weight, dtype=problem.weight.dtype)

    @property
    def any(self) -> bool:
        return self.hidden is not None or self.weight is not None or self.bias is not None

    def add(self, where: slice | Tensor, hidden: Tensor, grad: Tensor) -> None:
        """Push one chunk's logits gradient ``grad`` (m, V) through the head (filtered when the
        problem asks for it and the chunk's blocks keep little enough)."""
        if self.bias is not None:
            self.bias.add_(grad.sum(0, dtype=self.problem.acc))
        # The chunk's rows of the hidden-state gradient: a view, or (for gathered tokens) a
        # buffer copied to its rows afterwards.
        gathered = isinstance(where, Tensor)
        out = None
        if self.hidden is not None:
            out = torch.empty_like(hidden) if gathered else self.hidden[where]
        weight, eps = self.problem.weight, self.problem.filter_eps
        if eps is not None:
            eps = eps * self.scale
            self._zero_weight()  # filtering adds its kept rows to it
        if eps is None or not grad_filter.backward_products(
            grad, eps, hidden, weight, out, self.weight
        ):
            if out is not None:
                torch.mm(grad, weight, out=out)
            if self.weight is not None:
                self._add_weight(grad, hidden)
        if gathered and out is not None:
            self.hidden.index_copy_(0, where, out)

    def _add_weight(self, grad: Tensor, hidden: Tensor) -> None:
        """``weight gradient += grad.T @ hidden`` (written over it when it holds nothing yet)."""
        first, self._weight_empty = self._weight_empty, False
        if self._partial is None:
            if first:
                torch.mm(grad.T, hidden, out=self.weight)
            else:
                self.weight.addmm_(grad.T, hidden)
            return
        product = torch.mm(grad.T, hidden, out=self._partial)
        if first:
            self.weight.copy_(product)
        else:
            self.weight.add_(product)

    def _zero_weight(self) -> None:
        """Zero the weight gradient if nothing has been written into it yet."""
        if self._weight_empty:
            self.weight.zero_()
            self._weight_empty = False

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """The three accumulators, an empty tensor standing for each one not asked for (a
        custom op returns tensors, not None)."""
        self._zero_weight()  # no chunk: a zero gradient
        grads = (self.hidden, self.weight, self.bias)
        return tuple(self.problem.hidden.new_empty(0) if g is None else g for g in grads)


def triton_loss_and_grad(
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
    """:func:`xentkit.kernels.chunked.loss_and_grad` (same arguments, same results) by one
    launch of the Triton row kernel :func:`xentkit.kernels.triton._cross_entropy_kernel`:
    one program per row computes its log-sum-exp and loss terms, then writes its gradient
    into ``out`` (which may be ``logits`` itself: each block is read before it is written).

    A per-row ``ce_scale`` ``(m,)`` (the backward of ``reduction="none"``) must be the
    ``z_scale`` too, or ``z_loss`` 0: the kernel scales by two scalars, so the gradient of
    ``ce + z`` is written and then multiplied row by row. Needs CUDA tensors, or CPU tensors
    under ``TRITON_INTERPRET=1``.
    """
    from xentkit.kernels import triton as kernels

    num_rows, num_classes = logits.shape
    acc = reference.accumulation_dtype(logits.dtype)
    one = torch.ones((), dtype=acc, device=logits.device)
    per_row = isinstance(ce_scale, Tensor) and ce_scale.dim() > 0
    if per_row and z_loss and z_scale is not ce_scale:
        raise ValueError("a per-row ce_scale must also be the z_scale when z_loss is set")
    kernels._check_device(logits, target, weight)
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    target = target.contiguous()
    weight = None if weight is None else weight.contiguous()
    # The kernel's constants (scales, total class weight, options) in the order it loads them,
    # with the reduction's scales replaced by this call's.
    consts = kernels._constants("sum", one, one, weight, num_classes, label_smoothing, z_loss,
                                softcap)  # fmt: skip
    if ce_scale is not None and not per_row:
        consts[kernels._CE_SCALE.value] = one * ce_scale
        consts[kernels._Z_SCALE.value] = one * z_scale
    ce = torch.empty(num_rows, dtype=acc, device=logits.device)
    z = torch.empty_like(ce)
    grad = None
    if ce_scale is not None:
        grad = torch.empty_like(logits) if out is None else out
    if num_rows and num_classes:
        block, warps = kernels._ce_block(num_classes)
        dest = logits if grad is None else grad
        kernels._cross_entropy_kernel[(num_rows,)](
            logits, logits.stride(0), dest, dest.stride(0), target, weight, consts, ce, z,
            num_classes, ignore_index, kernels._TL[acc], weight is not None,
            label_smoothing > 0, z_loss > 0, softcap is not None, grad is not None, block,
            num_warps=warps,
        )  # fmt: skip
    else:
        ce.zero_()
        z.zero_()
    if per_row and grad is not None:
        grad.mul_(ce_scale.to(acc).unsqueeze(1))
    return ce, z, grad


def _row_kernel(logits: Tensor) -> Callable[..., tuple[Tensor, Tensor, Tensor | None]]:
    """The row pass of a chunk (:func:`triton_loss_and_grad` or
    :func:`xentkit.kernels.chunked.loss_and_grad`), by :data:`ROW_KERNEL` or the device."""
    name = ROW_KERNEL or ("triton" if logits.is_cuda and _TRITON_INSTALLED else "chunked")
    return triton_loss_and_grad if name == "triton" else loss_and_grad


def _gradient_buffer(problem: Problem) -> Tensor | None:
    """Where the row kernel writes each chunk's gradient: over the chunk's logits (None),
    unless compiling the CPU kernel to write over its own input has failed in this process
    (:func:`xentkit.kernels.chunked.inplace_compile_failed`: such calls run the slower eager
    kernel), in which case a second chunk buffer keeps the compiled one."""
    if _row_kernel(problem.hidden) is triton_loss_and_grad:
        return None
    return problem.buffer() if chunked.inplace_compile_failed() else None


def _chunk_stats(problem: Problem, logits: Tensor, target: Tensor, where, per_row) -> None:
    """Write one chunk's ``(lse, entropy, is_top1)`` into ``per_row`` at ``where``, from a
    float32 copy of its (soft-capped) logits, by the chunk's row kernel's device."""
    x = reference.apply_softcap(logits.to(problem.acc, copy=True), problem.options[3])
    triton_rows = _row_kernel(logits) is triton_loss_and_grad
    counted = torch.ones_like(target, dtype=torch.bool)  # a chunk holds counted tokens only
    values = row_stats.loss_rows(x, target, counted, triton_rows)
    for out, value in zip(per_row, values, strict=True):
        out[where] = value


def _forward(
    problem: Problem, reduction: str, needs: tuple[bool, bool, bool], stats: bool = False
) -> tuple[Tensor, Tensor, _Gradients, list[Tensor]]:
    """The loss; ``unit``; for the mean and the sum the gradients that ``unit`` turns into the
    loss's (the loss's own, ``unit`` 1, where ``problem.normalised``; else its unnormalised
    sum's, ``unit`` 1 / its denominator); and with ``stats`` each token's ``[lse, entropy,
    is_top1]`` (0 / False where ignored; read from each chunk's logits before its row pass
    overwrites them: no extra matrix product)."""
    ce_denominator, z_denominator = problem.denominators(reduction)
    # Gradient of sum(ce_i + ratio * z_i), divided by ce_denominator here where
    # problem.normalised, else by the backward (through unit).
    ratio = ce_denominator / z_denominator
    ce_scale = 1 / ce_denominator if problem.normalised else 1.0
    unit = torch.ones_like(ce_denominator) if problem.normalised else 1 / ce_denominator
    if not problem.count:  # every gradient is zero; 1 / 0 must not turn it into NaN
        unit = torch.zeros_like(ce_denominator)
    grads = _Gradients(problem, needs if reduction != "none" else (False, False, False), ce_scale)
    zero = torch.zeros((), dtype=problem.acc, device=problem.hidden.device)
    losses = zero.new_zeros(problem.target.shape[0]) if reduction == "none" else None
    ce_total, z_total = zero, zero.clone()
    rows = problem.target.shape[0] if stats else 0
    per_row = [
        zero.new_zeros(rows),
        zero.new_zeros(rows),
        torch.zeros_like(problem.target[:rows], dtype=torch.bool),
    ]
    grad_buffer = _gradient_buffer(problem)
    with problem.workspace() as buffer:
        for where, hidden, target in problem.chunks():
            logits = problem.logits(hidden, buffer)
            if stats:
                _chunk_stats(problem, logits, target, where, per_row)
            ce, z, grad = _row_kernel(logits)(
                logits,
                target,
                problem.class_weight,
                *problem.options,
                ce_scale=ce_scale if grads.any else None,
                z_scale=ratio * ce_scale,
                out=logits if grad_buffer is None else grad_buffer[: logits.shape[0]],
            )
            if losses is not None:
                losses[where] = ce + z
            else:
                ce_total += ce.sum()
                z_total += z.sum()
            if grad is not None:
                grads.add(where, hidden, grad)
    if losses is not None:
        return losses, unit, grads, per_row
    # A mean over no counted token is 0 / 0 = NaN, as in PyTorch.
    return ce_total / ce_denominator + z_total / z_denominator, unit, grads, per_row


def backward_over_chunks(
    problem: Problem,
    needs: tuple[bool, bool, bool],
    chunk_grad: Callable[[slice | Tensor, Tensor, Tensor], Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """Walk the chunks again, recompute each one's logits and push ``chunk_grad(positions,
    logits, targets)`` (the gradient of the logits, which it may write over them) through the
    head: the gradients asked for by ``needs`` in the parameters' dtypes, an empty tensor for
    each other one."""
    grads = _Gradients(problem, needs)
    with problem.workspace() as buffer:
        for where, hidden, target in problem.chunks():
            logits = problem.logits(hidden, buffer)
            grads.add(where, hidden, chunk_grad(where, logits, target))
    params = (problem.hidden, problem.weight, problem.bias)
    return tuple(
        g.to(p.dtype) if need else g
        for g, p, need in zip(grads.tensors(), params, needs, strict=True)
    )


def _backward_per_token(
    problem: Problem, grad_output: Tensor, needs: tuple[bool, bool, bool]
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``sum_i grad_output_i * loss_i``: each row's logits gradient is scaled by
    its ``grad_output``."""
    grad_output = grad_output.to(problem.acc)
    grad_buffer = _gradient_buffer(problem)

    def chunk_grad(where: slice | Tensor, logits: Tensor, target: Tensor) -> Tensor:
        scale = grad_output[where]
        options = (problem.class_weight, *problem.options)
        out = logits if grad_buffer is None else grad_buffer[: logits.shape[0]]
        _, _, grad = _row_kernel(logits)(
            logits, target, *options, ce_scale=scale, z_scale=scale, out=out
        )
        return grad

    return backward_over_chunks(problem, needs, chunk_grad)


@torch.library.custom_op("xentkit::linear_cross_entropy", mutates_args=())
def _linear_op(
    hidden: Tensor,
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
    filter_eps: float | None,
    needs: list[bool],
    stats: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, unit, grad_hidden, grad_weight, grad_bias, lse, entropy, is_top1)``: for the
    mean and the sum the gradients asked for by ``needs`` of the unnormalised sum (see the
    module docstring), which the backward multiplies by ``grad_output * unit``; empty tensors
    for the others; the per-token statistics with ``stats`` (else empty). One opaque
    op, so that a ``torch.compile`` of the caller neither unrolls nor re-traces the chunk loop
    (its length depends on how many tokens count)."""
    options = (ignore_index, label_smoothing, z_loss, softcap)
    problem = Problem(hidden, weight, target, bias, class_weight, *options, chunk_size, filter_eps)
    loss, unit, grads, per_row = _forward(problem, reduction, tuple(needs), stats)
    return loss, unit, *grads.tensors(), *per_row


@_linear_op.register_fake
def _(hidden, weight, target, bias, class_weight, ignore_index, reduction, *options):
    needs, stats = options[-2:]
    acc = reference.accumulation_dtype(hidden.dtype)
    loss = hidden.new_empty(target.shape if reduction == "none" else (), dtype=acc)
    early = needs if reduction != "none" else (False, False, False)
    grads = _gradient_buffers(hidden, weight, early, zero_hidden=False)
    grads = tuple(hidden.new_empty(0) if g is None else g for g in grads)
    rows = target.shape[0] if stats else 0
    per_row = (hidden.new_empty(rows, dtype=acc), hidden.new_empty(rows, dtype=acc))
    top1 = hidden.new_empty(rows, dtype=torch.bool)
    return loss, hidden.new_empty((), dtype=acc), *grads, *per_row, top1


@torch.library.custom_op("xentkit::linear_cross_entropy_backward", mutates_args=())
def _linear_backward_op(
    grad_output: Tensor,
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    class_weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    chunk_size: int | None,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of ``sum_i grad_output_i * loss_i`` (``reduction="none"``) in the
    parameters' dtypes, an empty tensor for each one not asked for."""
    options = (ignore_index, label_smoothing, z_loss, softcap)
    problem = Problem(hidden, weight, target, bias, class_weight, *options, chunk_size)
    return _backward_per_token(problem, grad_output, tuple(needs))


@_linear_backward_op.register_fake
def _(grad_output, hidden, weight, target, bias, *options):
    needs = options[-1]
    grads = _gradient_buffers(hidden, weight, tuple(needs), zero_hidden=False)
    params = (hidden, weight, bias)
    return tuple(
        hidden.new_empty(0) if g is None else g.to(p.dtype)
        for g, p in zip(grads, params, strict=True)
    )


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, target, bias, class_weight, *options, _filter, needs, _stats = inputs
    ctx.reduction, ctx.needs = options[1], needs
    ctx.dtypes = tuple(None if p is None else p.dtype for p in (hidden, weight, bias))
    if ctx.reduction == "none":
        del options[1]
        ctx.options = (*options, needs)
        # Saved through autograd so that a backward which reads the inputs again notices
        # in-place changes to them.
        ctx.save_for_backward(hidden, weight, target, bias, class_weight)
    else:
        ctx.save_for_backward(*output[1:5])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss: Tensor | None, *_unused):
    none = (None,) * 10
    if grad_loss is None:
        return None, None, None, None, *none
    if ctx.reduction == "none":
        hidden, weight, target, bias, class_weight = ctx.saved_tensors
        grads = _linear_backward_op(
            grad_loss, hidden, weight, target, bias, class_weight, *ctx.options
        )
    else:
        unit, *grads = ctx.saved_tensors
        grads = scale_gradients(grads, grad_loss * unit)
    gh, gw, gb = (
        g.to(dtype) if need else None
        for g, dtype, need in zip(grads, ctx.dtypes, ctx.needs, strict=True)
    )
    return gh, gw, None, gb, *none


_linear_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(
    hidden: Tensor,
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
    stats: bool = False,
    filter_eps: float | None = None,
) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    r"""Fused ``cross_entropy(hidden @ weight.T + bias, target)`` over token chunks.

    .. math:: \ell_i = (1-\varepsilon)\,w_{t_i}(\mathrm{lse}(z_i) - z_{i,t_i})
              + \tfrac{\varepsilon}{V}\textstyle\sum_c w_c(\mathrm{lse}(z_i) - z_{i,c})
              + \zeta\,\mathrm{lse}(z_i)^2, \qquad z_i = W h_i + b

    (with :math:`z` soft-capped first when ``softcap`` is set); the terms are those of
    :func:`xentkit.reference.cross_entropy_terms`, the reduction that of PyTorch. The chunk
    loop is a ``torch.library`` custom op with a registered backward, so ``torch.compile`` of
    a caller keeps it whole, with no graph break and no recompilation for a new batch size.

    Args:
        hidden: ``(M, D)`` hidden states.
        weight: ``(V, D)`` classifier, the layout of ``nn.Linear(D, V).weight``.
        target: ``(M,)`` int64 class ids or ``ignore_index``.
        bias: optional ``(V,)``.
        class_weight: optional ``(V,)`` class weights (no gradient flows into them).
        ignore_index, reduction, label_smoothing, z_loss, softcap: as in
            :func:`xentkit.cross_entropy`.
        chunk_size: tokens per chunk; :func:`auto_chunk_size` when None.
        stats: also return each token's ``(lse, entropy, is_top1)`` (0 / False where ignored),
            the inputs of :func:`xentkit.reference.loss_stats`.
        filter_eps: gradient filtering (:mod:`xentkit.kernels.grad_filter`) of the backward
            products for ``reduction="mean"`` or ``"sum"``; None computes them exactly.
    Returns:
        ``(M,)`` for ``reduction="none"``, else a scalar; float32 (float64 for float64 input).
        ``(loss, (lse, entropy, is_top1))`` with ``stats``.

    Example:
        >>> h, w = torch.eye(2), torch.tensor([[1.0, 0.5], [0.5, 3.0], [2.0, 1.0]])
        >>> linear_cross_entropy(h, w, torch.tensor([2, 1]), None, None, -100, "none", 0.0,
        ...                      0.0, None, None)
        tensor([0.4644, 0.1967])
    """
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and p is not None and p.requires_grad for p in (hidden, weight, bias)]
    options = (ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size)
    out = _linear_op(hidden, weight, target, bias, class_weight, *options, filter_eps, needs, stats)
    return (out[0], tuple(out[5:])) if stats else out[0]
