"""Suite ``scale``: a linear cross entropy too large for the unfused torch path on a 24 GiB machine.

At N=16384 tokens, D=1024 and V=256000 in float32 the logits alone take 16 GiB and torch's
backward needs about three such buffers; a fused implementation needs the weight, its float32
gradient (1 GiB each) and one chunk of logits. Each provider runs once (one call takes minutes
on a small CPU) in its own process whose address space is capped at 24 GiB, or at 95% of the
memory available when that process starts if that is less, so a provider that needs more fails
with an allocation error, reported as ``OOM``, instead of swapping or waking the OOM killer.
(Address space is at least the resident memory, so the cap errs on the strict side.)

The providers are those of :mod:`benchmarks.bench_linear_cross_entropy`, without the floor
(its own ``N x V`` products would not fit either).
"""

from __future__ import annotations

from benchmarks import bench_linear_cross_entropy as linear
from benchmarks import memory
from benchmarks.harness import Shape, Suite

GIB = 2**30
MACHINE_BYTES = 24 * GIB  # the machine the claim is about
# ``--quick``: what the tiny scale case may add to its process's address space. The torch path
# holds two 512 MiB N x V buffers at once there; a fused one needs a chunk and its first
# call's lazy set-up (about 300 MiB of libraries and compiled code).
QUICK_BUDGET = 768 * 2**20


def mem_limit(quick: bool) -> int:
    """The address-space cap of a scale job, in bytes, worked out in the job's process."""
    if quick:
        return (memory.address_space() or 0) + QUICK_BUDGET
    available = memory.available_memory()
    return MACHINE_BYTES if available is None else min(MACHINE_BYTES, int(0.95 * available))


SUITE = Suite(
    name="scale",
    title="Scale: linear cross entropy where the unfused path runs out of memory",
    function="linear_cross_entropy",
    build=linear.build,
    case_label=linear.case_label,
    providers=("xentkit", "torch", "torch.compile", "cce"),
    shapes=(Shape(16384, 1024, 256000),),
    quick_shapes=(Shape(4096, 64, 32768),),
    dtypes=("float32",),
    repeats=1,
    compiled=frozenset({"torch.compile", "cce"}),
    single_shot=True,
    mem_limit=mem_limit,
)
