#!/usr/bin/env bash
# Trained-draft figures in docs/benchmarks.md ("Trained drafts"): train an EAGLE draft,
# Medusa heads and a distilled draft model for the default model with train-draft's
# defaults, then measure batch-1 decoding on the held-out prompts with every proposer, on
# the default Q4_1 file and on its weights in bfloat16. Run from the repository root with
# nothing else running; drafts go to $DRAFTS (default /tmp/drafts).
set -euo pipefail
OUT=docs/results/trained-drafts
D=${DRAFTS:-/tmp/drafts}
for m in eagle medusa distill; do
  /usr/bin/time -f "$m: %e s wall" .venv/bin/servelm train-draft --method "$m" --output "$D/$m"
  cp "$D/$m/train_summary.json" "$OUT/$m-train-summary.json"
  cp "$D/$m/loss.png" "$OUT/$m-loss.png"
done
SPEC=(.venv/bin/servelm bench spec --proposers ngram,draft_model,distilled,medusa,eagle
      --draft-num-layers 2 --distilled-model "$D/distill" --medusa-model "$D/medusa"
      --eagle-model "$D/eagle" --held-out --datasets mt-bench,humaneval --num-prompts 6
      --max-tokens 128 --num-threads 2)
"${SPEC[@]}" --num-speculative-tokens 3 --systems servelm,transformers --result-file "$OUT/spec-q4_1-k3.json"
"${SPEC[@]}" --num-speculative-tokens 1 --systems servelm --result-file "$OUT/spec-q4_1-k1.json"
"${SPEC[@]}" --num-speculative-tokens 3 --systems servelm --quantization none --dtype bfloat16 \
  --result-file "$OUT/spec-bf16-k3.json"
