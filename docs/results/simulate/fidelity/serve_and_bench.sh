# Sourced by interleaved/run.sh and emulated/run.sh: one served run, measured as a client.
#   serve_and_bench SEED NAME SERVER...  starts SERVER... on port 18777 with a step trace
# (steps-NAME.jsonl in $here), sends 100 self-instruct requests at 1, 2.5 req/s and all at
# once with bench serve (real-NAME.json), then stops the server.
serve_and_bench() {
  local seed=$1 name=$2; shift 2
  "$@" --num-threads 2 --max-model-len 2048 --num-kv-blocks 256 --port 18777 \
    --step-trace "$here/steps-$name.jsonl" & local pid=$!
  until curl -sf http://127.0.0.1:18777/health >/dev/null; do sleep 1; done
  servelm bench serve --base-url http://127.0.0.1:18777 --tokenizer /work/models/llama-30m \
    --dataset-name self-instruct --num-prompts 100 --request-rate 1,2.5,inf --ignore-eos \
    --no-plots --seed "$seed" --save-detailed --result-file "$here/real-$name.json"
  kill $pid; wait $pid || true
}
