"""Offline batches on Ray Data against plain `LLM.generate`, on the default model (SmolLM2 GGUF).

256 chat prompts, greedy, EOS ignored (every row generates the same number of tokens):
- plain: `LLM.chat` in this process (2 torch threads);
- ray x1: `build_processor` with 1 replica holding both CPUs;
- ray x2: 2 replicas with 1 CPU each.

Runs alternate (plain, x1, x2, plain, ...) and the table reports medians. A Ray job's time
includes starting its actors (a worker process, imports, the model load); the table also gives
it without one replica start (measured here: an actor that builds a replica and returns), which
is the per-row overhead that matters for long jobs. Every Ray run's outputs are checked against
plain's, row by row.

This machine has 2 cores: 2 replicas cannot be faster than 1 replica with both cores by more
than batching effects; on a cluster each replica gets its own machine.

    python benchmarks/ray_batch.py [--rows 256] [--max-tokens 64] [--repeats 3] [--speculative]
"""

from __future__ import annotations

import argparse
import statistics
import time

import ray
import ray.data

from quickdraft import LLM, SamplingParams
from quickdraft.models.default_model import default_model_path
from quickdraft.ray import ProcessorConfig, build_processor, summarize

TOPICS = ["the moon", "bread", "rivers", "chess", "volcanoes", "bees", "trains", "music", "glaciers", "paper",
          "bicycles", "tea", "owls", "bridges", "clouds", "maps"]
NGRAM = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 1, "prompt_lookup_max": 4}


def rows(n: int) -> list[dict]:
    return [{"id": i, "messages": [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]} and repeat "
                                                                f"the key facts ({i})."}]} for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--speculative", action="store_true", help="n-gram speculation in every engine")
    args = ap.parse_args()

    model = str(default_model_path())
    spec = NGRAM if args.speculative else None
    params = {"temperature": 0, "max_tokens": args.max_tokens, "ignore_eos": True}
    data = rows(args.rows)
    t0 = time.perf_counter()
    llm = LLM(model, speculative_config=spec)
    load_s = time.perf_counter() - t0
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)

    def plain() -> list[list[int]]:
        outs = llm.chat([r["messages"] for r in data], SamplingParams(**params), use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]

    def on_ray(replicas: int) -> tuple[list[list[int]], object]:
        config = ProcessorConfig(model=model, engine_kwargs={"speculative_config": spec}, sampling_params=params,
                                 concurrency=replicas, num_cpus_per_replica=2 / replicas, batch_size=args.batch_size)
        got = build_processor(config)(ray.data.from_items(data)).take_all()
        assert all(g["error"] is None for g in got), [g["error"] for g in got if g["error"]][:3]
        return [g["generated_token_ids"] for g in got], summarize(got)

    @ray.remote(num_cpus=2)
    class Starter:
        def __init__(self) -> None:
            from quickdraft.ray import LLMReplica

            self.replica = LLMReplica(model, {"speculative_config": spec}, params, 2)

        def ready(self) -> bool:
            return True

    starts = []
    for _ in range(2):
        t = time.perf_counter()
        actor = Starter.remote()
        ray.get(actor.ready.remote())
        starts.append(time.perf_counter() - t)
        ray.kill(actor)
    start_s = min(starts)

    times: dict[str, list[float]] = {"plain": [], "ray x1": [], "ray x2": []}
    want = None
    mismatches = {"ray x1": 0, "ray x2": 0}
    summaries = {}
    for _ in range(args.repeats):
        for name in times:
            t = time.perf_counter()
            if name == "plain":
                ids = plain()
                want = want or ids
            else:
                ids, summaries[name] = on_ray(1 if name == "ray x1" else 2)
            times[name].append(time.perf_counter() - t)
            if name != "plain":
                mismatches[name] += sum(a != b for a, b in zip(ids, want))
            print(f"  {name}: {times[name][-1]:.1f} s", flush=True)
    ray.shutdown()

    tokens = args.rows * args.max_tokens
    base = statistics.median(times["plain"])
    print(f"\n{args.rows} rows x {args.max_tokens} tokens, SmolLM2 GGUF (default path), "
          f"{'ngram k=5' if spec else 'no speculation'}; medians of {args.repeats}; model load {load_s:.1f} s "
          f"in this process, replica start (actor + load) {start_s:.1f} s\n")
    print("| | job time | without 1 replica start | tokens/s | vs plain | per-row overhead vs plain | mismatches |")
    print("|---|---|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        net = med - start_s if name != "plain" else med
        over = "" if name == "plain" else f"{(net / base - 1):+.1%}"
        mm = "" if name == "plain" else f"{mismatches[name]} / {args.rows * args.repeats}"
        print(f"| {name} | {med:.1f} s | {net:.1f} s | {tokens / net:.0f} | {base / net:.2f}x | {over} | {mm} |")
    for name, s in summaries.items():
        print(f"\n{name}: {s}")


if __name__ == "__main__":
    main()
