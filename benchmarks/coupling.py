"""Coupled vs standard verification of a draft model's sampled drafts, on SmolLM2.

The draft is a perturbed copy of the target (every weight + sigma * its tensor's std * N(0, 1),
written as a Hugging Face folder in a temporary directory), so that draft and target agree
often but not always, as a real small draft model does. For each noise level and temperature it
runs the same seeded chat requests (the benchmark's four prompt categories x seeds) through
plain decoding and through speculative decoding with rejection_sample_method "coupled" and
"standard" (k = 4), and reports per method the acceptance rate, the mean acceptance length
(tokens per target pass), the decode speed and whether every output equals plain decoding's
with the same seed.

Theory, per drafted position with target law p and draft law q: the standard sampler accepts
with probability sum_v min(p_v, q_v) = 1 - TV(p, q) (the best any coupling can do); the coupled
draft (both races run on the same exponential noise) accepts with probability
sum_v 1 / sum_u max(p_u / p_v, q_u / q_v), between (1 - TV) / (1 + TV) and 1 - TV.

    python benchmarks/coupling.py [--sigmas 0.02 0.05] [--temperatures 0.7 1.0] [--seeds 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

from prompts import CATEGORIES  # noqa: E402

from quickdraft import LLM, SamplingParams  # noqa: E402
from quickdraft.models.default_model import default_model_path  # noqa: E402
from quickdraft.models.gguf_loader import iter_gguf_tensors, load_gguf_config, load_gguf_tokenizer  # noqa: E402

METHODS = ("coupled", "standard")


def write_perturbed_copy(gguf: Path, folder: Path, sigma: float, seed: int = 0) -> Path:
    """The GGUF's model as an HF folder with Gaussian noise of sigma x (tensor std) on every weight."""
    folder.mkdir(parents=True, exist_ok=True)
    config = load_gguf_config(gguf)
    (folder / "config.json").write_text(json.dumps(config))
    tok = load_gguf_tokenizer(gguf)
    tok.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": tok.bos_token, "eos_token": tok.eos_token}))
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, tensor in iter_gguf_tensors(gguf):
        t = tensor.float()
        if t.dim() > 1:  # matrices; norms keep their values
            t = t + sigma * t.std() * torch.randn(t.shape, generator=g)
        weights[name] = t.contiguous()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def run(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[list[list[int]], float]:
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], time.perf_counter() - t0


def spec_counts(llm: LLM) -> dict[str, int]:
    m = {x.name.removeprefix("quickdraft:spec_decode_num_"): x for x in llm.get_metrics()}
    return {k: m[k].value for k in ("drafts", "draft_tokens", "accepted_tokens")}


def make_engine(gguf: Path, draft: Path, k: int, method: str) -> LLM:
    return LLM(str(gguf), dtype="float32", device="cpu", max_model_len=1024, speculative_config={
        "model": str(draft), "num_speculative_tokens": k, "rejection_sample_method": method})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sigmas", type=float, nargs="*", default=[0.02, 0.05])
    ap.add_argument("--temperatures", type=float, nargs="*", default=[0.7, 1.0])
    ap.add_argument("--seeds", type=int, default=8, help="seeded requests per prompt category")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="requests run together (k stays uncapped up to 31)")
    args = ap.parse_args()

    gguf = default_model_path()
    plain = LLM(str(gguf), dtype="float32", device="cpu", max_model_len=1024)
    tok = plain.get_tokenizer()
    chats = [tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True) for text in CATEGORIES.values()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sigma in args.sigmas:
            draft = write_perturbed_copy(gguf, Path(tmp) / f"draft-{sigma}", sigma)
            for temperature in args.temperatures:
                engines = {m: make_engine(gguf, draft, args.k, m) for m in METHODS}
                prompts = [c for c in chats for _ in range(args.seeds)]
                params = [SamplingParams(temperature=temperature, max_tokens=args.max_tokens, seed=1000 + i,
                                         ignore_eos=True) for i in range(len(prompts))]
                seconds = {name: 0.0 for name in ("plain", *METHODS)}
                outputs: dict[str, list[list[int]]] = {name: [] for name in seconds}
                for start in range(0, len(prompts), args.batch):  # alternate engines batch by batch
                    chunk = slice(start, start + args.batch)
                    for name in seconds:
                        ids, s = run(plain if name == "plain" else engines[name], prompts[chunk], params[chunk])
                        outputs[name] += ids
                        seconds[name] += s
                n_tokens = len(prompts) * args.max_tokens
                for m in METHODS:
                    rows.append((sigma, temperature, m, spec_counts(engines[m]), n_tokens / seconds[m],
                                 n_tokens / seconds["plain"], outputs[m] == outputs["plain"]))
    print(f"\nSmolLM2-135M-Instruct float32 target, perturbed-copy draft, k={args.k}, {args.seeds} seeds x "
          f"{len(CATEGORIES)} chat prompts x {args.max_tokens} tokens, batches of {args.batch}\n")
    print("| draft noise | T | method | acceptance rate | mean acceptance length | tok/s (plain) | same text as plain |")
    print("|---|---|---|---|---|---|---|")
    for sigma, temperature, m, counts, speed, plain_speed, same in rows:
        drafted, accepted, drafts = counts["draft_tokens"], counts["accepted_tokens"], counts["drafts"]
        print(f"| {sigma:g} | {temperature:g} | {m} | {accepted / max(drafted, 1):.3f} | "
              f"{1 + accepted / max(drafts, 1):.2f} | {speed:.1f} ({plain_speed:.1f}) | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
