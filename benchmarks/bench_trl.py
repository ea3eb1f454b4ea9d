"""Suites ``trl_log_probs`` and ``trl_distill``: TRL's fused LM head and distillation kernel,
TRL's own against xentkit's stand-ins (:mod:`xentkit.integrations.trl`, what ``patch()``
installs), forward + backward to ``h`` ``(N, D)`` and ``W`` ``(V, D)``, each next to its
matrix-product floor measured in the same run.

``trl_log_probs`` (TRL's ``ChunkedLogProbFunction``, temperature 0.7, no bias; the gradient
flows through every differentiable output, with per-token ``grad_output`` as a policy-gradient
loss gives them):

- ``trl`` / ``xentkit``: the log-probabilities only (what DPO, KTO, RLOO and a reference model
  ask for);
- ``trl-entropy`` / ``xentkit-entropy``: with the entropy too (GRPO's policy), the entropy's
  gradient included;
- ``floor``: the three matrix products of suite ``linear``; a fused path needs a fourth here,
  since the per-token gradients are only known in backward, which recomputes the logits.

``trl_distill`` (TRL's ``ChunkedDivergenceFunction``: generalized JSD at beta 0.5, a teacher as
wide as the student, the per-token divergence and the student's entropy; gradients to the
student only):

- ``trl`` / ``xentkit``: TRL's kernel and :class:`xentkit.integrations.trl.DivergenceHead`
  (:func:`xentkit.linear_distillation_loss` with ``reduction="none"``, plus one pass without
  gradient over the student's head for the entropy TRL reports);
- ``floor``: four matrix products: both heads' logits, and the two gradients of the student's.

Run (``benchmarks/run.py --suite trl_log_probs,trl_distill`` runs the same)::

    python -m benchmarks.bench_trl            # N=2048 D=512 V=32768 float32
    python -m benchmarks.bench_trl --quick    # tiny shapes: checks the harness

The rows go to ``benchmarks/results/trl_log_probs.json`` and ``trl_distill.json`` (``--quick``:
a temporary folder), in the schema of the other suites, with a PNG beside each.
"""

from __future__ import annotations

import sys

import torch

from benchmarks.bench_linear_cross_entropy import FLOOR_TEXT, case_label, gemm_floor
from benchmarks.harness import Bench, Shape, Skip, Suite, split_backend

TEMPERATURE = 0.7
BETA = 0.5
SHAPES = (Shape(2048, 512, 32768),)
QUICK_SHAPES = (Shape(64, 32, 256), Shape(37, 24, 1000))


def _trl() -> tuple[type, type, int]:
    """TRL's two kernels and its fused head's vocabulary tile width, or :class:`Skip`."""
    try:
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE
    except ImportError as e:
        raise Skip(f"TRL is not installed ({e}): pip install 'trl>=1.16'") from e
    return ChunkedLogProbFunction, ChunkedDivergenceFunction, _CHUNKED_LOGPROB_CHUNK_SIZE


