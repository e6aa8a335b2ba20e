#!/usr/bin/env bash
# The CUDA path on a machine with an NVIDIA GPU, in one go:
#   1. the Triton kernel tests, compiled for the GPU (CI runs them in Triton's interpreter);
#   2. greedy parity with transformers, throughput against transformers `generate`, and
#      batch-1 decode against the GPU's memory bandwidth: one table (servelm/bench/gpu_check.py).
# Usage: scripts/gpu_check.sh [--shape 1b|8b] [--parity-model PATH] [--result-file FILE]
# Needs `make setup` first (on a GPU machine the pinned torch is PyPI's CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c 'import torch, triton; assert torch.cuda.is_available(), "torch sees no GPU"; print("torch", torch.__version__, "triton", triton.__version__)'
"$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/unit/test_gpu_attention.py tests/unit/test_gpu_qmatmul.py
"$PY" -m servelm.bench.gpu_check "$@"
