"""quickdraft against llama.cpp (llama-cpp-python) on the same GGUF file, side by side in one process.

Both engines run the embedded SmolLM2-135M-Instruct Q4_1 GGUF with the same thread count, greedy,
on the same prompt tokens (the four categories of spec_decode.py, chat template applied):

  * quickdraft plain (the default: the file's blocks as stored, integer kernels), and with ngram
    prompt lookup k = 3, 5, 8; quickdraft with the weights dequantized to float32 (quantization=None,
    the previous default) for reference;
  * llama.cpp plain, and with its prompt lookup (LlamaPromptLookupDecoding, 2 and 10 tokens).

The two engines' texts differ (different arithmetic), so the first table compares tokens/s over
the same number of tokens (N generated tokens, EOS ignored: llama.cpp's token generator, our
ignore_eos), and the second end to end to EOS (or N), prefill included. Runs alternate between
engines and the order rotates every repeat; the tables give medians and ratios against
llama.cpp plain. Then: throughput at batch 32 (ours; transformers' padded batch of 32 for
reference unless --no-transformers), the cost of verification steps (k + 1 rows) relative to one
decode step, and the bytes a decode step reads against the machine's measured read bandwidth
(the roofline). Peak RSS and load time are measured in fresh subprocesses.
Every speculative output of ours is checked token-identical to plain decoding.

    python benchmarks/vs_llamacpp.py [--repeats 3] [--max-tokens 128] [--threads 2]

Needs the bench extra: pip install -e ".[bench]" (builds llama.cpp from source, once).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from prompts import CATEGORIES  # noqa: E402

from quickdraft import LLM, SamplingParams  # noqa: E402
from quickdraft.engine.model_runner import SeqInput  # noqa: E402

KS = (3, 5, 8)
LOOKUPS = (2, 10)


def load_llamacpp(path: Path, threads: int, lookup: int | None):
    try:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError:
        sys.exit("llama-cpp-python is not installed: pip install -e '.[bench]' (builds llama.cpp from source)")
    draft = LlamaPromptLookupDecoding(num_pred_tokens=lookup) if lookup else None
    return Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=2048, n_batch=512,
                 verbose=False, draft_model=draft)


def llamacpp_fixed(llm, ids: list[int], n: int) -> float:
    """Seconds for N greedy tokens from the prompt (EOS not special: the low-level generator)."""
    llm.reset()
    t0 = time.perf_counter()
    count = 0
    for _ in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        count += 1
        if count == n:
            break
    return time.perf_counter() - t0


def llamacpp_to_eos(llm, ids: list[int], n: int) -> tuple[float, int]:
    llm.reset()
    t0 = time.perf_counter()
    out = llm.create_completion(ids, max_tokens=n, temperature=0.0, top_k=1, repeat_penalty=1.0)
    return time.perf_counter() - t0, out["usage"]["completion_tokens"]


def ours(llm: LLM, ids: list[int], params: SamplingParams):
    t0 = time.perf_counter()
    out = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
    return time.perf_counter() - t0, out


def read_bandwidth(threads: int) -> float:
    """Bytes/s of a streaming read (sum over 512 MiB), best of 5."""
    a = torch.ones(128 * 2**20, dtype=torch.float32)
    torch.set_num_threads(threads)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return a.numel() * 4 / best


def weight_bytes_per_token(llm: LLM) -> int:
    """Bytes of weights a decode step reads: every linear once (the LM head included)."""
    model = llm.engine.runner.model
    total = 0
    for lin in [*model._linears(), model.lm_head]:
        parts = lin.native_parts.parts if lin.native_parts is not None else [lin.native_q or lin.native]
        if parts[0] is None:
            total += lin.weight.numel() * lin.weight.element_size()
        else:
            total += sum(p.packed.numel() * p.packed.element_size() for p in parts)
    return total


def step_ratios(llm: LLM, rows=(1, 2, 4, 6, 9), repeats: int = 40) -> dict[int, float]:
    """Median seconds of a step computing `rows` tokens of one sequence at position ~300."""
    runner, bm = llm.engine.runner, llm.engine.block_manager
    ids = [(i * 37) % 4000 + 10 for i in range(320)]
    table = bm.grow_to(10**9, 320)
    runner.execute([SeqInput(ids[:300], 0, table, 300)])
    out = {}
    for _ in range(2):  # warm, then measure with the rows interleaved
        times = {r: [] for r in rows}
        for _ in range(repeats):
            for r in rows:
                t0 = time.perf_counter()
                runner.execute([SeqInput(ids[300:300 + r], 300, table, 0)])
                times[r].append(time.perf_counter() - t0)
        out = {r: statistics.median(t) for r, t in times.items()}
    bm.free(10**9)
    return out


def subprocess_load(quantization: str | None) -> dict:
    code = ("import json, resource, time; from quickdraft import LLM; "
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; "
            f"llm = LLM(quantization={quantization!r}, max_model_len=2048, kv_cache_memory='128MiB'); "
            "print(json.dumps({'load_s': llm.load_seconds, 'base_mb': base, "
            "'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--no-transformers", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    N = args.max_tokens

    base = LLM(device="cpu")
    print(f"quickdraft default: quantization={base.config.quantization}, "
          f"kernels {base.engine.runner.model.layers[0].qkv_proj.kernel} (layers), "
          f"{base.engine.runner.model.lm_head.kernel} (LM head); {args.threads} threads")
    engines: dict[str, LLM] = {"quickdraft plain": base}
    for k in KS:
        engines[f"quickdraft ngram k={k}"] = LLM(device="cpu", speculative_config={
            "method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 2, "prompt_lookup_max": 5})
    engines["quickdraft float32 (quantization=None)"] = LLM(device="cpu", quantization=None)
    path = base.model_path
    peers = {"llama.cpp plain": load_llamacpp(path, args.threads, None)}
    for n in LOOKUPS:
        peers[f"llama.cpp prompt lookup {n}"] = load_llamacpp(path, args.threads, n)
    tok = base.get_tokenizer()
    prompts = {c: tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True)
               for c, p in CATEGORIES.items()}
    fixed_params = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)
    eos_params = SamplingParams(temperature=0, max_tokens=N)
    names = [*engines, *peers]
    fixed = {(n, c): [] for n in names for c in prompts}
    to_eos = {(n, c): [] for n in names for c in prompts}
    plain_out: dict[str, list[int]] = {}
    mismatches = []
    for c, ids in prompts.items():  # warm-up
        for llm in engines.values():
            ours(llm, ids, fixed_params)
        for peer in peers.values():
            llamacpp_fixed(peer, ids, 8)
    for rep in range(args.repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for c, ids in prompts.items():
            for name in order:
                if name in engines:
                    dt, out = ours(engines[name], ids, fixed_params)
                    fixed[name, c].append(N / dt)
                    dt, out = ours(engines[name], ids, eos_params)
                    to_eos[name, c].append(len(out.outputs[0].token_ids) / dt)
                    toks = out.outputs[0].token_ids
                    if name == "quickdraft plain":
                        plain_out[c] = toks
                    elif "ngram" in name and c in plain_out and toks != plain_out[c]:
                        mismatches.append((name, c))
                else:
                    fixed[name, c].append(N / llamacpp_fixed(peers[name], ids, N))
                    dt, n = llamacpp_to_eos(peers[name], ids, N)
                    to_eos[name, c].append(n / dt)

    def table(title: str, data: dict) -> None:
        print(f"\n{title}")
        cats = list(prompts)
        print("| engine | " + " | ".join(cats) + " |")
        print("|---|" + "---|" * len(cats))
        ref = {c: statistics.median(data["llama.cpp plain", c]) for c in cats}
        for name in names:
            cells = []
            for c in cats:
                v = statistics.median(data[name, c])
                cells.append(f"{v:.0f} tok/s ({v / ref[c]:.2f}x)")
            print(f"| {name} | " + " | ".join(cells) + " |")

    table(f"Tokens/s over {N} generated tokens (EOS ignored), median of {args.repeats}; "
          f"ratio to llama.cpp plain", fixed)
    table(f"End to end to EOS (at most {N} tokens), prefill included, median of {args.repeats}; "
          f"ratio to llama.cpp plain", to_eos)
    print("\nSpeculative outputs identical to plain decoding:", "yes" if not mismatches else f"NO: {mismatches}")

    # Batch throughput.
    batch_prompts = [prompts[c] + tok.encode(f" ({i})", add_special_tokens=False)
                     for i, c in zip(range(args.batch), list(prompts) * args.batch)]
    print(f"\nBatch of {args.batch} prompts x {N} tokens (EOS ignored), total tokens/s (median of 3):")
    for name in ("quickdraft plain", "quickdraft float32 (quantization=None)"):
        llm = engines[name]
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            llm.generate([{"prompt_token_ids": p} for p in batch_prompts], fixed_params, use_tqdm=False)
            times.append(time.perf_counter() - t0)
        print(f"  {name}: {args.batch * N / statistics.median(times):.0f} tok/s")
    if not args.no_transformers:
        import transformers

        for dtype in (torch.float32, torch.bfloat16):
            hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                   dtype=torch.float32).to(dtype).eval()
            width = max(len(p) for p in batch_prompts)
            x = torch.tensor([[2] * (width - len(p)) + p for p in batch_prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch_prompts])
            with torch.inference_mode():
                t0 = time.perf_counter()
                hf.generate(x, attention_mask=mask, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                            pad_token_id=2)
                dt = time.perf_counter() - t0
            print(f"  transformers {str(dtype).removeprefix('torch.')} (padded batch, one run): "
                  f"{args.batch * N / dt:.0f} tok/s")
            del hf

    # Verification cost and roofline.
    print("\nStep cost by rows computed (one sequence at position 300), relative to a one-row step:")
    for name in ("quickdraft plain", "quickdraft float32 (quantization=None)"):
        r = step_ratios(engines[name])
        print(f"  {name}: " + ", ".join(f"{k} rows {v * 1e3:.2f} ms ({v / r[1]:.2f}x)" for k, v in r.items()))
    bw = read_bandwidth(args.threads)
    print(f"\nRoofline (streaming read bandwidth measured here: {bw / 1e9:.1f} GB/s):")
    for name in ("quickdraft plain", "quickdraft float32 (quantization=None)"):
        nbytes = weight_bytes_per_token(engines[name])
        step = step_ratios(engines[name], rows=(1,))[1]
        print(f"  {name}: {nbytes / 1e6:.0f} MB of weights per token; bound {bw / nbytes:.0f} tok/s; "
              f"one-row step {step * 1e3:.2f} ms = {1 / step:.0f} tok/s ({nbytes / step / bw:.0%} of the bandwidth)")
    print(f"  file size {path.stat().st_size / 1e6:.0f} MB")

    print("\nLoad (fresh process, max_model_len 2048, KV cache 128 MiB):")
    for q in ("auto", None):
        r = subprocess_load(q)
        print(f"  quantization={q!r}: load {r['load_s']:.2f} s, peak RSS {r['rss_mb']:.0f} MB "
              f"({r['rss_mb'] - r['base_mb']:.0f} MB above the process after importing quickdraft and torch)")


if __name__ == "__main__":
    main()
