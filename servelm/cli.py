"""`servelm generate | chat | bench` — the command line front door."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from servelm.engine_args import add_engine_args, engine_kwargs


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)


def sampling_params(args: argparse.Namespace):
    from servelm.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def cmd_generate(args: argparse.Namespace) -> int:
    from servelm.llm import LLM

    params = sampling_params(args)  # validate before the slow model load
    llm = LLM(args.model, **engine_kwargs(args))
    out = llm.generate(args.prompt, params, use_tqdm=False)[0]
    c = out.outputs[0]
    if args.json:
        m = out.metrics
        print(json.dumps({
            "prompt": args.prompt, "text": c.text, "prompt_token_ids": out.prompt_token_ids,
            "token_ids": c.token_ids, "finish_reason": c.finish_reason,
            "ttft_s": m.first_token_time - m.arrival_time, "e2e_s": m.finished_time - m.arrival_time,
        }))
    else:
        print(args.prompt + c.text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from servelm.config import EngineConfig
    from servelm.engine.engine import LLMEngine

    params = sampling_params(args)
    engine = LLMEngine(EngineConfig(model=args.model, **engine_kwargs(args)))
    tok = engine.tokenizer
    if not tok.chat_template:
        print("error: this model has no chat template", file=sys.stderr)
        return 2
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    turn = 0
    print("servelm chat — empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        rid = f"chat-{turn}"
        turn += 1
        engine.add_request(rid, {"prompt_token_ids": ids}, params, stream=True)
        reply = ""
        while engine.has_unfinished_requests():
            for out in engine.step():
                delta = out.outputs[0].delta_text
                reply += delta
                print(delta, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": reply})
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    import uvicorn

    class _GracefulServer(uvicorn.Server):
        """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, so the process
        would die by the signal; a server that shut down cleanly should exit 0."""

        def handle_exit(self, sig, frame) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    from servelm.server.app import build_app
    from servelm.server.guards import ServerOptions

    if args.model_path:
        args.model = [args.model_path, *(args.model or [])]
    options = ServerOptions(api_key=args.api_key, admin_key=args.admin_key or os.environ.get("SERVELM_ADMIN_KEY"),
                            max_body_bytes=args.max_body_bytes,
                            max_num_waiting=args.max_num_waiting)
    models, cleanup = _served_models(args)
    names = ", ".join(repr(m.name) for m in models)
    print(f"servelm serving {names} at http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    try:
        # uvicorn stops accepting on SIGTERM/SIGINT and gives in-flight requests
        # --shutdown-timeout seconds before closing them; their streams then abort.
        logging.getLogger("servelm").setLevel(logging.INFO)
        config = uvicorn.Config(build_app(models, options=options), host=args.host, port=args.port,
                                log_level="warning", timeout_graceful_shutdown=args.shutdown_timeout)
        server = _GracefulServer(config)
        server.run()
        if not server.started:  # a model failed to start (its error is logged above)
            return 1
    finally:
        cleanup()
    return 0


def _served_models(args: argparse.Namespace):
    """One engine in this process, or replica pools on Ray; and how to tear them down."""
    from servelm.cluster.options import wants_cluster

    if wants_cluster(args):
        from servelm.cluster.options import cluster_options, model_specs
        from servelm.cluster.pool import ReplicaPool
        from servelm.cluster.runtime import start_ray, stop_ray

        options = cluster_options(args)
        specs = model_specs(args, engine_kwargs(args))
        started = start_ray(options.ray_address)
        try:
            return [ReplicaPool(spec, options) for spec in specs], (stop_ray if started else lambda: None)
        except BaseException:
            if started:
                stop_ray()
            raise

    from servelm.config import EngineConfig
    from servelm.engine.async_engine import AsyncLLM
    from servelm.model.default_model import DEFAULT_MODEL_NAME
    from servelm.server.models import LocalModel

    model = (args.model or [None])[0]
    if args.role != "both":
        raise SystemExit(f"--role {args.role} makes an engine one part of a disaggregated "
                         "deployment: serve one with --prefill-replicas P --decode-replicas D")
    llm = AsyncLLM(EngineConfig(model=model, **engine_kwargs(args)))
    return [LocalModel(llm, args.served_model_name or (model or DEFAULT_MODEL_NAME))], llm.shutdown


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="servelm", description="Serve and run language models.")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate a completion for one prompt")
    p.add_argument("prompt")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    add_engine_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat, streaming tokens")
    p.add_argument("--system", default=None, help="system prompt")
    add_engine_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    p.add_argument("model_path", nargs="?", default=None, help="same as --model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    p.add_argument("--admin-key", default=None,
                   help="turn on /admin (live migration) behind 'Authorization: Bearer KEY' "
                        "(or set SERVELM_ADMIN_KEY)")
    p.add_argument("--max-num-waiting", type=int, default=1024, help="queue bound; beyond it 503")
    p.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="larger bodies get 413")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests get to finish on SIGTERM/SIGINT")
    add_engine_args(p, several_models=True)
    from servelm.cluster.options import add_cluster_args

    add_cluster_args(p)
    p.set_defaults(func=cmd_serve)

    from servelm.bench.cli import add_bench_parser
    from servelm.bench.eval_perplexity import add_eval_parser
    from servelm.bench.length_predictor_cli import add_predictor_parser

    add_bench_parser(sub, add_engine_args)
    add_predictor_parser(sub, add_engine_args)
    add_eval_parser(sub, add_engine_args)
    from servelm.simulate.cli import add_simulate_parser
    from servelm.train.cli import add_train_parser

    add_simulate_parser(sub, add_engine_args)
    add_train_parser(sub, add_engine_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
