"""Decoder-only transformer for the Llama family: Llama (incl. SmolLM2, Llama 3.x), Mistral,
Qwen2 (bias on q/k/v) and Qwen3 (RMSNorm on q and k per head), selected by ModelConfig flags.

Works on flat token batches: every tensor's first dimension is the step's T tokens, whatever
sequences they belong to. Q/K/V and gate/up projections are fused into one matrix each.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from quickdraft.kernels import layer_ops
from quickdraft.kernels.decoder import NativeDecoder
from quickdraft.layers.attention import AttentionMetadata, paged_attention
from quickdraft.layers.linear import Linear
from quickdraft.layers.quantization import QuantizedWeight
from quickdraft.layers.norm import rms_norm
from quickdraft.layers.rotary import RotaryEmbedding, apply_rotary
from quickdraft.models.model_config import ModelConfig


def _param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_size, self.kv_size = self.n_heads * d, self.n_kv * d
        self.eps = cfg.rms_norm_eps
        self.input_layernorm = _param(h, dtype=dtype, device=device)
        self.post_attention_layernorm = _param(h, dtype=dtype, device=device)
        self.qkv_proj = Linear(h, self.q_size + 2 * self.kv_size, cfg.qkv_bias, dtype, device)
        self.o_proj = Linear(self.q_size, h, cfg.o_bias, dtype, device)
        self.q_norm = _param(d, dtype=dtype, device=device) if cfg.qk_norm else None
        self.k_norm = _param(d, dtype=dtype, device=device) if cfg.qk_norm else None
        self.gate_up_proj = Linear(h, 2 * cfg.intermediate_size, cfg.mlp_bias, dtype, device)
        self.down_proj = Linear(cfg.intermediate_size, h, cfg.mlp_bias, dtype, device)
        self.scale = d**-0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        T = x.shape[0]  # x: [T, hidden]
        h = rms_norm(x, self.input_layernorm, self.eps)
        qkv = self.qkv_proj(h)  # [T, q + 2 kv]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.n_heads, self.head_dim)
        k = k.view(T, self.n_kv, self.head_dim)
        v = v.view(T, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm, self.eps)
            k = rms_norm(k, self.k_norm, self.eps)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        attn = paged_attention(q, k, v, kv_cache, meta, self.scale)  # [T, H * D]
        x = x + self.o_proj(attn)
        h = rms_norm(x, self.post_attention_layernorm, self.eps)
        gate, up = self.gate_up_proj(h).chunk(2, dim=-1)  # [T, inter] each
        return x + self.down_proj(F.silu(gate) * up)


class DecoderForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype, device) for _ in range(cfg.num_hidden_layers))
        self.norm = _param(cfg.hidden_size, dtype=dtype, device=device)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, dtype, device)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, dtype, device)
        self.native_decoder: NativeDecoder | None = None  # CPU float32 with native kernels (pack_linears)
        self.embed_quant: QuantizedWeight | None = None  # the embedding kept as stored (GGUF blocks)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden]."""
        if self.embed_quant is not None:  # rows dequantized from the stored blocks
            x = self.embed_quant.dequantize(input_ids).to(self.rotary.cos.dtype)
        elif self.embed_tokens.numel() == 0:  # tied and packed: the LM head's panels hold the table
            x = self.lm_head.native.rows(input_ids)
        else:
            x = F.embedding(input_ids, self.embed_tokens)
        if self.native_decoder is not None:  # the runner then built one NativeQueries segment
            x = self.native_decoder(x, positions, meta.slot_mapping, meta.segments[0].native, self.rotary.cos,
                                    self.rotary.sin, kv_caches)
            return layer_ops().rms_norm(x, self.norm, self.cfg.rms_norm_eps)
        cos, sin = self.rotary.tables(positions)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, kv_cache, meta)
        return rms_norm(x, self.norm, self.cfg.rms_norm_eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> float32 logits [N, vocab]."""
        return self.lm_head(hidden).float()

    def _linears(self) -> list[Linear]:
        return [lin for layer in self.layers
                for lin in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)]

    def pack_linears(self, quantization: str | None = None) -> None:
        """Choose each linear's kernel (see layers/linear.py): weights loaded quantized run as
        stored; ``quantization`` ('q8_0' / 'q4_0') quantizes float weights at load, LM head
        included. With tied embeddings and the native float kernel, embedding lookups read the LM
        head's packed panels and the plain table is freed, so the matrix is held once; a quantized
        tied head keeps the float table (GGUF: the stored blocks) for lookups."""
        for lin in self._linears():
            lin.pack(quantization=quantization)
        tied = self.cfg.tie_word_embeddings
        if tied and self.embed_quant is not None:
            self.lm_head.set_stored(0, self.embed_quant)
        self.lm_head.pack(keep_weight=tied, quantization=quantization)
        if self.embed_quant is not None:
            self.embed_quant = self.embed_quant.to(self.embed_tokens.device)
        native = all(lin.native is not None or lin.native_q is not None or lin.native_parts is not None
                     for lin in self._linears())
        if native and layer_ops() is not None and self.cfg.head_dim % 8 == 0 and self.cfg.head_dim <= 256:
            self.native_decoder = NativeDecoder(list(self.layers), self.cfg.hidden_size, self.cfg.intermediate_size,
                                                self.cfg.rms_norm_eps)
        if tied and (self.lm_head.native is not None or self.embed_quant is not None):
            self.embed_tokens = _param(0, dtype=self.embed_tokens.dtype, device=self.embed_tokens.device)
            self.lm_head.weight = self.embed_tokens

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the (fused) parameters; every parameter must be set once."""
        cfg = self.cfg
        q, kv, inter = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
        fused = {  # HF suffix -> (our parameter, row offset, rows)
            "self_attn.q_proj.weight": ("qkv_proj.weight", 0, q), "self_attn.k_proj.weight": ("qkv_proj.weight", q, kv),
            "self_attn.v_proj.weight": ("qkv_proj.weight", q + kv, kv), "self_attn.q_proj.bias": ("qkv_proj.bias", 0, q),
            "self_attn.k_proj.bias": ("qkv_proj.bias", q, kv), "self_attn.v_proj.bias": ("qkv_proj.bias", q + kv, kv),
            "mlp.gate_proj.weight": ("gate_up_proj.weight", 0, inter),
            "mlp.up_proj.weight": ("gate_up_proj.weight", inter, inter),
            "mlp.gate_proj.bias": ("gate_up_proj.bias", 0, inter), "mlp.up_proj.bias": ("gate_up_proj.bias", inter, inter),
        }
        plain = {
            "input_layernorm.weight": "input_layernorm", "post_attention_layernorm.weight": "post_attention_layernorm",
            "self_attn.o_proj.weight": "o_proj.weight", "self_attn.o_proj.bias": "o_proj.bias",
            "self_attn.q_norm.weight": "q_norm", "self_attn.k_norm.weight": "k_norm",
            "mlp.down_proj.weight": "down_proj.weight", "mlp.down_proj.bias": "down_proj.bias",
        }
        expected = {n for n, _ in self.named_parameters()}
        loaded: set[str] = set()
        fused_rows: dict[str, int] = {}  # fused parameter -> rows loaded so far
        for name, tensor in weights:
            if self._load_stored(name, tensor, fused, plain, loaded, fused_rows):
                continue
            if isinstance(tensor, QuantizedWeight):
                tensor = tensor.dequantize()  # not a linear weight (or one this layout cannot hold)
            if name.startswith("model.layers."):
                idx_str, suffix = name[len("model.layers."):].split(".", 1)
                layer = self.layers[int(idx_str)]
                if suffix in fused:
                    target, off, rows = fused[suffix]
                    param = _get(layer, target)
                    if param is None:
                        raise ValueError(f"Unexpected weight {name} for {cfg.architecture}.")
                    _copy(param[off:off + rows], tensor, name)
                    key = f"layers.{idx_str}.{target}"
                    fused_rows[key] = fused_rows.get(key, 0) + rows
                    if fused_rows[key] == param.shape[0]:
                        loaded.add(key)
                    continue
                if suffix in plain and _get(layer, plain[suffix]) is not None:
                    _copy(_get(layer, plain[suffix]), tensor, name)
                    loaded.add(f"layers.{idx_str}.{plain[suffix]}")
                    continue
                if suffix.endswith("rotary_emb.inv_freq"):
                    continue
                raise ValueError(f"Unexpected weight {name} for {cfg.architecture}.")
            elif name == "model.embed_tokens.weight":
                _copy(self.embed_tokens, tensor, name)
                loaded.add("embed_tokens")
            elif name == "model.norm.weight":
                _copy(self.norm, tensor, name)
                loaded.add("norm")
            elif name == "lm_head.weight":
                if not cfg.tie_word_embeddings:
                    _copy(self.lm_head.weight, tensor, name)
                    loaded.add("lm_head.weight")
            else:
                raise ValueError(f"Unexpected weight {name} for {cfg.architecture}.")
        missing = expected - loaded
        if missing:
            raise ValueError(f"Checkpoint is missing weights: {sorted(missing)[:8]}")

    def _load_stored(self, name: str, tensor: QuantizedWeight | torch.Tensor, fused: dict, plain: dict,
                     loaded: set[str], fused_rows: dict[str, int]) -> bool:
        """Keep a checkpoint tensor in its storage format where a kernel runs it as stored:
        quantized blocks (linear layers and the embedding) and, for a float32 model on CPU,
        float16/bfloat16 linear weights (widened exactly in registers). Returns False where the
        caller must copy it into the float parameter instead."""
        quantized = isinstance(tensor, QuantizedWeight)
        half = (not quantized and tensor.dtype in (torch.float16, torch.bfloat16) and tensor.dim() == 2
                and self.embed_tokens.dtype == torch.float32 and self.embed_tokens.device.type == "cpu")
        if not (quantized or half) or (quantized and tensor.shape[1] % 32):
            return False
        if name == "model.embed_tokens.weight":
            if tuple(tensor.shape) != tuple(self.embed_tokens.shape):
                raise ValueError(f"Weight {name} has shape {tuple(tensor.shape)}, expected {tuple(self.embed_tokens.shape)}.")
            if not quantized:  # the table is copied as float32; a tied head keeps the 16-bit rows
                if self.cfg.tie_word_embeddings:
                    self.lm_head.set_stored(0, tensor)
                return False
            self.embed_quant = tensor
            loaded.add("embed_tokens")
            return True
        if name == "lm_head.weight":
            if not self.cfg.tie_word_embeddings:
                self.lm_head.set_stored(0, tensor)
                loaded.add("lm_head.weight")
            return True
        if not name.startswith("model.layers."):
            return False
        idx_str, suffix = name[len("model.layers."):].split(".", 1)
        layer = self.layers[int(idx_str)]
        target, off = (fused[suffix][0], fused[suffix][1]) if suffix in fused else (plain.get(suffix), 0)
        if target is None or not target.endswith("_proj.weight"):
            return False
        lin = _get(layer, target.removesuffix(".weight"))
        lin.set_stored(off, tensor)
        key = f"layers.{idx_str}.{target}"
        fused_rows[key] = fused_rows.get(key, 0) + tensor.shape[0]
        if fused_rows[key] == lin.out_features:
            loaded.add(key)
        return True


def _get(module: nn.Module, dotted: str) -> torch.Tensor | None:
    obj = module
    for part in dotted.split("."):
        obj = getattr(obj, part)
        if obj is None:
            return None
    return obj


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"Weight {name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}.")
    dst.copy_(src)
