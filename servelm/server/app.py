"""The OpenAI-compatible HTTP API over AsyncLLM (FastAPI)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from servelm import __version__
from servelm.engine.async_engine import AsyncLLM, EngineDeadError, EngineStepError
from servelm.outputs import RequestOutput
from servelm.server import tools as tools_module
from servelm.server.admin import install_admin
from servelm.server.guards import ServerOptions, error, install_guards, overloaded
from servelm.server.metrics import ServerMetrics
from servelm.server.models import LocalModel, ServedModel
from servelm.server.openapi import (
    ERRORS,
    PLAIN_TEXT,
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionResponse,
    DetokenizeResponse,
    HealthResponse,
    ModelList,
    TokenizeResponse,
    VersionResponse,
    answers,
    schema_without_422,
)
from servelm.server.playground import install_playground
from servelm.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from servelm.server.responses import chat_logprobs, completion_logprobs, usage
from servelm.server.streaming import chat_message, collect, sse, stream_chat, stream_completions


def build_app(models: AsyncLLM | Sequence[ServedModel], served_model_name: str | None = None,
              options: ServerOptions | None = None) -> FastAPI:
    """The API over one engine (`build_app(llm, name)`) or over several served models,
    picked by the request's `model` field (the first when it is left out)."""
    if isinstance(models, AsyncLLM):
        models = [LocalModel(models, served_model_name or "default")]
    by_name = {m.name: m for m in models}
    default = models[0]
    options = options or ServerOptions()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        started = []
        try:
            for m in models:
                await m.start()
                started.append(m)
            yield
        finally:
            for m in started:
                await m.stop()

    app = FastAPI(title="servelm", version=__version__, lifespan=lifespan)
    install_guards(app, options)
    metrics = ServerMetrics(lambda: [s for m in models for s in m.metric_snapshots()],
                            lambda: [r for m in models for r in m.extra_metrics()])

    def generate(model: ServedModel, request_id: str, prompt, params, body, session=None):
        return metrics.observe(model.generate(request_id, prompt, params, body.priority,
                                              stream=body.stream, session=session))

    @app.get("/metrics", response_class=PlainTextResponse, responses=PLAIN_TEXT)
    async def prometheus() -> Response:
        await asyncio.gather(*(m.refresh_metrics() for m in models))
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(400, f"{loc or 'body'}: {first.get('msg', 'invalid request')}", param=loc or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own errors (unreadable body, unknown path or method) in OpenAI's shape."""
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error(exc.status_code, str(exc.detail), err_type=kind, headers=exc.headers)

    @app.exception_handler(EngineStepError)
    async def _failed(_: Request, exc: EngineStepError) -> JSONResponse:
        return error(500, str(exc), err_type="server_error")

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return error(503, str(exc), err_type="server_error")

    @app.exception_handler(ValueError)
    async def _bad_value(_: Request, exc: ValueError) -> JSONResponse:
        return error(400, str(exc))

    def find(name: str | None) -> ServedModel | JSONResponse:
        model = default if name is None else by_name.get(name)
        if model is None:
            served = ", ".join(repr(n) for n in by_name)
            return error(404, f"model {name!r} does not exist; this server serves {served}",
                         err_type="not_found_error", param="model")
        return model

    install_admin(app, models, find)
    install_playground(app)

    def pick(name: str | None) -> ServedModel | JSONResponse:
        """The model for a generation request, unless it is unknown or overloaded."""
        model = find(name)
        if isinstance(model, JSONResponse):
            return model
        return overloaded(model.num_waiting, options) or model

    def tokenizer(model: ServedModel) -> Any:
        if model.tokenizer is None:
            raise ValueError("this server has no tokenizer (--skip-tokenizer-init): send token ids")
        return model.tokenizer

    def chat_prompt_ids(model: ServedModel, messages, tools: list | None = None) -> list[int]:
        tok = tokenizer(model)
        if not tok.chat_template:
            raise ValueError("messages: this model has no chat template")
        msgs = [tools_module.template_message(m) for m in messages]
        ids = tok.apply_chat_template(msgs, tools=tools or None, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    @app.post("/tokenize", responses=answers(TokenizeResponse))
    async def tokenize(body: TokenizeRequest):
        model = find(body.model)
        if isinstance(model, JSONResponse):
            return model
        ids = (chat_prompt_ids(model, body.messages) if body.messages
               else tokenizer(model).encode(body.prompt or ""))
        return {"tokens": ids, "count": len(ids), "max_model_len": model.max_model_len}

    @app.post("/detokenize", responses=answers(DetokenizeResponse))
    async def detokenize(body: DetokenizeRequest):
        model = find(body.model)
        if isinstance(model, JSONResponse):
            return model
        vocab = model.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"tokens must be integers in [0, {vocab}), got {bad[0]}")
        return {"prompt": tokenizer(model).decode(body.tokens)}

    @app.get("/health", response_model=None, responses={
        200: {"model": HealthResponse}, 503: {"model": HealthResponse, "description": "Unhealthy"}})
    async def health() -> dict[str, Any] | JSONResponse:
        reports = {m.name: m.health() for m in models}
        ok = all(good for good, _ in reports.values())
        if len(models) == 1:
            body = reports[default.name][1]
        else:
            body = {"status": "ok" if ok else "unhealthy",
                    "models": {name: report for name, (_, report) in reports.items()}}
        return body if ok else JSONResponse(status_code=503, content=body)

    @app.get("/version", responses={200: {"model": VersionResponse}})
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/v1/models", responses=answers(ModelList, errors={401: ERRORS[401]}))
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": m.name, "object": "model", "created": 0, "owned_by": "servelm",
            "max_model_len": m.max_model_len} for m in models]}

    @app.post("/v1/completions", responses=answers(CompletionResponse, CompletionChunk))
    async def completions(body: CompletionRequest, request: Request):
        model = pick(body.model)
        if isinstance(model, JSONResponse):
            return model
        tok = model.tokenizer
        if tok is None and (body.logprobs is not None or body.echo):
            raise ValueError("logprobs and echo need a tokenizer; this server has none "
                             "(--skip-tokenizer-init)")
        params = body.sampling_params(body.max_tokens, body.logprobs)
        rid = model.new_request_id("cmpl")
        session = _session(body, request)
        streams = [generate(model, f"{rid}-{i}", p, params, body, session)
                   for i, p in enumerate(body.prompts())]
        base = {"id": rid, "object": "text_completion", "created": int(time.time()),
                "model": model.name}
        if body.stream:
            return sse(stream_completions(streams, base, body, params.n, tok))
        finals = await collect(streams)
        choices = []
        for pi, out in enumerate(finals):
            prefix = _prompt_text(out, tok) if body.echo else ""
            for c in out.outputs:
                choices.append({"index": pi * params.n + c.index, "text": prefix + c.text,
                                "logprobs": (completion_logprobs(c, tok, body.logprobs)
                                             if body.logprobs is not None else None),
                                "finish_reason": c.finish_reason})
        return {**base, "choices": choices, "usage": usage(finals)}

    @app.post("/v1/chat/completions", responses=answers(ChatCompletionResponse, ChatCompletionChunk))
    async def chat(body: ChatCompletionRequest, request: Request):
        model = pick(body.model)
        if isinstance(model, JSONResponse):
            return model
        tok = model.tokenizer
        mode = tools_module.check_tools(body.tools, body.tool_choice)
        ids = chat_prompt_ids(model, body.messages, body.tools if mode != "none" else None)
        k = (body.top_logprobs or 0) if body.logprobs else None
        params = body.sampling_params(body.max_completion_tokens or body.max_tokens, k)
        if mode not in ("none", "auto"):  # a call is required: its JSON is constrained
            if params.structured_outputs is not None:
                raise ValueError("tool_choice 'required' or a named function cannot be combined "
                                 "with response_format or guided_*")
            params = params.clone(structured_outputs={"json": tools_module.forced_schema(body.tools, mode)})
        rid = model.new_request_id("chatcmpl")
        streams = [generate(model, rid, {"prompt_token_ids": ids}, params, body,
                            _session(body, request))]
        base = {"id": rid, "object": "chat.completion", "created": int(time.time()),
                "model": model.name}
        if body.stream:
            return sse(stream_chat(streams[0], {**base, "object": "chat.completion.chunk"}, body, tok, k,
                                     mode))
        out = (await collect(streams))[0]
        choices = [{"index": c.index, **chat_message(c, mode),
                    "logprobs": chat_logprobs(c, tok, k) if body.logprobs else None}
                   for c in out.outputs]
        return {**base, "choices": choices, "usage": usage([out])}

    app.openapi = lambda: schema_without_422(app)
    return app


def _session(body, request: Request) -> str | None:
    """A chat session to keep on one replica: the `X-Session-Id` header, else `user`."""
    return request.headers.get("x-session-id") or body.user


def _prompt_text(out: RequestOutput, tok) -> str:
    return out.prompt if out.prompt is not None else tok.decode(out.prompt_token_ids)
