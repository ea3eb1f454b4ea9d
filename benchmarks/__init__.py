"""xentkit's benchmarks: side-by-side timings and peak memory against PyTorch and its peers.

Run them with ``xentkit bench`` (or ``make bench``, or ``python benchmarks/run.py``); see
``python benchmarks/run.py --help``. Each suite writes its rows to ``results/<suite>.json``
first; the terminal table, the PNG plots and ``RESULTS.md`` are all made from that data.

Modules: :mod:`benchmarks.run` (the command line), :mod:`benchmarks.harness` (one job per
forked process: timing protocol and failure handling), :mod:`benchmarks.memory` (peak resident
memory from ``/proc``), :mod:`benchmarks.machine` (what the numbers were measured on), the
suites :mod:`benchmarks.bench_cross_entropy`, :mod:`benchmarks.bench_linear_cross_entropy` and
:mod:`benchmarks.bench_scale`, then :mod:`benchmarks.report` and :mod:`benchmarks.plot`.
"""
