"""What suffix decoding's tries cost per step with a full global cache, against a decode step.

Fills a SuffixCache (vLLM's defaults: depth 24, 10,000 cached requests) with 12,000 requests of
SmolLM2-tokenized text made for this benchmark (a JSON answer over a random record, then a
sentence of free text: shared keys, unshared values), each appended one token at a time as the
engine does, so the last 2,000 also evict the oldest. It reports, in steady state: microseconds
per appended token (request trie + global trie + eviction work), per draft (both tries
searched), the cache's nodes and resident memory, and a plain SmolLM2 decode step for scale.

    python benchmarks/suffix_cache.py [--requests 12000] [--cached 10000]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from workloads import CITIES, COMPANIES, FIRST, JOBS, LAST  # noqa: E402

from quickdraft import LLM, SamplingParams  # noqa: E402
from quickdraft.spec_decode.suffix import SuffixCache  # noqa: E402

WORDS = ("the a report shows that sales rose fell in spring autumn while costs stayed flat and the team "
         "plans to hire two more people next quarter after a review of budgets risks and goals").split()


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def texts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        rec = {"name": f"{rng.choice(FIRST)} {rng.choice(LAST)}", "age": rng.randrange(18, 90),
               "city": rng.choice(CITIES), "job": rng.choice(JOBS), "company": rng.choice(COMPANIES),
               "id": rng.randrange(10**6)}
        prompt = f"Record {rec['id']}: {rec['name']}, {rec['age']}, {rec['job']} at {rec['company']} in {rec['city']}."
        answer = json.dumps(rec, indent=2) + "\n" + " ".join(rng.choice(WORDS) for _ in range(rng.randrange(8, 30)))
        out.append((prompt, answer))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=12000)
    ap.add_argument("--cached", type=int, default=10000)
    ap.add_argument("--k", type=int, default=16)
    args = ap.parse_args()

    llm = LLM()
    tok = llm.get_tokenizer()
    pairs = texts(args.requests)
    encoded = [(tok.encode(p, add_special_tokens=False), tok.encode(a, add_special_tokens=False)) for p, a in pairs]
    base = rss_mb()
    cache = SuffixCache(max_cached_requests=args.cached)
    append_us: list[float] = []
    draft_us: list[float] = []
    steady_from = args.requests - 2000
    total_tokens = 0
    for i, (prompt, answer) in enumerate(encoded):
        seq = list(prompt)
        cache.update(i, seq, len(prompt))
        for t in answer:
            seq.append(t)
            t0 = time.perf_counter()
            cache.update(i, seq, len(prompt))
            t1 = time.perf_counter()
            if i >= steady_from:
                cache.speculate(i, seq, args.k)
                draft_us.append(1e6 * (time.perf_counter() - t1))
                append_us.append(1e6 * (t1 - t0))
        total_tokens += len(answer)
        cache.finish(i, seq, len(prompt))
    mem = rss_mb() - base

    # A plain decode step of SmolLM2 at batch 1, for scale.
    out = llm.generate("Write a short story about a lighthouse keeper.",
                       SamplingParams(temperature=0, max_tokens=128, ignore_eos=True), use_tqdm=False)[0]
    m = out.metrics
    step_us = 1e6 * (m.last_token_time - m.first_token_time) / (len(out.outputs[0].token_ids) - 1)

    def q(values: list[float], p: float) -> float:
        return sorted(values)[int(p * (len(values) - 1))]

    trie = cache.global_trie
    print(f"\nSuffix tries with {cache.num_cached_requests} cached requests ({args.requests} served, "
          f"{total_tokens / args.requests:.0f} output tokens each, depth {cache.max_tree_depth}), steady state over "
          f"the last 2000 requests:")
    print(f"  appending a token (request trie + global trie + eviction): median {statistics.median(append_us):.1f} us, "
          f"p99 {q(append_us, 0.99):.1f} us")
    print(f"  drafting (k={args.k}, both tries): median {statistics.median(draft_us):.1f} us, "
          f"p99 {q(draft_us, 0.99):.1f} us")
    print(f"  global trie: {trie.num_nodes / 1e6:.2f} M nodes for {cache.num_cached_requests * total_tokens / args.requests / 1e6:.2f} M "
          f"cached tokens, {mem:.0f} MB resident")
    print(f"  a plain SmolLM2 decode step here: {step_us:.0f} us; append + draft per step = "
          f"{100 * (statistics.median(append_us) + statistics.median(draft_us)) / step_us:.1f}% of it")


if __name__ == "__main__":
    main()
