"""OpenAI request bodies (pydantic). Unknown fields are ignored, as OpenAI clients expect;
known ones must have their published type (strict: `"stream": 0` or `"n": "2"` is a 400,
not a guess). Range checks live in SamplingParams so the HTTP layer and the offline API
agree."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from servelm.sampling_params import SamplingParams


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    # with --scheduling-policy priority: lower runs first (vLLM's field)
    priority: int = Field(0, ge=-(2**63), le=2**63 - 1)
    num_speculative_tokens: int | None = None  # with --speculative-config: 0 opts out
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    # Structured outputs: OpenAI's response_format, or vLLM's guided_* fields.
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    logit_bias: dict[str, float] | None = None

    def structured_outputs(self) -> dict[str, Any] | None:
        """The one constraint asked for, as SamplingParams.structured_outputs; ValueError
        when it is malformed or there are several."""
        given = {k: v for k, v in (("json", self.guided_json), ("regex", self.guided_regex),
                                   ("choice", self.guided_choice), ("grammar", self.guided_grammar))
                 if v is not None}
        fmt = self.response_format
        if fmt is not None:
            kind = fmt.get("type")
            if kind == "json_object":
                given["json_object"] = True
            elif kind == "json_schema":
                schema = (fmt.get("json_schema") or {}).get("schema")
                if not isinstance(schema, (dict, str)):
                    raise ValueError("response_format.json_schema.schema must be a JSON schema object")
                given["json"] = schema
            elif kind != "text":
                raise ValueError(f"response_format.type must be 'text', 'json_object' or 'json_schema', "
                                 f"got {kind!r}")
        if len(given) > 1:
            raise ValueError(f"give one of response_format and guided_json/regex/choice/grammar, got "
                             f"{sorted(given)}")
        return given or None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        given = {k: v for k, v in {
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "min_p": self.min_p, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "num_speculative_tokens": self.num_speculative_tokens,
        }.items() if v is not None}
        return SamplingParams(n=self.n, stop=self.stop, seed=self.seed, ignore_eos=self.ignore_eos,
                              max_tokens=max_tokens, logprobs=logprobs, logit_bias=self.logit_bias,
                              structured_outputs=self.structured_outputs(), **given)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Request):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prompt": "Once upon a time", "max_tokens": 16},
        {"prompt": ["The capital of France is", "Hello"], "max_tokens": 8, "n": 2, "stream": True,
         "logprobs": 2, "temperature": 0.8, "seed": 1, "stream_options": {"include_usage": True}},
        {"prompt": "The best color is", "max_tokens": 8, "guided_choice": ["red", "green", "blue"]},
    ]})

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if self.suffix:
            raise ValueError("suffix is not supported: servelm does not fill in the middle "
                             "(leave suffix out or empty)")
        return super().sampling_params(max_tokens, logprobs)

    def prompts(self) -> list[str | dict]:
        p = self.prompt
        if not p and isinstance(p, list):
            raise ValueError("prompt must not be an empty list")
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [{"prompt_token_ids": list(p)}]
        return [x if isinstance(x, str) else {"prompt_token_ids": list(x)} for x in p]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer: to which call
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("messages: only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


_WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


class ChatCompletionRequest(_Request):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Say hi."}], "max_tokens": 16},
        {"messages": [{"role": "user", "content": "A cat as JSON"}], "stream": True, "max_tokens": 24,
         "response_format": {"type": "json_object"}, "logprobs": True, "top_logprobs": 2,
         "stream_options": {"include_usage": True}},
        {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [_WEATHER],
         "tool_choice": "required", "stream": True, "max_tokens": 32},
    ]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    tokens: list[int]
