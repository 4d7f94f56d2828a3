"""quickdraft against llama.cpp on the GGUF formats people download, at 1B scale, batch 1.

The files (gguf_models.py): a Llama-3.2-1B-shaped model with random weights, quantized by
llama.cpp's own quantizer to Q4_0, Q4_K_M, Q5_K_M, Q6_K and Q8_0, and SmolLM2-135M requantized to
Q4_K_M. For each file and each context length (128 and 2048 tokens by default), both engines
prefill the same prompt tokens and then decode N tokens greedily; only the decode is timed:

* llama.cpp through its C API (llama-cpp-python's bindings): ``llama_decode`` of a one-token
  batch and a numpy argmax of ``llama_get_logits_ith(ctx, -1)``, so no Python sampler is counted;
* quickdraft's engine: ``LLMEngine.step()`` until the request has its N tokens (EOS ignored).

Runs alternate between the engines (the order flips every repeat); tables give medians, the
ratio to llama.cpp, the bytes each engine reads per decoded token (weights as each holds them,
plus the KV cache at that context: float32 for quickdraft, float16 for llama.cpp) and what share
of the machine's measured read bandwidth that makes.

    python benchmarks/gguf_formats.py [--formats Q4_0,Q4_K_M,Q5_K_M,Q6_K,Q8_0] [--contexts 128,2048]
                                      [--repeats 3] [--max-tokens 64] [--threads 2] [--no-smollm2]

Needs the bench extra (llama-cpp-python, built from source). The first run writes the files
(about 6 GB under ~/.cache/quickdraft/bench, a few minutes).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from gguf_models import llama_1b_f16, quantized, tensor_bytes  # noqa: E402
from vs_llamacpp import read_bandwidth, weight_bytes_per_token  # noqa: E402

from quickdraft import LLM, SamplingParams  # noqa: E402

FORMATS = ("Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")


_QUIET = None  # llama.cpp's log callback, kept alive while llama.cpp may call it


def quiet_llamacpp() -> None:
    """llama.cpp (loading, quantizing, contexts) logs to stderr line by line: silenced."""
    global _QUIET
    import llama_cpp as L

    if _QUIET is None:
        _QUIET = L.llama_log_callback(lambda level, text, user_data: None)
        L.llama_log_set(_QUIET, None)


class LlamaCpp:
    """One llama.cpp model and context, driven through the C API."""

    def __init__(self, path: Path, n_ctx: int, threads: int) -> None:
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, 512, 512
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))

    def _decode(self, tokens: list[int]) -> None:
        arr = (self.L.llama_token * len(tokens))(*tokens)
        rc = self.L.llama_decode(self.ctx, self.L.llama_batch_get_one(arr, len(tokens)))
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with {rc}")

    def _argmax(self) -> int:
        logits = self.L.llama_get_logits_ith(self.ctx, -1)
        return int(np.ctypeslib.as_array(ctypes.cast(logits, ctypes.POINTER(ctypes.c_float)),
                                         shape=(self.n_vocab,)).argmax())

    def clear(self) -> None:
        L = self.L
        if hasattr(L, "llama_memory_clear"):
            L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        else:
            L.llama_kv_self_clear(self.ctx)

    def decode_seconds(self, prompt: list[int], n: int) -> float:
        """Prefill ``prompt`` (untimed), then n greedy one-token steps: their seconds."""
        self.clear()
        for i in range(0, len(prompt), 512):
            self._decode(prompt[i:i + 512])
        token = self._argmax()
        t0 = time.perf_counter()
        for _ in range(n):
            self._decode([token])
            token = self._argmax()
        return time.perf_counter() - t0

    def close(self) -> None:
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def ours_decode_seconds(llm: LLM, prompt: list[int], n: int) -> float:
    """Prefill and the first token (untimed), then steps until n more tokens: their seconds."""
    engine = llm.engine
    rid = f"bench-{time.monotonic_ns()}"
    engine.add_request(rid, None, prompt, SamplingParams(temperature=0, max_tokens=n + 1, ignore_eos=True))
    seq = engine.requests[rid].seqs[0]
    while seq.num_output_tokens == 0:
        engine.step()
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - t0


def kv_bytes_per_token(llm: LLM, element_size: int) -> int:
    """Bytes of keys and values one cached position holds (all layers)."""
    cfg = llm.model_config
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * element_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--contexts", default="128,2048")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-smollm2", action="store_true", help="skip SmolLM2 requantized to Q4_K_M")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    N = args.max_tokens
    quiet_llamacpp()
    contexts = [int(c) for c in args.contexts.split(",")]
    files = {}
    if not args.no_smollm2:
        from quickdraft.models.default_model import default_model_path

        files["SmolLM2-135M Q4_K_M"] = quantized(default_model_path(), "Q4_K_M", args.threads, name="smollm2-135m")
    source = llama_1b_f16()
    for fmt in args.formats.split(","):
        files[f"1B {fmt}"] = quantized(source, fmt, args.threads)
    bw = read_bandwidth(args.threads)
    print(f"\n{args.threads} threads; read bandwidth measured here {bw / 1e9:.1f} GB/s (torch sum over 512 MiB, "
          f"best of 5). Decode of {N} tokens after a prompt, median of {args.repeats} alternating runs.\n")
    print("| file | MB | context | llama.cpp tok/s | quickdraft tok/s | ratio | MB read per token (llama.cpp / ours) "
          "| % of bandwidth (llama.cpp / ours) |")
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for label, path in files.items():
        llm = LLM(str(path), device="cpu", max_model_len=max(contexts) + N + 8)
        file_bytes = sum(tensor_bytes(path).values())  # every tensor is read once per token (tied head: the embedding)
        ours_weights = weight_bytes_per_token(llm)
        vocab = llm.model_config.vocab_size
        for n_ctx in contexts:
            prompt = rng.integers(10, vocab, size=max(1, n_ctx - N - 1)).tolist()
            peer = LlamaCpp(path, n_ctx + 16, args.threads)
            peer.decode_seconds(prompt[:32], 4)  # warm-up both
            ours_decode_seconds(llm, prompt[:32], 4)
            theirs, mine = [], []
            for rep in range(args.repeats):
                for who in (("peer", "ours") if rep % 2 == 0 else ("ours", "peer")):
                    if who == "peer":
                        theirs.append(N / peer.decode_seconds(prompt, N))
                    else:
                        mine.append(N / ours_decode_seconds(llm, prompt, N))
            peer.close()
            t, o = statistics.median(theirs), statistics.median(mine)
            ctx_mid = len(prompt) + N // 2
            b_t = file_bytes + ctx_mid * kv_bytes_per_token(llm, 2)
            b_o = ours_weights + ctx_mid * kv_bytes_per_token(llm, llm.engine.runner.kv_cache.element_size())
            print(f"| {label} | {path.stat().st_size / 1e6:.0f} | {n_ctx} | {t:.1f} | {o:.1f} | {o / t:.2f}x "
                  f"| {b_t / 1e6:.0f} / {b_o / 1e6:.0f} | {b_t * t / bw:.0%} / {b_o * o / bw:.0%} |", flush=True)
        del llm


if __name__ == "__main__":
    main()
