#!/bin/bash
# The simulator's uses in docs/benchmarks.md: each line one simulated run, its result JSON here.
# Roofline profiles: servelm simulate profile --roofline --gpu {h100,l4} --model-config llama-3-8b \
#   --max-num-batched-tokens 8192 --output docs/results/simulate/uses/{h100,l4}-llama-3-8b.json
set -e
cd "$(dirname "$0")"
S="servelm simulate run --no-itl --quiet"
H=h100-llama-3-8b.json
LENGTHS="--trace self-instruct-lengths.jsonl"
# 1. scheduling policies, 50 replicas of at most 32 running requests, 15% above the rate
#    they keep up with (about 45 requests/s each), bursty: queues form
for p in fcfs sjf mlfq; do
  $S --profile $H --replicas 50 --router least-loaded $LENGTHS --num-prompts 50000 --max-num-seqs 32 \
     --request-rate 2600 --burstiness 0.5 --scheduling-policy $p --result-file policy-$p.json
done
# 2. routers, 8 replicas, 200 system prompts of 4096 tokens drawn at random (more than one
#    replica's cache holds), at 65% of the prefix-aware capacity (185 requests/s)
python3 -c "
import json, random
rng = random.Random(0)
with open('shared-prefix-random.jsonl', 'w') as f:
    for _ in range(16000):
        f.write(json.dumps({'prompt_len': 4224, 'output_len': 128, 'prefix_id': rng.randrange(200),
                            'prefix_len': 4096}) + '\n')"
for r in round-robin least-loaded power-of-two prefix-aware; do
  $S --profile $H --replicas 8 --router $r --trace shared-prefix-random.jsonl --request-rate 120 \
     --result-file router-$r.json
done
rm shared-prefix-random.jsonl
# 3. prefill:decode ratios on 8 GPUs, long prompts, at 70% of the colocated capacity
D="--random-input-len 2048 --random-output-len 256 --random-range-ratio 0.5 --num-prompts 6000 --request-rate 68"
$S --profile $H --replicas 8 --router least-loaded $D --result-file disagg-colocated.json
for pd in "2 6" "4 4" "6 2"; do
  set -- $pd
  $S --profile $H $H --replicas $1 $2 --roles prefill decode --router least-loaded $D \
     --result-file disagg-${1}p${2}d.json
done
# 4. spot replicas: 4 of 8 preempted at 40, 80, 120, 160 s with 5 s notice, replaced after
#    60 s, serving long answers (a notice shorter than a request)
P="--profile $H --replicas 8 --router least-loaded --random-input-len 1024 --random-output-len 2048 \
   --random-range-ratio 0.5 --num-prompts 4000 --request-rate 20"
$S $P --result-file spot-none.json
for rec in migrate restart; do
  $S $P --spot-replicas 4 --spot-kill-times 40 80 120 160 --spot-grace-s 5 \
     --spot-replacement-delay-s 60 --spot-recovery $rec --result-file spot-$rec.json
done
# 5. unlike replicas: 4 H100 and 4 L4, at 60% of their summed capacity
for r in round-robin least-loaded speed-aware; do
  $S --profile $H l4-llama-3-8b.json --replicas 4 4 --router $r $LENGTHS --num-prompts 40000 \
     --request-rate 400 --result-file mixed-$r.json
done