def _inputs(shape: Shape, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Random hidden states and a head scaled like an initialised ``nn.Linear``, and their
    size in bytes."""
    h = torch.randn(shape.n, shape.d, dtype=dtype)
    w = (torch.randn(shape.v, shape.d) / shape.d**0.5).to(dtype)
    return h, w, h.nbytes + w.nbytes


def build_log_probs(provider: str, shape: Shape, dtype: torch.dtype, compile_backend: str) -> Bench:
    """The step of ``provider`` of suite ``trl_log_probs``."""
    name, backend = split_backend(provider)
    h, w, inputs_bytes = _inputs(shape, dtype)
    target = torch.randint(shape.v, (shape.n,))
    grads = (torch.randn(shape.n, dtype=torch.float32), torch.randn(shape.n, dtype=torch.float32))
    inputs_bytes += target.nbytes + 2 * grads[0].nbytes
    if name == "floor":
        g = torch.randn(shape.n, shape.v, dtype=dtype)
        return Bench(gemm_floor(g, h, w), inputs_bytes + 2 * g.nbytes)
    log_prob_kernel, _, chunk_size = _trl()
    if name.startswith("xentkit"):
        from xentkit.integrations import trl as xentkit_trl

        xentkit_trl.patch(backend=backend)
        kernel = xentkit_trl.LogProbHead
    elif name.startswith("trl"):
        kernel = log_prob_kernel
    else:
        raise ValueError(f"unknown provider {provider!r} for suite trl_log_probs")
    entropy = name.endswith("-entropy")
    outputs = ("entropy",) if entropy else ()
    h.requires_grad_(True)
    w.requires_grad_(True)

    def step():
        out = kernel.apply(h, w, None, target, TEMPERATURE, chunk_size, None, 1.0, outputs)
        differentiable = out[:2] if entropy else out[:1]
        return torch.autograd.grad(differentiable, (h, w), grads[: len(differentiable)])

    return Bench(step, inputs_bytes)


def build_distill(provider: str, shape: Shape, dtype: torch.dtype, compile_backend: str) -> Bench:
    """The step of ``provider`` of suite ``trl_distill``: the student and the teacher share
    the shape."""
    name, backend = split_backend(provider)
    h_s, w_s, student_bytes = _inputs(shape, dtype)
    h_t, w_t, teacher_bytes = _inputs(shape, dtype)
    grad = torch.randn(shape.n, dtype=torch.float32)
    inputs_bytes = student_bytes + teacher_bytes + grad.nbytes
    if name == "floor":
        g = torch.randn(shape.n, shape.v, dtype=dtype)
        return Bench(gemm_floor(g, h_s, w_s, (h_t, w_t)), inputs_bytes + 3 * g.nbytes)
    _, divergence_kernel, _ = _trl()
    if name == "xentkit":
        from xentkit.integrations import trl as xentkit_trl

        xentkit_trl.patch(backend=backend)
        kernel = xentkit_trl.DivergenceHead
    elif name == "trl":
        kernel = divergence_kernel
    else:
        raise ValueError(f"unknown provider {provider!r} for suite trl_distill")
    h_s.requires_grad_(True)
    w_s.requires_grad_(True)

    def step():
        divergence, entropy = kernel.apply(h_s, w_s, None, h_t, w_t, None, BETA, TEMPERATURE)
        return (*torch.autograd.grad(divergence, (h_s, w_s), grad), entropy)

    return Bench(step, inputs_bytes)


LOG_PROBS = Suite(
    name="trl_log_probs",
    title="TRL's fused LM head (per-token log-probs, and entropy), TRL's kernel vs xentkit's",
    function="linear_log_probs",
    build=build_log_probs,
    case_label=case_label,
    providers=("trl", "xentkit", "trl-entropy", "xentkit-entropy", "floor"),
    shapes=SHAPES,
    quick_shapes=QUICK_SHAPES,
    dtypes=("float32",),
    repeats=3,
    reference="trl",
    floor="floor",
    floor_text=FLOOR_TEXT,
)

DISTILL = Suite(
    name="trl_distill",
    title="TRL's distillation kernel (generalized JSD, beta 0.5), TRL's vs xentkit's",
    function="linear_distillation_loss",
    build=build_distill,
    case_label=case_label,
    # The backend named: the harness's default-backend table has no entry for this function.
    providers=("trl", "xentkit:chunked", "floor"),
    shapes=SHAPES,
    quick_shapes=QUICK_SHAPES,
    dtypes=("float32",),
    repeats=3,
    reference="trl",
    floor="floor",
    floor_text="the four matrix products h_s @ W_s.T, h_t @ W_t.T, g @ W_s and g.T @ h_s "
    "into resident buffers",
)

SUITES = (LOG_PROBS, DISTILL)


def main(argv: list[str] | None = None) -> int:
    """Runs the suite(s) through :mod:`benchmarks.run`'s runner: JSON, plots, RESULTS.md."""
    # Imported here: benchmarks.run imports this module to register its suites.
    from benchmarks import run

    return run.run_standalone(list(SUITES), "benchmarks.bench_trl", argv)


if __name__ == "__main__":
    sys.exit(main())
