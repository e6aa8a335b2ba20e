#!/bin/bash
# Held-out fidelity check on an emulated device (serve_emulated.py): every step lasts what
# the step model of the CPU run cal1 (../interleaved/model-cal1.json) says, so the
# machine's drift leaves the step times alone. A seed-7 run (cal), two seed-0 runs (chk1,
# chk2) and a seed-7 run again (cal2), each on a fresh server with a step trace. The seed-0
# runs are simulated with the model fitted on cal (its steps; its front-end delay on its
# streams) and with the one fitted on cal and cal2, the runs before and after them.
set -e
here=$(cd "$(dirname "$0")" && pwd)
tiny=${TINY:-/tmp/servelm-tiny-30m}
[ -d "$tiny" ] || python "$here/tiny_model.py" /work/models/llama-30m "$tiny"
source "$here/../serve_and_bench.sh"
serve=(python "$here/serve_emulated.py" "$here/../interleaved/model-cal1.json" --model "$tiny")
serve_and_bench 7 cal "${serve[@]}"
serve_and_bench 0 chk1 "${serve[@]}"
serve_and_bench 0 chk2 "${serve[@]}"
serve_and_bench 7 cal2 "${serve[@]}"
servelm simulate profile --from-step-trace "$here/steps-cal.jsonl" --calibrate-on "$here/real-cal.json" \
  --output "$here/model-cal.json"
servelm simulate profile --from-step-trace "$here/steps-cal.jsonl" "$here/steps-cal2.jsonl" \
  --calibrate-on "$here/real-cal.json" "$here/real-cal2.json" --output "$here/model-bracket.json"
servelm simulate run --profile "$here/model-bracket.json" --trace "$here/real-chk1.json" \
  --request-rate 1,2.5,inf --result-file "$here/sim-chk1-bracket.json" --quiet
servelm simulate compare --real "$here/real-chk1.json" "$here/real-chk2.json" --sim "$here/sim-chk1-bracket.json" \
  --result-file "$here/compare-chk-bracket.json" | tee "$here/compare-chk-bracket.txt"
for run in cal chk1 chk2; do
  servelm simulate run --profile "$here/model-cal.json" --trace "$here/real-$run.json" \
    --request-rate 1,2.5,inf --result-file "$here/sim-$run.json" --quiet
done
servelm simulate compare --real "$here/real-chk1.json" "$here/real-chk2.json" --sim "$here/sim-chk1.json" \
  --result-file "$here/compare-chk.json" | tee "$here/compare-chk.txt"
servelm simulate compare --real "$here/real-cal.json" --sim "$here/sim-cal.json" --result-file "$here/compare-cal.json" | tee "$here/compare-cal.txt"
gzip -f "$here"/steps-*.jsonl
python "$here/step_drift.py" | tee "$here/step_drift.txt"
