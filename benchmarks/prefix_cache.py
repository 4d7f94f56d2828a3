"""Prefix caching on vs off, side by side in one process (SmolLM2, default path, greedy).

  (a) a 1,000-token system prompt: time to first token of one request on a cold engine (caching
      off) and with the prefix cached; then 32 requests sharing it, submitted together: mean TTFT
      and total throughput (prompt + generated tokens per second);
  (b) a 6-turn chat replayed as a client would: each turn re-sends the whole conversation and
      waits for the answer; total time and generated tokens/s;
  (c) the same chat with ngram speculation (k = 4);
  (d) the cost of a miss: 32 prompts sharing nothing, caching on vs off, with the KV pool's pages
      already touched (steady state; see the comment there for a fresh engine's first use).

Runs alternate between the two engines; medians of --repeats. Every output with caching on is
checked token-identical to caching off.

    python benchmarks/prefix_cache.py [--repeats 3] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

from quickdraft import LLM, SamplingParams

RULES = [
    "Greet the customer by name when it is known.", "Quote sizes in millimetres and inches.",
    "Never invent prices; point to the price list.", "Suggest a safer tool when a plan sounds risky.",
    "Mention the return policy of thirty days for unused items.", "Recommend gloves for cutting work.",
    "Explain the difference between wood and masonry screws when asked.", "Keep answers under five sentences.",
    "Offer to check stock at the nearest store.", "Do not give electrical advice beyond replacing bulbs.",
]


def system_prompt(target_tokens: int, llm: LLM) -> str:
    tok = llm.get_tokenizer()
    lines, i = [], 0
    while len(tok.encode("\n".join(lines))) < target_tokens:
        lines.append(f"Rule {i + 1}: {RULES[i % len(RULES)]}")
        i += 1
    return "\n".join(lines)


def ttft(outs) -> float:
    return statistics.mean(o.metrics.first_token_time - o.metrics.arrival_time for o in outs)


def run(llm: LLM, convs, sp) -> tuple[float, list, list[list[int]]]:
    t0 = time.perf_counter()
    outs = llm.chat(convs, sp, use_tqdm=False)
    return time.perf_counter() - t0, outs, [o.outputs[0].token_ids for o in outs]


def chat_replay(llm: LLM, sp: SamplingParams, turns: list[str], system: str) -> tuple[float, int, list]:
    conv = [{"role": "system", "content": system}]
    t0, generated, answers = time.perf_counter(), 0, []
    for q in turns:
        conv.append({"role": "user", "content": q})
        out = llm.chat(conv, sp, use_tqdm=False)[0]
        generated += len(out.outputs[0].token_ids)
        answers.append(out.outputs[0].token_ids)
        conv.append({"role": "assistant", "content": out.outputs[0].text})
    return time.perf_counter() - t0, generated, answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=32)
    args = ap.parse_args()
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    engines = {"off": LLM(enable_prefix_caching=False), "on": LLM()}
    spec_engines = {"off": LLM(enable_prefix_caching=False, speculative_config=spec),
                    "on": LLM(speculative_config=spec)}
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    system = system_prompt(1000, engines["on"])
    mismatches: list[str] = []
    rows: list[tuple[str, float, float, str]] = []

    # (a) one request: cold vs a cached 1,000-token prefix.
    one = [[{"role": "system", "content": system}, {"role": "user", "content": "Which screws for a pine shelf?"}]]
    times = {"off": [], "on": []}
    answers: dict[str, list] = {}
    engines["on"].chat(one, sp, use_tqdm=False)  # the cache holds the prefix from here on
    n_prompt = 0
    for _ in range(args.repeats):
        for name, llm in engines.items():
            _, outs, got = run(llm, one, sp)
            times[name].append(ttft(outs))
            n_prompt = len(outs[0].prompt_token_ids)
            answers[name] = got
            if name == "on":
                assert outs[0].num_cached_tokens > 0
    if answers["on"] != answers["off"]:
        mismatches.append("(a) one request")
    t_off, t_on = statistics.median(times["off"]), statistics.median(times["on"])
    rows.append((f"(a) TTFT, one request, {n_prompt}-token prompt", t_off, t_on, f"{t_off / t_on:.1f}x faster"))

    # (a) 32 requests sharing the system prompt, submitted together (the cache starts empty).
    users = [f"Question {i}: what do I need to hang a {['mirror', 'shelf', 'clock', 'picture'][i % 4]} "
             f"of {2 + i % 7} kg on a {['brick', 'plaster', 'wood'][i % 3]} wall?" for i in range(args.requests)]
    many = [[{"role": "system", "content": system}, {"role": "user", "content": u}] for u in users]
    res = {}
    for name in ("off", "on"):
        engines[name].reset_prefix_cache()
        dt, outs, got = run(engines[name], many, sp)
        tokens = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) for o in outs)
        res[name] = (dt, ttft(outs), tokens / dt, got)
    if res["on"][3] != res["off"][3]:
        mismatches.append("(a) 32 requests")
    rows.append((f"(a) {args.requests} requests sharing it: mean TTFT", res["off"][1], res["on"][1],
                 f"{res['off'][1] / res['on'][1]:.1f}x faster"))
    rows.append((f"(a) {args.requests} requests: total s (prompt+gen tok/s off {res['off'][2]:.0f}, "
                 f"on {res['on'][2]:.0f})", res["off"][0], res["on"][0], f"{res['off'][0] / res['on'][0]:.2f}x"))

    # (b), (c) a 6-turn chat replayed, without and with ngram speculation.
    turns = ["I want to put up a shelf in my kitchen.", "The wall is brick. Which plugs?",
             "How deep should I drill?", "Which drill bit size?", "How many screws for 80 cm?",
             "Can you summarise the whole plan as a numbered list?"]
    chat_system = system_prompt(150, engines["on"])
    for label, pair in (("(b) 6-turn chat", engines), ("(c) 6-turn chat, ngram k=4", spec_engines)):
        times = {"off": [], "on": []}
        answers = {}
        generated = 0
        for _ in range(args.repeats):
            for name, llm in pair.items():
                llm.reset_prefix_cache()
                dt, generated, got = chat_replay(llm, sp, turns, chat_system)
                times[name].append(dt)
                answers[name] = got
        if answers["on"] != answers["off"]:
            mismatches.append(label)
        t_off, t_on = statistics.median(times["off"]), statistics.median(times["on"])
        rows.append((f"{label}: total s ({generated} tokens; tok/s off {generated / t_off:.0f}, "
                     f"on {generated / t_on:.0f})", t_off, t_on, f"{t_off / t_on:.2f}x throughput"))

    # (d) nothing shared: what a miss costs. The KV pool's pages are touched first (zeroed, with
    # the cache reset): with caching on, finished requests' blocks stay cached and new ones take
    # blocks never used before, whose first write faults the page in (measured at +4% on a fresh
    # engine, once per block over the engine's life); this row is the steady state after that.
    unique = [[{"role": "user", "content": f"{i}: " + u}] for i, u in enumerate(users)]
    times = {"off": [], "on": []}
    for _ in range(args.repeats):
        for name, llm in engines.items():
            llm.reset_prefix_cache()
            llm.engine.runner.kv_cache.zero_()  # safe: nothing cached, nothing running
            dt, outs, got = run(llm, unique, sp)
            times[name].append(dt)
            assert name == "off" or all(o.num_cached_tokens == 0 for o in outs)
    t_off, t_on = statistics.median(times["off"]), statistics.median(times["on"])
    rows.append((f"(d) {args.requests} prompts sharing nothing (steady state): total s", t_off, t_on,
                 f"{100 * (t_on / t_off - 1):+.1f}% with caching on"))

    print(f"\nSmolLM2-135M-Instruct, default path, greedy, max {args.max_tokens} tokens, medians of "
          f"{args.repeats} alternating runs ((a) 32 requests: one run each)")
    print("| workload | caching off | caching on | ratio |")
    print("|---|---|---|---|")
    for label, off, on, ratio in rows:
        print(f"| {label} | {off:.3f} s | {on:.3f} s | {ratio} |")
    print("\nOutputs with caching on identical to caching off:", "yes" if not mismatches else f"NO: {mismatches}")


if __name__ == "__main__":
    main()
