"""Suite ``log_probs``: per-token log p(target) and entropy from the LM head (what RL
fine-tuning takes from a policy), forward + backward through both outputs to ``h`` ``(N, D)``
and ``W`` ``(V, D)``.

Providers (each one call of forward and backward through ``torch.autograd.grad``, with the
per-token ``grad_output`` of both outputs given, as a policy-gradient loss gives them):

- ``xentkit``: ``xentkit.linear_log_probs(h, W, target, temperature=0.7,
  return_entropy=True)`` with its default backend (``xentkit:NAME`` forces one);
- ``torch``: ``log_softmax(F.linear(h, W) / 0.7)``, gathered at the target, and
  ``-(p * log p).sum(-1)`` in eager mode, the reference of the ratios; it holds several
  ``N x V`` tensors;
- ``floor``: the three matrix products of suite ``linear``; a fused path needs a fourth here,
  since the per-token gradients are only known in backward, which recomputes the logits.

Run (``benchmarks/run.py``'s own suites do not include this one yet)::

    python -m benchmarks.bench_log_probs            # N=4096 D=1024 V=128256 float32
    python -m benchmarks.bench_log_probs --quick    # tiny shapes: checks the harness

The rows go to ``benchmarks/results/log_probs.json`` (``--quick``: a temporary folder), in
the schema of the other suites.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import xentkit
from benchmarks import run
from benchmarks.bench_linear_cross_entropy import FLOOR_TEXT, case_label, gemm_floor
from benchmarks.harness import Bench, Shape, Suite, split_backend

TEMPERATURE = 0.7


def _torch_log_probs(
    h: torch.Tensor, w: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    log_probs = torch.log_softmax(F.linear(h, w) / TEMPERATURE, -1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1), entropy


def build(provider: str, shape: Shape, dtype: torch.dtype, compile_backend: str) -> Bench:
    """Random hidden states, a classifier scaled like an initialised ``nn.Linear``, sampled
    tokens, per-token gradients of both outputs, and the step of ``provider`` on them."""
    name, backend = split_backend(provider)
    h = torch.randn(shape.n, shape.d, dtype=dtype)
    w = (torch.randn(shape.v, shape.d) / shape.d**0.5).to(dtype)
    target = torch.randint(shape.v, (shape.n,))
    grads = (torch.randn(shape.n, dtype=dtype), torch.randn(shape.n, dtype=dtype))
    inputs_bytes = h.nbytes + w.nbytes + target.nbytes + 2 * grads[0].nbytes
    if name == "floor":
        g = torch.randn(shape.n, shape.v, dtype=dtype)
        return Bench(gemm_floor(g, h, w), inputs_bytes + 2 * g.nbytes)
    h.requires_grad_(True)
    w.requires_grad_(True)
    if name == "xentkit":

        def fn(h, w, target):
            return xentkit.linear_log_probs(
                h, w, target, temperature=TEMPERATURE, return_entropy=True, backend=backend
            )

    elif name == "torch":
        fn = _torch_log_probs
    else:
        raise ValueError(f"unknown provider {provider!r} for suite log_probs")
    return Bench(lambda: torch.autograd.grad(fn(h, w, target), (h, w), grads), inputs_bytes)


SUITE = Suite(
    name="log_probs",
    title="Per-token log-probabilities and entropy from the LM head, forward + backward",
    function="linear_log_probs",
    build=build,
    case_label=case_label,
    providers=("xentkit", "torch", "floor"),
    shapes=(Shape(4096, 1024, 128256),),
    quick_shapes=(Shape(64, 32, 256), Shape(37, 24, 1000)),
    dtypes=("float32",),
    repeats=3,
    floor="floor",
    floor_text=FLOOR_TEXT,
)


def main(argv: list[str] | None = None) -> int:
    """Runs the suite(s) through :mod:`benchmarks.run`'s runner: JSON, plots, RESULTS.md."""
    return run.run_standalone([SUITE], "benchmarks.bench_log_probs", argv)


if __name__ == "__main__":
    sys.exit(main())
