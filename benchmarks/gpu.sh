#!/usr/bin/env bash
# The GPU benchmark in one command, under 8 minutes on one H100 or H200 (installs included):
# a virtual environment with the CUDA build of torch and the peers at the versions pinned
# below, then benchmarks/bench_gpu.py (xentkit's two CUDA designs and plain cross entropy
# against torch eager, torch.compile, Liger Kernel and Cut Cross-Entropy, bfloat16,
# N in {8192, 32768}, D=4096, V in {128256, 256000}).
#
#   bash benchmarks/gpu.sh                 # results in benchmarks/results/gpu.{json,png,md}
#   bash benchmarks/gpu.sh --repeats 3     # any option of bench_gpu.py is passed on
#   bash benchmarks/gpu.sh --dry-run       # no GPU: CPU, TRITON_INTERPRET=1, tiny shapes
#
# Environment:
#   XENTKIT_GPU_VENV    the virtual environment to create or reuse
#                       (default ~/.cache/xentkit/gpu-venv, outside the working tree)
#   XENTKIT_GPU_PYTHON  a Python that already has everything: no venv, no install
#   TORCH_INDEX_URL     a wheel index for torch (e.g. one of CUDA 12 builds where the
#                       driver is older than the CUDA 13 that torch 2.13's default wheel needs)
#   PIP_FIND_LINKS      a folder of wheels, for a machine without a registry
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned: torch 2.13.0's Linux wheel requires triton 3.7.1 exactly.
TORCH=torch==2.13.0
TRITON=triton==3.7.1
LIGER=liger-kernel==0.8.5
CCE=cut-cross-entropy==25.1.1
MATPLOTLIB=matplotlib==3.11.2

start=$(date +%s)
if [[ -n "${XENTKIT_GPU_PYTHON:-}" ]]; then
    python=$XENTKIT_GPU_PYTHON
else
    venv=${XENTKIT_GPU_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/xentkit/gpu-venv}
    python=$venv/bin/python
    stamp=$venv/.installed-$(echo "$TORCH $TRITON $LIGER $CCE $MATPLOTLIB" | cksum | cut -d' ' -f1)
    if [[ ! -f $stamp ]]; then
        [[ -x $python ]] || { mkdir -p "$(dirname "$venv")" && python3 -m venv "$venv"; }
        "$python" -m pip install --quiet --upgrade pip
        torch_index=()
        [[ -n "${TORCH_INDEX_URL:-}" ]] && torch_index=(--extra-index-url "$TORCH_INDEX_URL")
        "$python" -m pip install --quiet "${torch_index[@]}" "$TORCH" "$TRITON"
        # The peers and xentkit itself, never moving torch or triton off their pins.
        constraints=$(mktemp)
        printf '%s\n' "$TORCH" "$TRITON" > "$constraints"
        "$python" -m pip install --quiet -c "$constraints" "$LIGER" "$CCE" "$MATPLOTLIB" -e .
        rm -f "$constraints"
        touch "$stamp"
    fi
fi
installed=$(($(date +%s) - start))
echo "environment ready in ${installed} s: $("$python" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')"

dry=0
for arg in "$@"; do [[ $arg == --dry-run ]] && dry=1; done
if [[ $dry == 0 ]] && ! "$python" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    echo "no CUDA GPU visible to torch (driver too old for this build? set TORCH_INDEX_URL)," \
        "or run with --dry-run" >&2
    exit 1
fi

# Whatever the installs took comes off the benchmark's budget (at least 2 minutes of it),
# so that the whole command stays under 8 minutes; a --budget given here wins.
budget=$((450 - installed))
((budget < 120)) && budget=120
exec "$python" benchmarks/bench_gpu.py --budget "$budget" "$@"
