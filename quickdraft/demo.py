"""`make demo`: generate with the embedded default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import time

from quickdraft import LLM, SamplingParams

PROMPTS = [
    [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}],
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "user", "content": "Give three tips for writing clear code."}],
]


def main() -> None:
    t0 = time.perf_counter()
    llm = LLM()
    print(f"Loaded {llm.model_path.name} ({llm.config.dtype}, {llm.config.device}) in {time.perf_counter() - t0:.1f} s")
    params = SamplingParams(temperature=0, max_tokens=96)
    t0 = time.perf_counter()
    outs = llm.chat(PROMPTS, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    for conv, out in zip(PROMPTS, outs):
        print(f"\n### {conv[-1]['content']}\n{out.outputs[0].text.strip()}")
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"\n{n} tokens in {elapsed:.2f} s ({n / elapsed:.1f} tokens/s, batch of {len(outs)})")


if __name__ == "__main__":
    main()
