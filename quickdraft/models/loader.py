"""Build a model and its tokenizer from an HF folder or a GGUF file, one tensor at a time."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open

from quickdraft.layers.quantization import QUANTIZATION_METHODS
from quickdraft.models.default_model import DEFAULT_MODEL_NAME, default_model_path
from quickdraft.models.hub import TOKENIZER_FILES, looks_like_repo_id, resolve_hub_model
from quickdraft.models.llama import DecoderForCausalLM
from quickdraft.models.model_config import ModelConfig
from quickdraft.tokenizer import Tokenizer, load_hf_tokenizer


@dataclass
class LoadedModel:
    model: DecoderForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    generation_config: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def resolve_model_path(model: str | Path | None, *, revision: str | None = None,
                       download_dir: str | Path | None = None, gguf_file: str | None = None) -> Path:
    """A model argument -> an existing HF folder or GGUF file path: a local folder or .gguf file,
    the embedded default, or a Hugging Face hub id (models/hub.py: cache first, then the hub;
    ``revision``, ``download_dir`` and ``gguf_file`` apply there). Clear errors otherwise."""
    if model is None or str(model).lower() == DEFAULT_MODEL_NAME:
        return default_model_path()
    path = Path(model).expanduser()
    if path.is_dir():
        if gguf_file is not None:
            file = path / gguf_file
            if not file.is_file() or file.suffix.lower() != ".gguf":
                held = sorted(p.name for p in path.glob("*.gguf"))
                raise FileNotFoundError(f"gguf_file={gguf_file!r} is not a .gguf file in {str(path)!r} "
                                        f"(it holds: {', '.join(held) or 'no .gguf files'}).")
            return file
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"Model folder {str(path)!r} has no config.json.")
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"Model file {str(path)!r} is not a .gguf file; pass a GGUF file or an HF folder.")
        return path
    if looks_like_repo_id(str(model)):
        return resolve_hub_model(str(model), revision=revision, download_dir=download_dir, gguf_file=gguf_file)
    raise FileNotFoundError(
        f"Model {str(model)!r} not found: expected a Hugging Face model folder, a .gguf file, a Hugging Face "
        f"model id (ORG/NAME, or ORG/NAME:QUANT for a GGUF repo) or {DEFAULT_MODEL_NAME!r}.")


def resolve_tokenizer_path(tokenizer: str | Path, *, revision: str | None = None,
                           download_dir: str | Path | None = None) -> Path:
    """A tokenizer argument -> a local folder with tokenizer files: a folder as given, or a hub
    id (only the tokenizer files and chat template are fetched)."""
    path = Path(tokenizer).expanduser()
    if path.is_dir():
        return path
    if looks_like_repo_id(str(tokenizer)):
        return resolve_hub_model(str(tokenizer), revision=revision, download_dir=download_dir, files=TOKENIZER_FILES)
    raise FileNotFoundError(f"Tokenizer {str(tokenizer)!r} not found: expected a folder with tokenizer.json or a "
                            f"Hugging Face model id.")


def read_model_config(path: Path) -> dict[str, Any]:
    if path.is_dir():
        return json.loads((path / "config.json").read_text())
    from quickdraft.models.gguf_loader import load_gguf_config
    return load_gguf_config(path)


def _iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors weights in {str(folder)!r}.")
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def load_model(model: str | Path | None, *, tokenizer: str | Path | None, dtype: torch.dtype,
               device: torch.device, max_positions: int, config: ModelConfig | None = None,
               quantization: str | None = None) -> LoadedModel:
    """``config``: the model's already-parsed ModelConfig, if the caller has it; ``quantization``:
    as resolved by config.resolve_quantization ('gguf', 'q8_0', 'q4_0' or None)."""
    path = resolve_model_path(model)
    cfg = config if config is not None else ModelConfig.from_hf_config(read_model_config(path))
    net = DecoderForCausalLM(cfg, dtype, device, max_positions)
    if path.is_dir():
        net.load_weights(_iter_safetensors(path))
        gen_cfg_path = path / "generation_config.json"
        gen_cfg = json.loads(gen_cfg_path.read_text()) if gen_cfg_path.is_file() else {}
        tok = load_hf_tokenizer(Path(tokenizer) if tokenizer else path)
    else:
        from quickdraft.models.gguf_loader import iter_gguf_tensors, load_gguf_tokenizer
        net.load_weights(iter_gguf_tensors(path, keep_quantized=quantization == "gguf"))
        gen_cfg = {}
        if tokenizer:
            tok = load_hf_tokenizer(Path(tokenizer))
        else:
            data = load_gguf_tokenizer(path)
            tok = Tokenizer(data.backend, bos_token=data.bos_token, eos_token=data.eos_token,
                            chat_template=data.chat_template, add_bos_token=data.add_bos_token or None)
    net.pack_linears(quantization if quantization in QUANTIZATION_METHODS else None)
    net.eval()
    return LoadedModel(net, cfg, tok, gen_cfg, path)
