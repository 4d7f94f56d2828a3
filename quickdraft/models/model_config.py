"""Architecture hyper-parameters parsed once from an HF-style config.json dict."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# architectures value -> flags of the shared decoder implementation.
SUPPORTED_ARCHITECTURES: dict[str, dict[str, bool]] = {
    "LlamaForCausalLM": {"qkv_bias": False, "qk_norm": False},
    "MistralForCausalLM": {"qkv_bias": False, "qk_norm": False},
    "Qwen2ForCausalLM": {"qkv_bias": True, "qk_norm": False},
    "Qwen3ForCausalLM": {"qkv_bias": False, "qk_norm": True},
}


def supported_architecture(cfg: dict[str, Any], name: str | None = None) -> str:
    """The architecture of an HF config.json that quickdraft runs; a ValueError naming the
    model's architectures otherwise (and its custom code, for repos with an auto_map)."""
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is not None:
        return arch
    what = f"Model {name!r}: architectures" if name else "Model architectures"
    custom = ""
    if cfg.get("auto_map"):
        custom = (f" It needs custom code (auto_map in its config.json: {cfg['auto_map']}), which quickdraft "
                  f"does not run.")
    raise ValueError(f"{what} {archs} are not supported by quickdraft.{custom} "
                     f"Supported architectures: {sorted(SUPPORTED_ARCHITECTURES)}.")


def check_runnable(config_json: Path, name: str | None = None) -> None:
    """supported_architecture() of a config.json file."""
    supported_architecture(json.loads(Path(config_json).read_text()), name)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None
    torch_dtype: str | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelConfig":
        arch = supported_architecture(cfg)
        flags = SUPPORTED_ARCHITECTURES[arch]
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or hidden // heads
        # transformers < 5 uses rope_theta/rope_scaling; transformers 5 nests both in rope_parameters.
        rope_params = cfg.get("rope_parameters") or {}
        rope_theta = float(cfg.get("rope_theta") or rope_params.get("rope_theta") or 10000.0)
        scaling = cfg.get("rope_scaling") or rope_params or None
        if scaling:
            rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
            if rope_type == "default":
                scaling = None
            elif rope_type != "llama3":
                raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: 'llama3'.")
            else:
                scaling = dict(scaling, rope_type="llama3")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        # Mistral applies sliding_window when set; Qwen2/3 only with use_sliding_window; Llama never.
        sliding = cfg.get("sliding_window")
        if arch == "LlamaForCausalLM" or (arch.startswith("Qwen") and not cfg.get("use_sliding_window", False)):
            sliding = None
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=flags["qkv_bias"] or attention_bias,
            o_bias=attention_bias if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM") else False,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=flags["qk_norm"],
            sliding_window=int(sliding) if sliding else None,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
