#!/bin/bash
# One Vidur run on trace-<RATE>rps.csv: CodeLlama-34B, TP2 on A100-80GB (Vidur's 4-GPU
# pairwise-NVLink node), Sarathi chunked-prefill scheduler with servelm's budget (2048
# tokens, 128 sequences) and KV blocks (26862 x 16), random-forest predictor trained on
# Vidur's 2024-05 A100 profiles (make_profile_cache.py). The first run trains the forests
# (cached under $CACHE for the later runs). vidur_timed.py is vidur.main with timings.
#   VIDUR_PY=/work/vidur-venv/bin/python CACHE=/work/vidur-run/.vidur_cache ./run_vidur.sh RATE OUT_DIR [extra flags]
set -euo pipefail
rate=$1; out=$2; shift 2
here=$(cd "$(dirname "$0")" && pwd)
RF=--random_forrest_execution_time_predictor_config
HF_HUB_OFFLINE=1 WANDB_MODE=disabled "${VIDUR_PY:-/work/vidur-venv/bin/python}" "$here/vidur_timed.py" \
  --replica_config_model_name codellama/CodeLlama-34b-Instruct-hf \
  --replica_config_device a100 --replica_config_network_device a100_pairwise_nvlink \
  --replica_config_tensor_parallel_size 2 --replica_config_num_pipeline_stages 1 \
  --cluster_config_num_replicas 1 \
  --cache_config_block_size 16 --cache_config_num_blocks 26862 \
  --replica_scheduler_config_type sarathi \
  --sarathi_scheduler_config_batch_size_cap 128 --sarathi_scheduler_config_chunk_size 2048 \
  --request_generator_config_type trace_replay \
  --trace_request_generator_config_trace_file "$here/trace-${rate}rps.csv" \
  --trace_request_generator_config_date 2023-08-21 \
  --trace_request_generator_config_prefill_scale_factor 1 \
  --trace_request_generator_config_decode_scale_factor 1 \
  --trace_request_generator_config_time_scale_factor 1 \
  --trace_request_generator_config_max_tokens 4096 \
  --execution_time_predictor_config_type random_forrest \
  ${RF}_model_profiling_dataset local/vidur-2024-05-codellama-34b-a100 \
  ${RF}_network_profiling_dataset local/vidur-2024-05-a100-pairwise-nvlink \
  ${RF}_cache_dir "${CACHE:-/work/vidur-run/.vidur_cache}" \
  ${RF}_prediction_max_tokens_per_request 4096 ${RF}_prediction_max_prefill_chunk_size 4096 \
  ${RF}_num_estimators 250 ${RF}_k_fold_cv_splits 3 \
  --metrics_config_output_dir "$out" \
  --no-metrics_config_store_plots --no-metrics_config_enable_chrome_trace \
  "$@"
