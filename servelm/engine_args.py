"""Command-line flags for the engine options, generated from `EngineConfig`'s fields.

Every subcommand that builds an engine (generate, chat, serve, bench, eval, length-predictor)
takes the same `--flags`; their defaults, choices and help come from servelm/config.py, so
an option is declared once.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from servelm.config import EngineConfig, field_types


def _flag_options(f: dataclasses.Field) -> dict[str, Any]:
    types, meta = field_types()[f.name], f.metadata
    shown = "" if f.default is None or "default" in meta["help"] else f" (default: {f.default})"
    kwargs: dict[str, Any] = {"default": f.default, "help": meta["help"] + shown}
    if types == {bool}:
        kwargs["action"] = argparse.BooleanOptionalAction
        return kwargs
    if types in ({int}, {float}):
        kwargs["type"] = next(iter(types))
    if meta["choices"] is not None:
        kwargs["choices"] = meta["choices"]
    if meta["metavar"] is not None:
        kwargs["metavar"] = meta["metavar"]
    return kwargs


def add_engine_args(parser: argparse.ArgumentParser, several_models: bool = False) -> None:
    """Add one `--flag` per engine option to `parser`, in an "engine" group; with
    `several_models`, `--model` may be given more than once (a list, or None)."""
    group = parser.add_argument_group("engine")
    for f in dataclasses.fields(EngineConfig):
        if f.metadata["cli"]:
            options = _flag_options(f)
            if several_models and f.name == "model":
                options.update(action="append", default=None,
                               help=options["help"] + "; repeat it to serve several models")
            group.add_argument("--" + f.name.replace("_", "-"), **options)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options parsed by `add_engine_args`, as `LLM(...)` / `EngineConfig` kwargs
    (the model left out: some commands also take it as a positional argument)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)
            if f.metadata["cli"] and f.name != "model"}
