#!/usr/bin/env bash
# Mixture-of-experts figures in docs/benchmarks.md ("Mixture of experts"): a Qwen3-MoE of a
# small real shape (12 layers, hidden 512, 32 experts of width 384, random bfloat16 weights,
# 260M parameters) against transformers on the same folder, and the same weights with 1, 2,
# 4 and 8 experts per token. Run from the repository root with nothing else running.
set -euo pipefail
OUT=docs/results/moe
MODELS=${MODELS:-/tmp/servelm-moe}
mkdir -p "$MODELS"
for k in 1 2 4 8; do
  if [ ! -d "$MODELS/top$k" ]; then
    .venv/bin/python -m servelm.bench.random_model "$MODELS/top$k" --experts 32 --top-k "$k"
  fi
done
# Offline throughput, 64 self-instruct requests, servelm vs transformers (top-4, the default).
.venv/bin/servelm bench throughput --model "$MODELS/top4" --num-prompts 64 --max-output-len 64 \
  --num-threads 2 --skip-llamacpp --hf-batch-sizes 8,16,32,64 --result-file "$OUT/throughput-top4.json"
# Batch-1 decode and 32-request throughput against the number of active experts.
for k in 1 2 4 8; do
  .venv/bin/servelm bench latency --model "$MODELS/top$k" --input-len 128 --output-len 64 \
    --num-threads 2 --num-iters 3 --num-iters-warmup 1 --skip-llamacpp \
    --result-file "$OUT/latency-top$k.json"
  .venv/bin/servelm bench throughput --model "$MODELS/top$k" --num-prompts 32 --max-output-len 64 \
    --num-threads 2 --skip-llamacpp --skip-hf --result-file "$OUT/throughput-servelm-top$k.json"
done
