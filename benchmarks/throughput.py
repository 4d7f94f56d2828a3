"""Decode throughput of quickdraft vs transformers on the same SmolLM2 weights, in one process.

Batch-1: one chat prompt, N new tokens (greedy, EOS ignored). Batch-32: 32 different prompts
generated together (transformers: its padded batch `generate`). Runs alternate between engines
and the table reports medians and ratios; this machine is shared, so ratios matter, not
absolutes. transformers is measured in float32 and bfloat16 and its faster one is the peer.

Also reported: the memory roofline of batch-1 decode (weight bytes read per step / DRAM read
bandwidth measured in this run: best of 18 streaming reads of a 1 GiB buffer), the GGUF load
time, and the peak resident memory of a process that loads quickdraft alone and runs both
workloads, against weights + KV-cache budget.

    python benchmarks/throughput.py [--repeats 3] [--new-tokens 128] [--batch-new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from quickdraft import LLM, SamplingParams

TOPICS = ["the moon", "bread", "rivers", "chess", "volcanoes", "bees", "trains", "music", "glaciers", "paper",
          "bicycles", "tea", "owls", "bridges", "clouds", "maps", "salt", "kites", "coral", "lighthouses",
          "clocks", "deserts", "whales", "libraries", "copper", "tomatoes", "satellites", "wool", "gardens",
          "rain", "mushrooms", "the alphabet"]


def load_transformers(gguf_path, dtype: torch.dtype):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    return model.to(dtype).eval()


def hf_generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> int:
    """Padded (left) batch greedy generate; returns the number of generated tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=pad_id)
    return (out.shape[1] - width) * len(prompts)


def weight_bytes(llm: LLM) -> tuple[int, int]:
    """(bytes held for the weights, bytes read by one decode step): parameters plus the native
    kernels' packed matrices; a step reads everything but the embedding table and rotary tables."""
    model = llm.engine.runner.model
    held = read = 0
    for name, p in model.named_parameters():
        n = p.numel() * p.element_size()
        held += n
        read += 0 if name == "embed_tokens" or (name == "lm_head.weight" and model.cfg.tie_word_embeddings) else n
    for module in model.modules():
        native = getattr(module, "native", None)
        packed = native.packed if native is not None else getattr(module, "packed", None)
        if packed is not None:
            n = packed.numel() * packed.element_size()
            held, read = held + n, read + n
    if model.cfg.tie_word_embeddings and model.embed_tokens.numel() and model.lm_head.native is None \
            and model.lm_head.packed is None:
        read += model.embed_tokens.numel() * model.embed_tokens.element_size()  # F.linear on the tied table
    return held, read


def dram_read_bandwidth(repeats: int = 9) -> float:
    """Bytes/s of a streaming read of a 1 GiB float32 buffer on torch's threads: the best of
    ``repeats`` runs, since on a shared machine slow runs measure the neighbours, not the memory."""
    buf = torch.ones(256 * 1024 * 1024)
    buf.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best


