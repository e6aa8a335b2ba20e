"""What the published OpenAPI schema says each route answers: the response bodies (200)
and the error statuses with OpenAI's error body. The fuzzing test
(tests/server/test_fuzz_openapi.py) holds every answer of the server to it."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body, as every error status of this server returns it."""

    error: ErrorDetail


FinishReason = Literal["stop", "length", "abort", "tool_calls"]


class Usage(_Body):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(_Body):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: FinishReason | None


class CompletionResponse(_Body):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_Body):
    """One server-sent event of a streamed completion (usage: the last, when asked for)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ToolCall(_Body):
    id: str
    type: Literal["function"]
    function: dict[str, str]


class AssistantMessage(_Body):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Body):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(_Body):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ToolCallDelta(_Body):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: dict[str, str] | None = None


class ChatDelta(_Body):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(_Body):
    index: int
    delta: ChatDelta
    logprobs: dict[str, Any] | None = None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Body):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(_Body):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(_Body):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(_Body):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(_Body):
    prompt: str


class VersionResponse(_Body):
    version: str


class HealthResponse(_Body):
    status: Literal["ok", "unhealthy"]


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


# The error statuses a route may return.
ERRORS = {
    400: _error("Invalid parameters, prompt or constraint; the message names the field"),
    401: _error("Missing or wrong API key (when the server has one)"),
    404: _error("Unknown model"),
    413: _error("Request body over the server's size limit"),
    503: _error("Too many requests waiting, or the engine is down; see Retry-After"),
}
ADMIN_ERRORS = {
    400: _error("Invalid body, or the model runs on one engine"),
    401: _error("Missing or wrong admin key"),
    403: _error("Admin endpoints are off (no --admin-key)"),
    404: _error("Unknown model or request"),
    409: _error("The request cannot move now"),
    413: ERRORS[413],
    504: _error("The move did not finish in time"),
}


_REF = "#/components/schemas/{model}"
_CHUNKS = (CompletionChunk, ChatCompletionChunk)


def _events(chunk: type[BaseModel]) -> dict[str, Any]:
    """One server-sent event: `data:` is a JSON chunk (or an error), or the closing [DONE]."""
    payload = {"anyOf": [{"$ref": _REF.format(model=chunk.__name__)},
                         {"$ref": _REF.format(model="ErrorResponse")}]}
    return {"type": "object", "required": ["data"], "properties": {"data": {
        "type": "string", "if": {"const": "[DONE]"},
        "else": {"contentMediaType": "application/json", "contentSchema": payload}}}}


def answers(model: type[BaseModel], chunk: type[BaseModel] | None = None,
            errors: dict | None = None) -> dict:
    """A route's documented responses: `model` as JSON (or, where it streams, server-sent
    events of `chunk`), and its error statuses."""
    ok: dict[str, Any] = {"model": model}
    if chunk is not None:
        ok["content"] = {"text/event-stream": {"schema": _events(chunk)}}
        ok["description"] = "The response, or with stream=true its chunks as server-sent events"
    return {200: ok, **(ERRORS if errors is None else errors)}


PLAIN_TEXT = {200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                    "description": "Prometheus text format"}}


def schema_without_422(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, less its 422 entries: this server answers invalid bodies with 400
    (OpenAI's status), which every route documents."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
        _, defs = models_json_schema([(c, "serialization") for c in _CHUNKS], ref_template=_REF)
        for name, definition in defs.get("$defs", {}).items():
            schema["components"]["schemas"].setdefault(name, definition)
        app.openapi_schema = schema
    return app.openapi_schema
