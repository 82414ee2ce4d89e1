#!/usr/bin/env bash
# Run the fold-runner benchmark on a GPU machine; the printed report also goes to
# bench/results/gpu_table.txt (and benchmark.json / benchmark.png beside it).
#
#   bash bench/gpu_benchmark.sh                 # default workload, every detected GPU
#   bash bench/gpu_benchmark.sh --trials 5      # extra arguments go to bench.run_benchmark
#
# torch must be a CUDA build. requirements.txt pins torch==2.13.0; from PyPI on Linux
# x86_64 that version is the CUDA build, but a machine whose pip is pointed at a CPU-only
# wheel (like the development machine) gets the CPU one. If torch cannot see a GPU, this
# script stops and says so; install the CUDA build of the same version, e.g.
#
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 bash bench/gpu_benchmark.sh
#
# which installs torch==<pinned> from that index into .venv (with its CUDA libraries),
# then re-installs the checkout with the lock (requirements.txt) as constraints, so every
# other pin holds (2.13.0+cu128 satisfies torch==2.13.0). Pick the cuXXX that the driver supports: nvidia-smi prints the highest
# CUDA version it can run.
#
# On a machine with no package index but a Python that already has a CUDA torch (a GPU
# image), skip the venv: STEP5_PYTHON=python3 bash bench/gpu_benchmark.sh — that
# interpreter then needs the other dependencies (pyproject.toml: orjson, numpy,
# scikit-learn, matplotlib, psutil, ...) importable, e.g. from wheels on PYTHONPATH; the
# workers import this checkout's step5 (step5.launch puts it on their PYTHONPATH).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${STEP5_PYTHON:-}" ]; then
    PY=$STEP5_PYTHON
else
    bash scripts/setup.sh  # .venv with this checkout and the locked versions (idempotent)
    PY=.venv/bin/python
fi

if [ -n "${TORCH_INDEX_URL:-}" ] && [ -z "${STEP5_PYTHON:-}" ]; then
    pinned=$(grep -E '^torch==' requirements.txt | cut -d= -f3)
    echo "installing torch==${pinned} from ${TORCH_INDEX_URL}" >&2
    "$PY" -m pip install --quiet --force-reinstall "torch==${pinned}" --index-url "$TORCH_INDEX_URL"
    "$PY" -m pip install --quiet -c requirements.txt -e ".[trees,test]"
fi

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_benchmark.sh: nvidia-smi not found; this script is for a GPU machine" >&2
    echo "(on a CPU machine run: $PY -m bench.run_benchmark)" >&2
    exit 1
fi
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader >&2

# A check process (not the benchmark's parent, which never imports torch).
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    "$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA build: {torch.version.cuda}")' >&2
    echo "gpu_benchmark.sh: torch cannot use the GPU (a CPU-only build?)." >&2
    echo "Re-run with TORCH_INDEX_URL=https://download.pytorch.org/whl/cuXXX (see the top of this script)." >&2
    exit 1
fi

mkdir -p bench/results
# --gpus auto: one worker per visible GPU, found as Step 5 finds them (CUDA_VISIBLE_DEVICES
# or nvidia-smi). GPU kernels may round differently in the last bits, and cuBLAS picks
# other kernels for a fused batch of models than for one (5e-4 relative measured on an
# H200 after 100 epochs), so the metric cross-check allows 1e-3 relative.
"$PY" -m bench.run_benchmark --gpus auto --rtol 1e-3 --out bench/results \
    --table-out bench/results/gpu_table.txt "$@"
# The epoch loops side by side in one process (issue 17): wall, kernel time / wall and the
# graph loop's speedup over the fused host loop, on the default workload.
"$PY" -m bench.gpu_loop --out bench/results | tee bench/results/gpu_loop_table.txt
echo "tables written to bench/results/gpu_table.txt and bench/results/gpu_loop_table.txt" >&2
