#!/bin/bash
# Interleaved fidelity check: a seed-7 run, a seed-0 run, a seed-7 run again, one after
# another on a fresh server each, every one with a step trace; then the seed-0 run is
# simulated with the step model of each (servelm d8029d2, 2026-12-06, the 2-core Xeon).
set -e
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../serve_and_bench.sh"
serve=(servelm serve --model /work/models/llama-30m)
serve_and_bench 7 cal1 "${serve[@]}"
serve_and_bench 0 chk "${serve[@]}"
serve_and_bench 7 cal2 "${serve[@]}"
for m in cal1 chk cal2; do
  servelm simulate profile --from-step-trace "$here/steps-$m.jsonl" --calibrate-on "$here/real-$m.json" \
    --output "$here/model-$m.json"
  servelm simulate run --profile "$here/model-$m.json" --trace "$here/real-chk.json" \
    --request-rate 1,2.5,inf --result-file "$here/sim-chk-model-$m.json" --quiet
  servelm simulate compare --real "$here/real-chk.json" --sim "$here/sim-chk-model-$m.json"
done
python "$here/step_drift.py" "$here/model-cal1.json" "$here"   # each run's steps against cal1's model  (on the files kept here: gunzip them first)
gzip "$here"/steps-*.jsonl
