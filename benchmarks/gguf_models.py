"""GGUF files for speed work, made on this machine: no weights are downloaded.

* ``llama_1b_f16``: a model in the shape of Llama-3.2-1B (hidden 2048, 16 layers, 32 query and 8
  KV heads of 64, FFN 8192, tied embedding, rope theta 500000) with random F16 weights (std
  0.02, norms 1) and SmolLM2's tokenizer (vocab 49152, copied from the embedded default model),
  written with gguf's ``GGUFWriter``. Random weights make acceptance meaningless: use such files
  for plain and batch speed only.
* ``quantized``: that file (or any GGUF) quantized by llama.cpp's own quantizer
  (``llama_model_quantize`` in llama-cpp-python) to the types people download.

Files are cached in ``$QUICKDRAFT_BENCH_CACHE`` (default ~/.cache/quickdraft/bench), outside the
repository, and made again only when missing.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import numpy as np

LLAMA_1B = dict(hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, ffn=8192, rope_theta=500000.0,
                context=8192)
# llama.cpp's file types (enum llama_ftype) by the names people know them by.
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}


def cache_dir() -> Path:
    path = Path(os.environ.get("QUICKDRAFT_BENCH_CACHE", Path.home() / ".cache" / "quickdraft" / "bench"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _tokenizer_fields(source: Path) -> dict:
    """SmolLM2's tokenizer, as GGUFWriter arguments."""
    from gguf import GGUFReader

    fields = GGUFReader(str(source)).fields

    def get(name):
        return fields[name].contents() if name in fields else None

    return dict(model=get("tokenizer.ggml.model"), pre=get("tokenizer.ggml.pre"), tokens=get("tokenizer.ggml.tokens"),
                types=get("tokenizer.ggml.token_type"), merges=get("tokenizer.ggml.merges"),
                bos=get("tokenizer.ggml.bos_token_id"), eos=get("tokenizer.ggml.eos_token_id"),
                unk=get("tokenizer.ggml.unknown_token_id"), template=get("tokenizer.chat_template"))


def llama_1b_f16(seed: int = 0) -> Path:
    """The Llama-3.2-1B-shaped F16 GGUF (about 2.1 GB), written once."""
    import gguf

    from quickdraft.models.default_model import default_model_path

    path = cache_dir() / "llama-1b-shape-random-f16.gguf"
    if path.exists():
        return path
    c = LLAMA_1B
    tok = _tokenizer_fields(default_model_path())
    vocab = len(tok["tokens"])
    t0 = time.perf_counter()
    w = gguf.GGUFWriter(str(path) + ".part", "llama")
    w.add_name("llama-1b-shape-random")
    w.add_context_length(c["context"])
    w.add_embedding_length(c["hidden"])
    w.add_block_count(c["layers"])
    w.add_feed_forward_length(c["ffn"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_rope_dimension_count(c["head_dim"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(1)  # mostly F16
    w.add_tokenizer_model(tok["model"])
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(tok["bos"])
    w.add_eos_token_id(tok["eos"])
    if tok["unk"] is not None:
        w.add_unk_token_id(tok["unk"])
    if tok["template"]:
        w.add_chat_template(tok["template"])
    rng = np.random.default_rng(seed)
    H, F, KV = c["hidden"], c["ffn"], c["kv_heads"] * c["head_dim"]

    def weight(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    w.add_tensor("token_embd.weight", weight(vocab, H))
    for i in range(c["layers"]):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", np.ones(H, dtype=np.float32))
        w.add_tensor(b + "attn_q.weight", weight(H, H))
        w.add_tensor(b + "attn_k.weight", weight(KV, H))
        w.add_tensor(b + "attn_v.weight", weight(KV, H))
        w.add_tensor(b + "attn_output.weight", weight(H, H))
        w.add_tensor(b + "ffn_norm.weight", np.ones(H, dtype=np.float32))
        w.add_tensor(b + "ffn_gate.weight", weight(F, H))
        w.add_tensor(b + "ffn_up.weight", weight(F, H))
        w.add_tensor(b + "ffn_down.weight", weight(H, F))
    w.add_tensor("output_norm.weight", np.ones(H, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(str(path) + ".part", path)
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s")
    return path


def quantized(source: Path, ftype: str, threads: int, name: str | None = None) -> Path:
    """``source`` quantized to ``ftype`` (a FTYPES key) by llama.cpp's quantizer, written once."""
    import llama_cpp

    path = cache_dir() / f"{name or source.stem.removesuffix('-f16')}-{ftype}.gguf"
    if path.exists():
        return path
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = threads
    params.allow_requantize = True  # SmolLM2's file is Q4_1 already
    t0 = time.perf_counter()
    part = str(path) + ".part"
    rc = llama_cpp.llama_model_quantize(str(source).encode(), part.encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({source.name} -> {ftype}) failed with {rc}")
    os.replace(part, path)
    print(f"quantized {source.name} to {ftype}: {path.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - t0:.0f} s")
    return path


def tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes of each tensor as stored in the file."""
    from gguf import GGUFReader

    return {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
