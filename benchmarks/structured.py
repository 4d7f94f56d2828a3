"""Structured outputs on SmolLM2: 32 requests extracting a fixed 8-field JSON record from text,
constrained by its JSON schema, one after another (batch 1) or all at once.

Compared, each on its own engine, alternating within a repeat (medians reported):
* unconstrained: the same prompts without a schema (what a step costs without a grammar);
* constrained: the schema, no speculation;
* grammar: the schema, drafts of the tokens the grammar forces (method "grammar");
* grammar+ngram / grammar+suffix: forced tokens followed by the method's own draft.

Reported: tokens/s, target passes (engine steps) per token, acceptance rate and mean
acceptance length, and the cost of a constrained step relative to an unconstrained one
(seconds per pass). Every constrained output is checked against the schema, and every
speculative output token for token against constrained decoding without speculation.

    python benchmarks/structured.py [--repeats 3] [--batch 1] [--compact]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from workloads import CITIES, COMPANIES, FIRST, JOBS, LAST  # noqa: E402

from quickdraft import LLM, SamplingParams  # noqa: E402
from quickdraft.sampling_params import StructuredOutputsParams  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "first_name": {"type": "string"}, "last_name": {"type": "string"}, "age": {"type": "integer"},
        "city": {"type": "string"}, "job": {"type": "string"}, "company": {"type": "string"},
        "email": {"type": "string"}, "remote": {"type": "boolean"},
    },
    "required": ["first_name", "last_name", "age", "city", "job", "company", "email", "remote"],
    "additionalProperties": False,
}
MODES = {
    "unconstrained": None,
    "constrained": None,
    "grammar": {"method": "grammar", "num_speculative_tokens": 16},
    "grammar+ngram": {"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_min": 1, "prompt_lookup_max": 4},
    "grammar+suffix": {"method": "suffix", "num_speculative_tokens": 16},
}


def records(n: int = 32, seed: int = 3) -> list[list[dict]]:
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        company = rng.choice(COMPANIES)
        email = f"{first.lower()}.{last.lower()}@{company.lower().replace(' ', '')}.com"
        remote = rng.random() < 0.5
        text = (f"{first} {last}, {rng.randrange(21, 70)}, lives in {rng.choice(CITIES)} and works as a "
                f"{rng.choice(JOBS)} at {company} ({'remotely' if remote else 'on site'}); email {email}.")
        convs.append([{"role": "user", "content": "Extract first_name, last_name, age, city, job, company, email "
                                                  f"and remote (true/false) as JSON.\n\n{text}"}])
    return convs


def run(llm: LLM, convs: list[list[dict]], params: SamplingParams, batch: int) -> tuple[list, float, int]:
    """(outputs, seconds, engine steps)."""
    steps = [0]
    step = llm.engine.step

    def counted(*a, **k):
        steps[0] += 1
        return step(*a, **k)

    llm.engine.step = counted
    t0 = time.perf_counter()
    outs = []
    for i in range(0, len(convs), batch):
        outs += [o.outputs[0] for o in llm.chat(convs[i:i + batch], params, use_tqdm=False)]
    dt = time.perf_counter() - t0
    llm.engine.step = step
    return outs, dt, steps[0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--compact", action="store_true",
                    help="disable_any_whitespace: compact JSON, whose keys and punctuation the grammar forces")
    args = ap.parse_args(argv)
    convs = records()
    constrained = SamplingParams(temperature=0, max_tokens=args.max_tokens,
                                 structured_outputs=StructuredOutputsParams(
                                     json=SCHEMA, disable_any_whitespace=args.compact))
    free = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    engines = {m: LLM(speculative_config=spec, max_num_seqs=args.batch) for m, spec in MODES.items()}
    for m, llm in engines.items():  # warm-up: compile the schema, touch every path once
        run(llm, convs[:1], free if m == "unconstrained" else constrained, 1)
    speed: dict[str, list[float]] = {m: [] for m in MODES}
    per_pass: dict[str, list[float]] = {m: [] for m in MODES}
    passes: dict[str, float] = {}
    reference = None
    for rep in range(args.repeats):
        order = list(MODES)[rep % len(MODES):] + list(MODES)[:rep % len(MODES)]
        outputs = {}
        for m in order:
            outs, dt, steps = run(engines[m], convs, free if m == "unconstrained" else constrained, args.batch)
            n = sum(len(o.token_ids) for o in outs)
            speed[m].append(n / dt)
            per_pass[m].append(dt / steps)
            passes[m] = steps / n
            outputs[m] = [o.token_ids for o in outs]
            if m != "unconstrained":
                for o in outs:
                    record = json.loads(o.text)
                    assert set(record) == set(SCHEMA["required"]), o.text
        reference = outputs["constrained"]
        for m in MODES:
            if m not in ("unconstrained", "constrained"):
                assert outputs[m] == reference, f"{m} changed the constrained output"
    med = {m: statistics.median(v) for m, v in speed.items()}
    pass_s = {m: statistics.median(v) for m, v in per_pass.items()}
    print(f"\nStructured outputs, SmolLM2-135M-Instruct (default path), {len(convs)} requests, 8-field JSON schema, "
          f"{'compact' if args.compact else 'free whitespace'}, greedy, batch {args.batch}, {torch.get_num_threads()} threads, medians of {args.repeats} runs; "
          f"backend {engines['constrained'].engine.structured.backend.name}")
    print(f"{'mode':<15} {'tok/s':>7} {'vs constrained':>14} {'passes/token':>12} {'ms/pass':>8} "
          f"{'acc. rate':>9} {'mean len':>8} {'drafts by source (n, drafted, accepted)':>40}")
    for m in MODES:
        s = engines[m].engine.spec_stats
        acc = f"{s.acceptance_rate:.2f}" if s and s.acceptance_rate is not None else "-"
        length = f"{s.mean_acceptance_length:.2f}" if s and s.mean_acceptance_length is not None else "-"
        src = " ".join(f"{k}:{v}" for k, v in sorted(s.by_source.items())) if s else "-"
        print(f"{m:<15} {med[m]:>7.1f} {med[m] / med['constrained']:>13.2f}x {passes[m]:>12.3f} "
              f"{1000 * pass_s[m]:>8.2f} {acc:>9} {length:>8} {src:>40}")
    print(f"A constrained step costs {pass_s['constrained'] / pass_s['unconstrained']:.3f}x an unconstrained one "
          "(seconds per pass, no speculation). Outputs with speculation equal constrained decoding: yes.")


if __name__ == "__main__":
    main()
