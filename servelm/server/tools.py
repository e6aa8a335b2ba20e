"""Tool calls on chat completions, in the Hermes / Qwen convention: the chat template shows
the model the tools, and the model answers a call as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

- tool_choice "auto" (the default with tools): the text is generated freely and every
  `<tool_call>` block in it becomes an entry of `tool_calls`; text before the first block
  stays the message's content.
- "required", or a named function: the output is constrained (structured outputs) to a JSON
  list of calls whose arguments follow the tools' parameter schemas, so it always parses.
- "none": the tools are not shown and nothing is parsed.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
OPEN_TAG = "<tool_call>"


def check_tools(tools: list[dict[str, Any]] | None, tool_choice: Any) -> str:
    """Validate the request's tools and tool_choice; returns the mode: "none", "auto",
    "required" or the named function."""
    tools = tools or []
    names = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        if not isinstance(fn.get("parameters", {}), dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        names.append(fn["name"])
    if tool_choice is None:
        return "auto" if tools else "none"
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if tool_choice.get("type") != "function" or name not in names:
            raise ValueError(f"tool_choice names a function that is not in tools ({names}): {tool_choice!r:.100}")
        return name
    if tool_choice not in ("none", "auto", "required"):
        raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or a named function, got {tool_choice!r:.50}")
    if tool_choice != "none" and not tools:
        raise ValueError(f"tool_choice {tool_choice!r} needs tools")
    return tool_choice


def forced_schema(tools: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """The JSON schema of the output when a call is required: a list of one or more calls
    ({"name", "arguments"}) of any tool, or of the named one."""
    chosen = [t["function"] for t in tools if mode == "required" or t["function"]["name"] == mode]
    call = {"anyOf": [{"type": "object", "properties": {
        "name": {"const": fn["name"]},
        "arguments": fn.get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"], "additionalProperties": False} for fn in chosen]}
    return {"type": "array", "items": call, "minItems": 1}


def held_back(text: str) -> int:
    """Characters at the end of streamed `text` that may begin a `<tool_call>` tag, and so
    wait for the next chunk; the whole rest once a tag has begun."""
    start = text.find(OPEN_TAG)
    if start >= 0:
        return len(text) - start
    return next((n for n in range(min(len(OPEN_TAG) - 1, len(text)), 0, -1)
                 if OPEN_TAG.startswith(text[-n:])), 0)


def template_message(m: Any) -> dict[str, Any]:
    """A chat message as chat templates take it: tool calls' arguments as objects."""
    msg: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.tool_calls:
        msg["tool_calls"] = [{**c, "function": {**c.get("function", {}), "arguments": _arguments(c)}}
                             for c in m.tool_calls]
    if m.tool_call_id is not None:
        msg["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        msg["name"] = m.name
    return msg


def _arguments(call: dict[str, Any]) -> Any:
    args = (call.get("function") or {}).get("arguments", "{}")
    try:
        return json.loads(args) if isinstance(args, str) else args
    except ValueError:
        return args


def _call(name: Any, arguments: Any) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": str(name), "arguments": json.dumps(arguments)}}


def parse(text: str, mode: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a finished output. A block that is not a JSON call stays in
    the content, as the model wrote it."""
    if mode != "auto":  # constrained: the whole output is the list of calls
        return None, [_call(c["name"], c.get("arguments", {})) for c in json.loads(text)]
    calls, kept = [], []
    for m in _CALL.finditer(text):
        try:
            c = json.loads(m.group(1))
            calls.append(_call(c["name"], c.get("arguments", {})))
        except (ValueError, KeyError, TypeError):
            kept.append(m.group(0))
    if not calls:
        return text, []
    content = text[: text.index(OPEN_TAG)].strip()
    if kept:
        content = "\n".join([content, *kept]).strip()
    return content or None, calls
