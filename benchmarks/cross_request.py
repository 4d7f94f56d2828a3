"""Cross-request repetition on SmolLM2: plain decoding vs ngram vs suffix decoding, at batch 1
(requests one after another) and with 8 requests at a time, on the workloads of workloads.py.

Every (workload, mode, method, repeat) runs on a fresh engine, so that neither suffix
decoding's global trie nor the prefix cache carries anything over from an earlier run; methods
alternate within a repeat (the order rotates) and the table reports medians of tokens per
second, end to end. Acceptance rate and mean acceptance length come from the engine's counters;
every output is checked token for token against plain decoding.

    python benchmarks/cross_request.py [--repeats 3] [--max-tokens 128]
    (also run at the end of benchmarks/spec_decode.py)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from workloads import agent_start, agent_step, json_extraction, refactoring  # noqa: E402

from quickdraft import LLM, SamplingParams  # noqa: E402

METHODS = {
    "plain": None,
    "ngram": {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2, "prompt_lookup_max": 5},
    "suffix": {"method": "suffix", "num_speculative_tokens": 16},
}
AGENT_CONVS, AGENT_STEPS = 8, 5


def run_workload(llm: LLM, workload: str, batch: int, params: SamplingParams) -> list[list[int]]:
    """The workload's outputs (token ids, in order), ``batch`` requests at a time."""
    if workload == "agent loop":
        convs = [agent_start(i) for i in range(AGENT_CONVS)]
        outs: list[list[int]] = []
        for step in range(AGENT_STEPS):
            # batch 1: conversations advance one after another; else `batch` of them in lockstep
            answers = []
            for i in range(0, len(convs), batch):
                answers += [o.outputs[0] for o in llm.chat(convs[i:i + batch], params, use_tqdm=False)]
            outs += [a.token_ids for a in answers]
            convs = [agent_step(c, a.text, step) for c, a in zip(convs, answers)]
        return outs
    convs = json_extraction() if workload == "JSON extraction" else refactoring()
    outs = []
    for i in range(0, len(convs), batch):
        outs += [o.outputs[0].token_ids for o in llm.chat(convs[i:i + batch], params, use_tqdm=False)]
    return outs


def spec_counts(llm: LLM) -> tuple[float | None, float | None, dict[str, list[int]]]:
    s = llm.engine.spec_stats
    if s is None:
        return None, None, {}
    return s.acceptance_rate, s.mean_acceptance_length, dict(s.by_source)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--workloads", nargs="*", default=["JSON extraction", "refactoring", "agent loop"])
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    args = ap.parse_args(argv)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    results = []
    for workload in args.workloads:
        for batch in args.batches:
            speed: dict[str, list[float]] = {m: [] for m in METHODS}
            stats: dict[str, tuple] = {}
            same = True
            update_share: list[float] = []
            for rep in range(args.repeats):
                order = list(METHODS)[rep % len(METHODS):] + list(METHODS)[:rep % len(METHODS)]
                outputs = {}
                for method in order:
                    llm = LLM(speculative_config=METHODS[method], max_num_seqs=batch)
                    t0 = time.perf_counter()
                    outputs[method] = run_workload(llm, workload, batch, params)
                    dt = time.perf_counter() - t0
                    speed[method].append(sum(map(len, outputs[method])) / dt)
                    stats[method] = spec_counts(llm)
                    if method == "suffix":
                        update_share.append(llm.engine.proposer.seconds / dt)
                    del llm
                same &= all(outs == outputs["plain"] for outs in outputs.values())
            med = {m: statistics.median(v) for m, v in speed.items()}
            results.append((workload, batch, med, stats, same, statistics.median(update_share)))
            print(f"  {workload}, batch {batch}: " + ", ".join(f"{m} {v:.1f} tok/s" for m, v in med.items()),
                  flush=True)

    print(f"\nCross-request workloads, SmolLM2-135M-Instruct (default path), greedy, max {args.max_tokens} tokens, "
          f"{torch.get_num_threads()} threads, medians of {args.repeats} runs on fresh engines; ngram k=5 (2-5), "
          f"suffix k=16 (vLLM's defaults otherwise)")
    print(f"{'workload':<16} {'batch':>5} {'plain tok/s':>11} {'ngram':>15} {'suffix':>15} {'suffix/ngram':>12} "
          f"{'ngram acc/len':>14} {'suffix acc/len':>15} {'suffix drafts request/global':>29} {'trie time':>9} same")
    for workload, batch, med, stats, same, share in results:
        def acc(m: str) -> str:
            rate, length, _ = stats[m]
            return f"{rate:.2f}/{length:.2f}" if rate is not None else "-"
        src = stats["suffix"][2]
        drafts = f"{src.get('request', [0])[0]}/{src.get('global', [0])[0]}"
        print(f"{workload:<16} {batch:>5} {med['plain']:>11.1f} {med['ngram']:>7.1f} ({med['ngram'] / med['plain']:.2f}x)"
              f" {med['suffix']:>7.1f} ({med['suffix'] / med['plain']:.2f}x) {med['suffix'] / med['ngram']:>11.2f}x"
              f" {acc('ngram'):>14} {acc('suffix'):>15} {drafts:>29} {100 * share:>8.1f}% {'yes' if same else 'NO'}")
    print("trie time: the suffix proposer's own time (updating the tries and drafting) as a share of the run.")


if __name__ == "__main__":
    main()
