"""Engine options that are small dicts, given in Python as a dict and on the command
line as JSON (`speculative_config`, `kv_compression`)."""

from __future__ import annotations

import json
from typing import Any


def parse_dict_option(name: str, value: dict[str, Any] | str | None, allowed: set[str]) -> dict[str, Any] | None:
    """The option as a dict, None when off; errors name the option and the keys allowed."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict, got {type(value).__name__}")
    unknown = set(value) - allowed
    if unknown:
        raise ValueError(f"{name}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    return value
