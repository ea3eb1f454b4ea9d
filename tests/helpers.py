"""Shared test utilities: random inputs of every layout and comparisons against PyTorch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

# Relative tolerance of a comparison with PyTorch, by dtype (float rounding of two exact paths).
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5}
ATOL = {torch.float64: 1e-12, torch.float32: 2e-6}


def layout_shape(layout: str, n: int, c: int, d: int) -> tuple[int, ...]:
    """Input shape of a layout: ``C`` (unbatched), ``NC``, ``NCd`` (sequence), ``NCdd``."""
    return {"C": (c,), "NC": (n, c), "NCd": (n, c, d), "NCdd": (n, c, d, 2)}[layout]


def index_target(shape: tuple[int, ...], ignore_index: int, ignore_frac: float, gen) -> Tensor:
    """Class indices for an input of ``shape`` (classes at dim 1, or 0 when unbatched)."""
    cdim = 0 if len(shape) == 1 else 1
    c = shape[cdim]
    tshape = shape[:cdim] + shape[cdim + 1 :]
    target = torch.randint(0, c, tshape, generator=gen)
    if ignore_frac:
        mask = torch.rand(tshape, generator=gen) < ignore_frac
        target = torch.where(mask, torch.full_like(target, ignore_index), target)
    return target


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype | None = None) -> None:
    dtype = dtype or expected.dtype
    torch.testing.assert_close(
        actual,
        expected,
        rtol=RTOL.get(dtype, 1e-2),
        atol=ATOL.get(dtype, 1e-2),
        equal_nan=True,
    )


def value_and_grads(fn, *tensors: Tensor, grad_output: Tensor | None = None):
    """``fn(*leaves)`` and the gradients of its (weighted) sum with respect to each leaf."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    out = fn(*leaves)
    g = torch.ones_like(out) if grad_output is None else grad_output
    diff = [leaf for leaf in leaves if leaf.requires_grad]
    grads = torch.autograd.grad(out, diff, g, allow_unused=True) if out.requires_grad else []
    return out.detach(), [None if gr is None else gr.detach() for gr in grads]


# Peak resident memory of one forward + backward in a fresh process: /proc/self/clear_refs
# ("5") resets VmHWM, so the peak minus the resident size just before is what the step added.
# A fixed mmap threshold makes glibc hand every large block back on free, so one measurement
# does not inherit another's retained heap.
_PEAK_SCRIPT = """
import json, sys, torch, xentkit
torch.set_num_threads(1)
v, d, sizes = int(sys.argv[1]), int(sys.argv[2]), [int(m) for m in sys.argv[3:]]

def kib(field):
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field)).split()[1])

def run(hidden, weight, target, backend):
{body}

def step(backend, m):
    hidden = torch.randn(m, d, requires_grad=True)
    weight = torch.randn(v, d, requires_grad=True)
    target = torch.randint(v, (m,))
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = kib("VmRSS:")
    run(hidden, weight, target, backend)
    return kib("VmHWM:") - before

peaks = {{}}
for backend in ("chunked", "reference"):
    step(backend, 300)  # first call: lazy imports and allocator set-up
    peaks[backend] = [step(backend, m) for m in sizes]
print(json.dumps(peaks))
"""


def assert_memory_does_not_grow_with_tokens(body: str) -> None:
    """``body`` (a forward and backward of ``hidden`` (M, 16), ``weight`` (4096, 16) and
    ``target`` on ``backend``, indented for a function) run at 512 and 2048 tokens in a fresh
    process: the fused step's peak memory grows by less than a quarter of one fp32 logits
    buffer of the extra tokens, while the reference's grows by more than one."""
    import pytest

    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        pytest.skip("needs a writable /proc/self/clear_refs (Linux)")
    v, d, small, large = 4096, 16, 512, 2048
    script = _PEAK_SCRIPT.format(body=body)
    argv = [sys.executable, "-c", script, str(v), str(d), str(small), str(large)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**16)}
    out = subprocess.run(argv, check=True, capture_output=True, text=True, env=env).stdout
    peaks = json.loads(out)
    logits_growth_kib = (large - small) * v * 4 // 1024  # one fp32 logits buffer: 24 MiB
    fused_growth = peaks["chunked"][1] - peaks["chunked"][0]
    exact_growth = peaks["reference"][1] - peaks["reference"][0]
    # The measurement sees the unfused logits; the fused step adds only O(M D) for grad_input.
    assert exact_growth > logits_growth_kib, peaks
    assert fused_growth < logits_growth_kib / 4, peaks


class RecordOps(TorchDispatchMode):
    """The aten ops dispatched while active, with their first argument's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = args[0] if args else None
        shape = tuple(first.shape) if isinstance(first, torch.Tensor) else ()
        self.ops.append((str(func.overloadpacket), shape))
        return func(*args, **(kwargs or {}))

    def multiplied(self, shape: tuple[int, ...]) -> bool:
        """Whether a recorded multiplication's first argument had ``shape``."""
        return any(op.startswith("aten.mul") and seen == shape for op, seen in self.ops)
