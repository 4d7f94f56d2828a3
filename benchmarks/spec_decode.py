"""Speculative decoding speed-up on SmolLM2, per prompt category, side by side in one process.

For each category (code editing, summarisation, table extraction, open-ended chat) it measures
greedy generation of N tokens: quickdraft without speculation, with ngram prompt lookup for
k = 3, 5, 8, with suffix decoding (k = 16, vLLM's defaults otherwise), and transformers without
and with its prompt lookup decoding. Runs alternate (the
order rotates every repeat) and the table reports medians; speed-ups are ratios against the
same engine without speculation. Times are end to end, prefill included; a second table gives
the decode phase alone (after the first token), the part speculation speeds up, and a third
the tokens each target forward pass produced: the speed-up if verifying k + 1 tokens cost what
one token costs. Tokens per pass divided by the decode-phase speed-up is what a pass costs on
average relative to a plain step on this machine. It also checks that every speculative output
equals the plain one token for token.

Then it runs cross_request.py: workloads whose text repeats across requests (JSON extraction
over many records, similar refactorings, an agent loop), plain vs ngram vs suffix decoding.

    python benchmarks/spec_decode.py [--repeats 5] [--max-tokens 128] [--no-cross-request]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import cross_request  # noqa: E402
from prompts import CATEGORIES  # noqa: E402

from quickdraft import LLM, SamplingParams  # noqa: E402
from quickdraft.spec_decode.suffix import SuffixCache  # noqa: E402

KS = (3, 5, 8)


def forget_earlier_outputs(llm: LLM) -> None:
    """A fresh global trie for a suffix-decoding engine: this benchmark repeats the same prompt,
    whose earlier answers would otherwise draft the next run's answer whole."""
    c = llm.engine.proposer.cache
    llm.engine.proposer.cache = SuffixCache(c.max_tree_depth, c.max_cached_requests, c.max_spec_factor,
                                            c.min_token_prob)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda (transformers runs on the same device)")
    ap.add_argument("--hf-lookup-tokens", type=int, default=5, help="transformers prompt_lookup_num_tokens")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--categories", nargs="*", default=list(CATEGORIES), choices=list(CATEGORIES))
    ap.add_argument("--no-cross-request", action="store_true", help="skip the cross-request workloads")
    args = ap.parse_args()

    base = LLM(dtype=args.dtype, device=args.device)
    dtype = base.config.dtype
    engines: dict[str, LLM] = {"off": base}
    for k in KS:
        engines[f"ngram k={k}"] = LLM(dtype=args.dtype, device=args.device, speculative_config={
            "method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 2, "prompt_lookup_max": 5})
    engines["suffix"] = LLM(dtype=args.dtype, device=args.device, speculative_config={
        "method": "suffix", "num_speculative_tokens": 16})
    tok = base.get_tokenizer()
    prompts = {c: tok.apply_chat_template([{"role": "user", "content": CATEGORIES[c]}], tokenize=True)
               for c in args.categories}
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)

    hf = None
    if not args.no_transformers:
        import transformers

        path = base.model_path
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                               dtype=torch.float32).to(base.config.device, dtype).eval()

    def run_ours(llm: LLM, ids: list[int]):
        if llm.speculative_config is not None and llm.speculative_config.method == "suffix":
            forget_earlier_outputs(llm)  # every run starts cold, as the other engines' drafts do
        t0 = time.perf_counter()
        out = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
        return time.perf_counter() - t0, out

    def run_hf(ids: list[int], lookup: bool):
        x = torch.tensor([ids], device=base.config.device)
        kw = dict(prompt_lookup_num_tokens=args.hf_lookup_tokens) if lookup else {}
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.max_tokens, do_sample=False, **kw)
        return time.perf_counter() - t0, out[0, len(ids):].tolist()

    rows = []
    for cat, ids in prompts.items():
        times: dict[str, list[float]] = {}
        decode: dict[str, list[float]] = {}  # after the first token: the phase speculation speeds up
        outs: dict[str, object] = {}
        for name, llm in engines.items():  # warm-up, and the outputs to compare
            _, outs[name] = run_ours(llm, ids)
        runs = [(name, llm, None) for name, llm in engines.items()]
        if hf is not None:
            runs += [("hf off", None, False), ("hf lookup", None, True)]
        for rep in range(args.repeats):
            # Rotate the order every repeat so that no engine always runs first or after another.
            for name, llm, lookup in runs[rep % len(runs):] + runs[:rep % len(runs)]:
                if llm is not None:
                    dt, out = run_ours(llm, ids)
                    n_out, m = len(out.outputs[0].token_ids), out.metrics
                    times.setdefault(name, []).append(n_out / dt)
                    decode.setdefault(name, []).append((n_out - 1) / (m.last_token_time - m.first_token_time))
                else:
                    dt, toks = run_hf(ids, lookup)
                    times.setdefault(name, []).append(len(toks) / dt)
        med = {n: statistics.median(v) for n, v in times.items()}
        ref = outs["off"].outputs[0].token_ids
        identical = all(outs[n].outputs[0].token_ids == ref for n in engines)
        spec = {n: outs[n].metrics for n in engines if n != "off"}
        rows.append((cat, med, spec, identical, len(ref), {n: statistics.median(v) for n, v in decode.items()}))

    print(f"\nSmolLM2-135M-Instruct, {str(dtype).replace('torch.', '')} (quantization={base.config.quantization}), "
          f"greedy, max {args.max_tokens} tokens, {torch.get_num_threads()} threads, medians of {args.repeats} "
          f"alternating runs")
    head = f"{'category':<17} {'off tok/s':>9}"
    for k in KS:
        head += f" {'k=' + str(k):>14}"
    head += f" {'suffix':>14} {'hf off':>8} {'hf lookup':>15}  {'acc.rate/len (k=5)':>19} {'suffix':>10} same"
    print(head)
    for cat, med, spec, identical, n, _ in rows:
        line = f"{cat:<17} {med['off']:>9.1f}"
        for k in KS:
            line += f" {med[f'ngram k={k}']:>7.1f} ({med[f'ngram k={k}'] / med['off']:.2f}x)"
        line += f" {med['suffix']:>7.1f} ({med['suffix'] / med['off']:.2f}x)"
        if "hf off" in med:
            line += f" {med['hf off']:>8.1f} {med['hf lookup']:>7.1f} ({med['hf lookup'] / med['hf off']:.2f}x)"
        accs = []
        for name in ("ngram k=5", "suffix"):
            m = spec[name]
            rate = f"{m.acceptance_rate:.2f}" if m.acceptance_rate is not None else "-"
            mlen = f"{m.mean_acceptance_length:.2f}" if m.mean_acceptance_length is not None else "-"
            accs.append(f"{rate}/{mlen}")
        line += f"  {accs[0]:>19} {accs[1]:>10} {'yes' if identical else 'NO'}"
        print(line)
    print("\nDecode phase only (tokens after the first / time after the first token; the prefill, identical "
          "in every mode, excluded):")
    print(f"{'category':<17} {'off tok/s':>9}" + "".join(f" {'k=' + str(k):>14}" for k in KS) + f" {'tokens':>7}")
    for cat, _, _, _, n, dec in rows:
        line = f"{cat:<17} {dec['off']:>9.1f}"
        for k in KS:
            line += f" {dec[f'ngram k={k}']:>7.1f} ({dec[f'ngram k={k}'] / dec['off']:.2f}x)"
        print(line + f" {n:>7}")
    print("\nTokens per target forward pass after the first token (the decode-phase speed-up if a "
          "verification pass cost what a plain step costs), and what a pass cost on average relative to a plain step:")
    print(f"{'category':<17}" + "".join(f" {'k=' + str(k):>18}" for k in KS))
    for cat, _, spec, _, n, dec in rows:
        line = f"{cat:<17}"
        for k in KS:
            m = spec[f"ngram k={k}"]
            # Every pass emits one token of its own plus the drafts it accepted.
            per_pass = (n - 1) / max(n - 1 - m.num_accepted_tokens, 1)
            cost = per_pass / (dec[f"ngram k={k}"] / dec["off"])
            line += f" {per_pass:>6.2f} (cost {cost:.2f})"
        print(line)


    if not args.no_cross_request:
        print()
        cross_request.main(["--repeats", str(min(args.repeats, 3)), "--max-tokens", str(args.max_tokens)])


if __name__ == "__main__":
    main()
