"""Flags of `servelm bench serve`, named like `vllm bench serve` where the two overlap."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from servelm.bench.harness import MissingExtra, listed, require_extra
from servelm.cluster.router import POLICIES as ROUTERS

_rates = listed(float, "rates (numbers > 0, or 'inf')", lambda r: r > 0)
_names = listed(str, "names")
_floats = listed(float, "numbers")


def add_serve_parser(bsub) -> None:
    from servelm.bench.serve_datasets import SERVE_DATASETS

    p = bsub.add_parser("serve", help="online load test of an OpenAI-compatible server")
    g = p.add_argument_group("target")
    g.add_argument("--base-url", default="http://127.0.0.1:8000")
    g.add_argument("--endpoint", default="/v1/completions",
                   choices=["/v1/completions", "/v1/chat/completions"])
    g.add_argument("--model", default=None, help="model id sent (default: first of /v1/models)")
    g.add_argument("--tokenizer", default=None,
                   help="local model whose tokenizer builds prompts and counts tokens "
                        "(default: --model if it is a path, else servelm's default model)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    g.add_argument("--launch", type=_names, default=[],
                   help="start these servers one after another on the same GGUF instead of "
                        "using --base-url: servelm, servelm-no-prefix-cache, "
                        "servelm-cpu-offload, servelm-{fcfs,priority,sjf,mlfq}, servelm-sjf-learned, "
                        "servelm-replicas[-ROUTER] (--launch-replicas engines on Ray behind one "
                        "endpoint; ROUTER one of " + ", ".join(ROUTERS) + "), "
                        "llama-server (llama.cpp's C++ server), llama.cpp (llama-cpp-python's)")
    g.add_argument("--launch-model", default=None, help="GGUF for launched servers (default model)")
    g.add_argument("--launch-threads", type=int, default=2, help="threads of launched servers")
    g.add_argument("--launch-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="servelm's compute dtype when launched (auto: its own default)")
    g.add_argument("--launch-max-model-len", type=int, default=4096)
    g.add_argument("--launch-llama-server", default=None, metavar="PATH",
                   help="llama.cpp's llama-server binary for --launch llama-server (default: "
                        "$SERVELM_LLAMA_SERVER, else llama-server on PATH)")
    g.add_argument("--launch-max-num-seqs", type=int, default=None,
                   help="servelm's --max-num-seqs when launched (small values make requests queue)")
    g.add_argument("--launch-kv-cache-memory-gb", type=float, default=None,
                   help="servelm's --kv-cache-memory-gb when launched (small values force eviction)")
    g.add_argument("--launch-preemption-mode", default=None, choices=["recompute", "swap"],
                   help="servelm's --preemption-mode when launched")
    g.add_argument("--launch-tensor-parallel-size", type=int, default=1,
                   help="servelm's --tensor-parallel-size when launched (--launch-threads shared "
                        "out among the worker processes)")
    g.add_argument("--launch-pipeline-parallel-size", type=int, default=1,
                   help="servelm's --pipeline-parallel-size when launched")
    g.add_argument("--launch-replicas", type=int, default=1, metavar="N",
                   help="servelm-replicas-*: engine replicas, --launch-threads shared out among "
                        "them (plain servelm stays one engine with all the threads)")
    g.add_argument("--launch-prefill-replicas", type=int, default=1, metavar="P",
                   help="servelm-disagg: prefill replicas (threads shared out among P + D)")
    g.add_argument("--launch-decode-replicas", type=int, default=1, metavar="D",
                   help="servelm-disagg: decode replicas")
    g.add_argument("--launch-migrate-imbalance", type=int, default=None, metavar="N",
                   help="replicas: servelm's --migrate-imbalance (0: no live migration)")
    g.add_argument("--launch-router", default="prefix-aware", choices=ROUTERS,
                   help="servelm-replicas' router (servelm-replicas-ROUTER names its own)")
    g.add_argument("--launch-length-predictor", default=None, metavar="FILE",
                   help="servelm-sjf-learned's --length-predictor")
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset-name", default="random", choices=SERVE_DATASETS)
    g.add_argument("--dataset-path", default=None,
                   help="self-instruct/shared-prefix/multi-turn(-shared-prefix): JSONL of prompt+response; "
                        "mt-bench: question.jsonl")
    g.add_argument("--num-prompts", type=int, default=100, help="conversations to send")
    g.add_argument("--random-input-len", type=int, default=1024)
    g.add_argument("--random-output-len", type=int, default=128)
    g.add_argument("--random-range-ratio", type=float, default=0.0)
    g.add_argument("--output-len", type=int, default=None,
                   help="fixed output length for text datasets (default: reference length; "
                        "256 for mt-bench)")
    g.add_argument("--shared-prefix-len", type=int, default=512, help="tokens of shared system prompt")
    g.add_argument("--shared-prefix-num-prefixes", type=int, default=1,
                   help="distinct shared system prompts, used in turn")
    g.add_argument("--multi-turn-turns", type=int, default=3, help="user turns per conversation")
    g = p.add_argument_group("load")
    g.add_argument("--request-rate", type=_rates, default=[math.inf],
                   help="conversations/s, 'inf', or a sweep like 1,2,4,inf")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of arrivals: 1 Poisson, <1 burstier, >1 more regular")
    g.add_argument("--max-concurrency", type=int, default=None)
    g.add_argument("--max-duration", type=float, default=None,
                   help="seconds after which no new conversation starts")
    g.add_argument("--kill-replica-at", type=float, default=None, metavar="SECONDS",
                   help="SIGKILL the busiest ready replica this many seconds into each run "
                        "(a servelm-replicas server on this machine); failures and retries "
                        "are reported")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--extra-body", type=_json_object, default={}, metavar="JSON",
                   help="fields added to every request, e.g. a response_format with a JSON schema")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("metrics and output")
    g.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                   help="SLOs, e.g. ttft:500 tpot:50 e2el:5000")
    g.add_argument("--fluidity", default=None, metavar="TTFT_MS:TBT_MS",
                   help="report Etalon's fluidity-index: the share of token deadlines met, the "
                        "first token due TTFT_MS after sending, each next TBT_MS after the one "
                        "before (not taken from --goodput)")
    g.add_argument("--percentile-metrics", type=_names, default=["ttft", "tpot", "itl", "e2el"])
    g.add_argument("--metric-percentiles", type=_floats, default=[50.0, 90.0, 99.0])
    g.add_argument("--result-file", default=None, help="default: bench-results/serve-<date>.json")
    g.add_argument("--save-detailed", action="store_true", help="per-request records in the JSON")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:  # before any work: the load generator and its plots come with the `bench` extra
        require_extra("servelm bench serve", "aiohttp", *([] if args.no_plots else ["matplotlib"]))
    except MissingExtra as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from servelm.bench.launch import LaunchSpec
    from servelm.bench.serve import ServeConfig, run_serve
    from servelm.bench.serve_datasets import DatasetOptions
    from servelm.bench.serve_metrics import parse_fluidity, parse_goodput

    dataset = DatasetOptions(
        name=args.dataset_name, path=args.dataset_path, num_prompts=args.num_prompts,
        random_input_len=args.random_input_len, random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio, output_len=args.output_len,
        shared_prefix_len=args.shared_prefix_len,
        shared_prefix_num_prefixes=args.shared_prefix_num_prefixes, multi_turn_turns=args.multi_turn_turns,
        seed=args.seed)
    cfg = ServeConfig(
        base_url=args.base_url, endpoint=args.endpoint, model=args.model, tokenizer=args.tokenizer,
        api_key=args.api_key, dataset=dataset, request_rates=args.request_rate,
        burstiness=args.burstiness, max_concurrency=args.max_concurrency,
        max_duration_s=args.max_duration, request_timeout_s=args.request_timeout,
        goodput=parse_goodput(args.goodput), fluidity=parse_fluidity(args.fluidity),
        percentile_metrics=args.percentile_metrics,
        metric_percentiles=args.metric_percentiles, ignore_eos=args.ignore_eos, extra_body=args.extra_body, seed=args.seed,
        kill_replica_at=args.kill_replica_at, launch=args.launch,
        launch_spec=LaunchSpec(model=args.launch_model, num_threads=args.launch_threads,
                               dtype=args.launch_dtype, max_model_len=args.launch_max_model_len,
                               max_num_seqs=args.launch_max_num_seqs,
                               kv_cache_memory_gb=args.launch_kv_cache_memory_gb,
                               length_predictor=args.launch_length_predictor,
                               preemption_mode=args.launch_preemption_mode,
                               tensor_parallel_size=args.launch_tensor_parallel_size,
                               pipeline_parallel_size=args.launch_pipeline_parallel_size,
                               replicas=args.launch_replicas, router=args.launch_router,
                               prefill_replicas=args.launch_prefill_replicas,
                               decode_replicas=args.launch_decode_replicas,
                               migrate_imbalance=args.launch_migrate_imbalance,
                               llama_server=args.launch_llama_server),
        result_file=args.result_file, save_detailed=args.save_detailed, plots=not args.no_plots,
        quiet=args.quiet)
    try:
        run_serve(cfg)
    except RuntimeError as e:  # the target server is unreachable or refuses the test request
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value
