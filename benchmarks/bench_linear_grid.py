"""Suite ``linear_grid``: the ``linear`` suite over the grid of shapes issue 10 sets its goal on,
N in {2048, 8192}, D in {512, 1024}, V in {32768, 128256, 256000}, float32 (and D=4096 on
request: ``--shapes``).

The providers and the floor are :mod:`benchmarks.bench_linear_cross_entropy`'s; each job's
address space is capped as in :mod:`benchmarks.bench_scale` (24 GiB, or 95% of the available
memory), so an unfused peer whose ``N x V`` logits do not fit is reported ``OOM`` instead of
swapping. One timed call per row by default (after the first call and one warm-up): the grid
holds about 10^14 flops per provider. Not part of the default run:
``python benchmarks/run.py --suite linear_grid [--shapes ...] [--providers ...]``.
"""

from __future__ import annotations

import dataclasses

from benchmarks import bench_linear_cross_entropy as linear
from benchmarks import bench_scale
from benchmarks.harness import Shape

SUITE = dataclasses.replace(
    linear.SUITE,
    name="linear_grid",
    title="Linear cross entropy over the (N, D, V) grid, forward + backward, float32",
    shapes=tuple(
        Shape(n, d, v) for n in (2048, 8192) for d in (512, 1024) for v in (32768, 128256, 256000)
    ),
    dtypes=("float32",),
    repeats=1,
    mem_limit=bench_scale.mem_limit,
    dtype_check=None,
)
