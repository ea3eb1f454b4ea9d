"""Suite ``distill``: knowledge distillation from the LM heads, TRL's generalized JSD
(``beta=0.5``, temperature 0.9, mean over tokens) between a student head and a teacher head,
forward + backward to the student's ``h`` ``(N, D)`` and ``W`` ``(V, D)``.

Providers (each one call of forward and backward through ``torch.autograd.grad``):

- ``xentkit``: ``xentkit.linear_distillation_loss(h, W, h_t, W_t, target, beta=0.5,
  temperature=0.9)`` with its default backend (``xentkit:NAME`` forces one);
- ``torch``: TRL's ``GKDTrainer.generalized_jsd_loss`` on ``F.linear`` logits of both heads
  (the teacher's under ``no_grad``), in eager mode, the reference of the ratios; it holds many
  ``N x V`` tensors;
- ``floor``: the four matrix products no path avoids here: both heads' logits
  (``h @ W.T``, ``h_t @ W_t.T``) and the student's gradients (``g @ W``, ``g.T @ h``).

Each row runs in its own process whose address space is capped at 20 GiB, or at 85% of the
memory available when it starts if that is less (the machine is shared): a provider that
needs more is reported as ``OOM``.

Run (``benchmarks/run.py``'s own suites do not include this one)::

    python -m benchmarks.bench_distill            # N=4096 D=1024 V=128256 float32
    python -m benchmarks.bench_distill --quick    # tiny shapes: checks the harness

The rows go to ``benchmarks/results/distill.json`` and its plot to ``distill.png``
(``--quick``: a temporary folder), in the schema of the other suites.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import xentkit
from benchmarks import memory, run
from benchmarks.bench_linear_cross_entropy import case_label, gemm_floor
from benchmarks.harness import Bench, Shape, Suite, split_backend

BETA = 0.5
TEMPERATURE = 0.9
GIB = 2**30
MAX_BYTES = 20 * GIB


def _torch_jsd(
    h: torch.Tensor, w: torch.Tensor, h_t: torch.Tensor, w_t: torch.Tensor
) -> torch.Tensor:
    """TRL's ``generalized_jsd_loss`` (``reduction="batchmean"``) on the heads' logits."""
    with torch.no_grad():
        teacher_logits = F.linear(h_t, w_t)
    s = F.log_softmax(F.linear(h, w) / TEMPERATURE, -1)
    t = F.log_softmax(teacher_logits / TEMPERATURE, -1)
    beta = torch.tensor(BETA, dtype=s.dtype)
    mixture = torch.logsumexp(torch.stack([s + torch.log(1 - beta), t + torch.log(beta)]), 0)
    kl_teacher = F.kl_div(mixture, t, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture, s, reduction="none", log_target=True)
    jsd = BETA * kl_teacher + (1 - BETA) * kl_student
    return jsd.sum() / h.shape[0]


def build(provider: str, shape: Shape, dtype: torch.dtype, compile_backend: str) -> Bench:
    """Random student and teacher hidden states, heads scaled like an initialised
    ``nn.Linear``, labels, and the step of ``provider`` on them."""
    name, backend = split_backend(provider)
    h = torch.randn(shape.n, shape.d, dtype=dtype)
    w = (torch.randn(shape.v, shape.d) / shape.d**0.5).to(dtype)
    h_t = torch.randn(shape.n, shape.d, dtype=dtype)
    w_t = (torch.randn(shape.v, shape.d) / shape.d**0.5).to(dtype)
    target = torch.randint(shape.v, (shape.n,))
    inputs_bytes = 2 * (h.nbytes + w.nbytes) + target.nbytes
    if name == "floor":
        g = torch.randn(shape.n, shape.v, dtype=dtype)
        return Bench(gemm_floor(g, h, w, (h_t, w_t)), inputs_bytes + 3 * g.nbytes)
    h.requires_grad_(True)
    w.requires_grad_(True)
    if name == "xentkit":

        def fn(h, w, h_t, w_t):
            return xentkit.linear_distillation_loss(
                h, w, h_t, w_t, target, beta=BETA, temperature=TEMPERATURE, backend=backend
            )

    elif name == "torch":
        fn = _torch_jsd
    else:
        raise ValueError(f"unknown provider {provider!r} for suite distill")
    return Bench(lambda: torch.autograd.grad(fn(h, w, h_t, w_t), (h, w)), inputs_bytes)


def mem_limit(quick: bool) -> int | None:
    """The address-space cap of a job, in bytes, worked out in the job's process."""
    if quick:
        return None
    available = memory.available_memory()
    return MAX_BYTES if available is None else min(MAX_BYTES, int(0.85 * available))


SUITE = Suite(
    name="distill",
    title="Distillation (generalized JSD, beta=0.5) from two LM heads, forward + backward",
    function="linear_distillation_loss",
    build=build,
    case_label=case_label,
    providers=("xentkit", "torch", "floor"),
    shapes=(Shape(4096, 1024, 128256),),
    quick_shapes=(Shape(64, 32, 256), Shape(37, 24, 1000)),
    dtypes=("float32",),
    repeats=3,
    floor="floor",
    floor_text="the four matrix products h @ W.T, h_t @ W_t.T, g @ W and g.T @ h into "
    "resident buffers",
    mem_limit=mem_limit,
)


def main(argv: list[str] | None = None) -> int:
    """Runs the suite(s) through :mod:`benchmarks.run`'s runner: JSON, plots, RESULTS.md."""
    return run.run_standalone([SUITE], "benchmarks.bench_distill", argv)


if __name__ == "__main__":
    sys.exit(main())
