#!/usr/bin/env bash
# Structured-output figures in docs/benchmarks.md ("Structured outputs"): servelm and
# llama.cpp's llama-server, each in turn on the default Q4_1 file with 2 threads, answering
# the same MT-Bench chat turns with and without a JSON schema (response_format), at 1 and 8
# streams. Run from the repository root with nothing else running; SERVELM_LLAMA_SERVER is
# llama.cpp's llama-server binary (built as docs/benchmarks.md says).
set -euo pipefail
OUT=docs/results/structured
: "${SERVELM_LLAMA_SERVER:?set SERVELM_LLAMA_SERVER to the llama-server binary}"
SCHEMA='{"type": "object", "properties": {
  "answer": {"type": "string", "maxLength": 600},
  "confidence": {"type": "number", "minimum": 0, "maximum": 1},
  "keywords": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 5}},
  "required": ["answer", "confidence", "keywords"], "additionalProperties": false}'
FORMAT="{\"response_format\": {\"type\": \"json_schema\", \"json_schema\": {\"name\": \"answer\", \"schema\": $SCHEMA}}}"
for c in 1 8; do
  n=$(( c == 1 ? 8 : 32 ))
  for mode in free json; do
    extra=()
    if [ "$mode" = json ]; then extra=(--extra-body "$FORMAT"); fi
    .venv/bin/servelm bench serve --launch servelm,llama-server --endpoint /v1/chat/completions \
      --dataset-name mt-bench --num-prompts "$n" --output-len 256 --max-concurrency "$c" \
      --request-rate inf --no-plots "${extra[@]}" --result-file "$OUT/serve-$mode-c$c.json"
  done
done
