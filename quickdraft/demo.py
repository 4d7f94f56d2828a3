"""`make demo`: the embedded default model (SmolLM2-135M-Instruct) with and without ngram
speculative decoding: the text, tokens/s of both, and how well the drafts were accepted."""

from __future__ import annotations

import time

from quickdraft import LLM, SamplingParams

CODE = '''def process_orders(orders):
    total = 0
    for order in orders:
        if order["status"] == "paid":
            total += order["amount"]
        elif order["status"] == "refunded":
            total -= order["amount"]
    return total
'''

PROMPTS = [
    "Rename the variable `total` to `balance` in the following Python code. Return the complete updated code."
    f"\n\n```python\n{CODE}```",
    "Summarize in one sentence: The city council voted six to three on Tuesday to build bicycle lanes in the "
    "river district, and asked the transport office to add forty parking spaces near the market.",
    "What is the capital of France? Answer in one sentence.",
]
SPEC = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 5, "prompt_lookup_min": 2}


def _run(llm: LLM, params: SamplingParams):
    outs, seconds = [], []
    for prompt in PROMPTS:  # one at a time: batch-1 latency is where speculation pays
        t0 = time.perf_counter()
        outs.append(llm.chat([{"role": "user", "content": prompt}], params, use_tqdm=False)[0])
        seconds.append(time.perf_counter() - t0)
    return outs, seconds


def main() -> None:
    t0 = time.perf_counter()
    plain = LLM()
    spec = LLM(speculative_config=SPEC)
    print(f"Loaded {plain.model_path.name} twice ({plain.config.dtype}, {plain.config.device}) "
          f"in {time.perf_counter() - t0:.1f} s; speculative_config={SPEC}")
    params = SamplingParams(temperature=0, max_tokens=160)
    _run(plain, SamplingParams(temperature=0, max_tokens=4))  # warm-up
    base_outs, base_s = _run(plain, params)
    spec_outs, spec_s = _run(spec, params)
    for prompt, b, s, tb, ts in zip(PROMPTS, base_outs, spec_outs, base_s, spec_s):
        n = len(s.outputs[0].token_ids)
        m = s.metrics
        same = "identical" if s.outputs[0].token_ids == b.outputs[0].token_ids else "DIFFERENT"
        rate = f"{100 * m.acceptance_rate:.0f}%" if m.acceptance_rate is not None else "n/a"
        mean = f"{m.mean_acceptance_length:.2f}" if m.mean_acceptance_length is not None else "n/a"
        print(f"\n### {prompt.splitlines()[0][:90]}\n{s.outputs[0].text.strip()}\n"
              f"--> {n} tokens: {len(b.outputs[0].token_ids) / tb:.1f} tok/s without speculation, "
              f"{n / ts:.1f} tok/s with ngram ({tb / ts:.2f}x); acceptance rate {rate}, "
              f"mean acceptance length {mean}; output {same} to plain decoding")
    total = {m.name.split(":")[1]: getattr(m, "value", None) for m in spec.get_metrics()}
    drafted, accepted = total["spec_decode_num_draft_tokens"], total["spec_decode_num_accepted_tokens"]
    drafts = total["spec_decode_num_drafts"]
    if drafted:
        print(f"\nOverall: {drafted} tokens drafted, {accepted} accepted: acceptance rate {accepted / drafted:.2f}, "
              f"mean acceptance length {1 + accepted / drafts:.2f}; {sum(base_s) / sum(spec_s):.2f}x faster in total")


if __name__ == "__main__":
    main()