def memory_child(new_tokens: int, batch_new_tokens: int) -> None:
    """Run in a fresh process: load, run batch-1 and batch-32, print peak RSS and budgets."""
    llm = LLM()
    held, _ = weight_bytes(llm)
    tok = llm.get_tokenizer()
    chat = lambda q: tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True)
    for prompts, n in (([chat("Write a short story about a robot who learns to paint.")], new_tokens),
                       ([chat(f"Tell me three facts about {t}.") for t in TOPICS], batch_new_tokens)):
        llm.generate([{"prompt_token_ids": p} for p in prompts],
                     SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    cfg = llm.config
    from quickdraft.engine.model_runner import ModelRunner
    kv = cfg.num_kv_blocks * ModelRunner.kv_bytes_per_block(llm.model_config, cfg.block_size, cfg.dtype)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"peak_rss": peak, "weights": held, "kv_budget": kv, "load_s": llm.load_seconds}))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def timed(fn) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn()
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.new_tokens, args.batch_new_tokens)
        return
    child = [sys.executable, __file__, "--memory-child", "--new-tokens", str(args.new_tokens),
             "--batch-new-tokens", str(args.batch_new_tokens)] + (["--threads", str(args.threads)] if args.threads else [])
    mem = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])

    t0 = time.perf_counter()
    llm = LLM()
    load_s = time.perf_counter() - t0
    ours_engines = {f"quickdraft {_dtype_name(llm.config.dtype)} (auto)": llm}
    other = torch.bfloat16 if llm.config.dtype == torch.float32 else torch.float32
    ours_engines[f"quickdraft {_dtype_name(other)}"] = LLM(dtype=_dtype_name(other))
    tok = llm.get_tokenizer()
    chat = lambda q: tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True)
    single = chat("Write a short story about a robot who learns to paint.")
    batch = [chat(f"Tell me three facts about {t}.") for t in TOPICS]
    pad_id = tok.eos_token_id if tok.eos_token_id is not None else 0

    def ours(engine: LLM, prompts: list[list[int]], n: int) -> int:
        outs = engine.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    peers = {name: load_transformers(llm.model_path, dt) for name, dt in
             (("transformers fp32", torch.float32), ("transformers bf16", torch.bfloat16))}
    engines = {**ours_engines, **peers}
    results: dict[str, dict[str, list[float]]] = {name: {"b1": [], "b32": []} for name in engines}
    bandwidth_before = dram_read_bandwidth()
    # Warm up once each, then alternate engines run by run.
    for engine in ours_engines.values():
        ours(engine, [single], 8)
    for m in peers.values():
        hf_generate(m, [single], 8, pad_id)
    for _ in range(args.repeats):
        for name, model in engines.items():
            if isinstance(model, LLM):
                s, n = timed(lambda: ours(model, [single], args.new_tokens))
                results[name]["b1"].append(n / s)
                s, n = timed(lambda: ours(model, batch, args.batch_new_tokens))
                results[name]["b32"].append(n / s)
            else:
                s, n = timed(lambda: hf_generate(model, [single], args.new_tokens, pad_id))
                results[name]["b1"].append(n / s)
                s, n = timed(lambda: hf_generate(model, batch, args.batch_new_tokens, pad_id))
                results[name]["b32"].append(n / s)

    bandwidth = max(bandwidth_before, dram_read_bandwidth())
    _, step_bytes = weight_bytes(llm)
    med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}
    peer_b1 = max(med[p]["b1"] for p in peers)
    peer_b32 = max(med[p]["b32"] for p in peers)
    print(f"\nSmolLM2-135M-Instruct (GGUF Q4_1 dequantized), {torch.get_num_threads()} threads, "
          f"medians of {args.repeats} alternating runs; quickdraft load {load_s:.2f} s")
    print(f"{'engine':<28} {'batch-1 tok/s':>14} {'batch-32 tok/s':>15}")
    for name in engines:
        print(f"{name:<28} {med[name]['b1']:>14.1f} {med[name]['b32']:>15.1f}")
    for name in ours_engines:
        print(f"{name + ' / best peer':<40} batch-1 {med[name]['b1'] / peer_b1:.2f}x   "
              f"batch-32 {med[name]['b32'] / peer_b32:.2f}x")
    auto = next(iter(ours_engines))
    roof = bandwidth / step_bytes
    print(f"memory roofline, batch-1 {auto}: {step_bytes / 2**20:.0f} MiB of weights per step / "
          f"{bandwidth / 1e9:.1f} GB/s read bandwidth = {roof:.1f} tok/s; measured {med[auto]['b1']:.1f} tok/s "
          f"= {100 * med[auto]['b1'] / roof:.0f}% of the roofline")
    budget = mem["weights"] + mem["kv_budget"] + 300 * 2**20
    print(f"peak RSS (quickdraft alone, both workloads): {mem['peak_rss'] / 2**20:.0f} MiB; weights "
          f"{mem['weights'] / 2**20:.0f} MiB + KV budget {mem['kv_budget'] / 2**20:.0f} MiB + 300 MiB = "
          f"{budget / 2**20:.0f} MiB ({'within' if mem['peak_rss'] <= budget else 'OVER'}); "
          f"load {mem['load_s']:.2f} s")


if __name__ == "__main__":
    main()
