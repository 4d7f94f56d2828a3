"""Which integer-kernel path is fastest on this CPU, and do they all give the same tokens?

`LLM(model=gguf)` runs the file's blocks with the instruction-set variant `auto` picks
(`quickdraft.kernels.default_quant_isa()`: the first of `quant_isas()`). The rule is that no path
`auto` may pick is slower than another the CPU has, and that every path gives the same bits.
This benchmark checks both on the embedded SmolLM2 GGUF. Each run is a fresh process pinned to
one variant with QUICKDRAFT_QUANT_ISA. The variants alternate, and the order rotates every
repeat. Each run measures:

  * batch-1 decode: one chat prompt, N greedy tokens, EOS ignored;
  * batch-32 decode: 32 prompts x M greedy tokens together;
  * a 6-row step (a 5-token draft verified) against a 1-row step, one sequence at position 300.

The table gives medians and ratios against `auto`'s variant. "same tokens" compares every
generated token id with `auto`'s.

    python benchmarks/isa_paths.py [--repeats 3] [--new-tokens 128] [--batch-new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

TOPICS = ["the moon", "bread", "rivers", "chess", "volcanoes", "bees", "trains", "music"]


def child(new_tokens: int, batch_new_tokens: int) -> None:
    """One run on the variant of QUICKDRAFT_QUANT_ISA; prints a JSON line."""
    import hashlib

    from quickdraft import LLM, SamplingParams
    from quickdraft.kernels import default_quant_isa

    sys.path.insert(0, os.path.dirname(__file__))
    from vs_llamacpp import step_ratios

    llm = LLM(max_model_len=1024)
    chat = [{"role": "user", "content": "Tell me about the moon and repeat the key facts."}]
    convs = [[{"role": "user", "content": f"Tell me about {TOPICS[i % 8]} and repeat the key facts {i}."}]
             for i in range(32)]
    one = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    many = SamplingParams(temperature=0, max_tokens=batch_new_tokens, ignore_eos=True)
    llm.chat(chat, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    a = llm.chat(chat, one, use_tqdm=False)
    t1 = time.perf_counter()
    b = llm.chat(convs, many, use_tqdm=False)
    t2 = time.perf_counter()
    steps = step_ratios(llm, rows=(1, 6))
    tokens = [o.outputs[0].token_ids for o in a + b]
    print(json.dumps({
        "isa": default_quant_isa(),
        "kernel": llm.engine.runner.model.layers[0].qkv_proj.kernel,
        "b1_tok_s": new_tokens / (t1 - t0),
        "b32_tok_s": 32 * batch_new_tokens / (t2 - t1),
        "step6": steps[6] / steps[1],
        "tokens": hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:16],
    }))


def run(isa: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "QUICKDRAFT_QUANT_ISA": isa}
    out = subprocess.run([sys.executable, __file__, "--child", "--new-tokens", str(args.new_tokens),
                          "--batch-new-tokens", str(args.batch_new_tokens)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch-new-tokens", type=int, default=64)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.new_tokens, args.batch_new_tokens)
        return

    from quickdraft.kernels import cpu_flags, default_quant_isa, quant_isas

    isas, auto = quant_isas(), default_quant_isa()
    if not isas:
        sys.exit("no native integer kernels on this machine (no compiler, or no AVX2)")
    print("CPU flags of interest:", " ".join(sorted(x for x in cpu_flags() if x.startswith(("avx", "amx", "fma")))))
    print(f"variants: {isas}; auto picks {auto!r}\n")
    runs: dict[str, list[dict]] = {isa: [] for isa in isas}
    for rep in range(args.repeats):
        for isa in isas[rep % len(isas):] + isas[:rep % len(isas)]:
            runs[isa].append(run(isa, args))
    med = {isa: {k: statistics.median(r[k] for r in rs) for k in ("b1_tok_s", "b32_tok_s", "step6")}
           for isa, rs in runs.items()}
    ref = runs[auto][0]["tokens"]
    print("| variant | batch-1 tok/s | vs auto | batch-32 tok/s | vs auto | 6-row step / 1-row | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for isa in isas:
        m, same = med[isa], all(r["tokens"] == ref for r in runs[isa])
        name = f"{isa} (auto)" if isa == auto else isa
        print(f"| {name} | {m['b1_tok_s']:.1f} | {m['b1_tok_s'] / med[auto]['b1_tok_s']:.2f}x | "
              f"{m['b32_tok_s']:.1f} | {m['b32_tok_s'] / med[auto]['b32_tok_s']:.2f}x | {m['step6']:.2f}x | "
              f"{'yes' if same else 'NO'} |")
    print("\nruns (batch-1 / batch-32 tok/s):")
    for isa, rs in runs.items():
        print(f"  {isa}: " + ", ".join(f"{r['b1_tok_s']:.1f}/{r['b32_tok_s']:.1f}" for r in rs))
    faster = [isa for isa in isas if isa != auto and (med[isa]["b1_tok_s"] > 1.03 * med[auto]["b1_tok_s"]
                                                      or med[isa]["b32_tok_s"] > 1.03 * med[auto]["b32_tok_s"])]
    if faster:
        print(f"\nWARNING: {faster} beat auto's {auto!r} by more than 3% on this CPU.")


if __name__ == "__main__":
    main()
