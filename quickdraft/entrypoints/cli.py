"""The `quickdraft` command: `serve` (OpenAI-compatible server), `generate` (one prompt) and
`bench` (the benchmarks in benchmarks/). Engine options use vLLM's flag names.

    quickdraft serve [MODEL] [--port 8000] [--speculative-config '{"method": "ngram", ...}']
    quickdraft serve [MODEL] --ray --num-replicas 2     (replicas on Ray Serve)
    quickdraft generate "def fibonacci(n):" [--stream] [--chat] [--temperature 0] [--max-tokens 64]
    quickdraft bench throughput|spec|serve|coupling|prefix|llamacpp|cross|suffix|structured|ray [ARGS...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from quickdraft.entrypoints.openai.limits import ServerLimits

BENCHMARKS = {"throughput": "throughput.py", "spec": "spec_decode.py", "serve": "serve_load.py",
              "coupling": "coupling.py", "prefix": "prefix_cache.py", "llamacpp": "vs_llamacpp.py",
              "cross": "cross_request.py", "suffix": "suffix_cache.py", "structured": "structured.py",
              "ray": "ray_batch.py"}


def _json_dict(value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {value!r}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}")
    return parsed


def _optional_int(value: str) -> int | None:
    return None if value.lower() == "none" else int(value)


def _optional_float(value: str) -> float | None:
    return None if value.lower() == "none" else float(value)


def _kv_memory(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _add_engine_args(p: argparse.ArgumentParser, *, seed_help: str | None) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: the model's own)")
    g.add_argument("--revision", default=None, help="hub revision of the model (branch, tag or commit)")
    g.add_argument("--tokenizer-revision", default=None, help="hub revision of --tokenizer")
    g.add_argument("--download-dir", default=None,
                   help="Hugging Face cache to read and download into (default: $HF_HUB_CACHE, $HF_HOME/hub)")
    g.add_argument("--gguf-file", default=None, help="the GGUF file to load from a GGUF repo or folder")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "float", "half",
                                                       "bf16", "fp16", "fp32"],
                   help="weights and activations dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    # config.QUANTIZATIONS, written out: the CLI parses its arguments before importing torch.
    g.add_argument("--quantization", "-q", default="auto", choices=["auto", "gguf", "q8_0", "q4_0", "none"],
                   help="how weights are held (auto: a GGUF file's blocks as stored on CPU; none: dequantized)")
    if seed_help is not None:
        g.add_argument("--seed", type=int, default=0, help=seed_help)
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in a batch")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget of one engine step")
    g.add_argument("--kv-cache-memory", type=_kv_memory, default=None,
                   help="KV cache size in bytes or like '2GiB' (default: 1 GiB on CPU, 40%% of free GPU memory)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV blocks of prompt prefixes computed before (default on; outputs unchanged)")
    g.add_argument("--structured-outputs-backend", choices=["auto", "xgrammar", "guidance"], default="auto",
                   help="grammar backend for structured outputs (response_format, structured_outputs)")
    g.add_argument("--speculative-config", type=_json_dict, default=None,
                   help='speculative decoding as JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 5, '
                        '"prompt_lookup_min": 2, "prompt_lookup_max": 5}\'')


def _llm_kwargs(args: argparse.Namespace, model: str | None, *, seed: int = 0,
                disable_log_stats: bool = True) -> dict[str, Any]:
    return dict(model=model, tokenizer=args.tokenizer, revision=args.revision,
                tokenizer_revision=args.tokenizer_revision, download_dir=args.download_dir,
                gguf_file=args.gguf_file, dtype=args.dtype, device=args.device, seed=seed,
                quantization=args.quantization,
                max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory=args.kv_cache_memory,
                block_size=args.block_size, enable_prefix_caching=args.enable_prefix_caching,
                speculative_config=args.speculative_config,
                structured_outputs_backend=args.structured_outputs_backend,
                disable_log_stats=disable_log_stats)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quickdraft", description="LLM inference with vLLM's API and exact speculative decoding.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `quickdraft COMMAND --help` for a command's options.")
    from quickdraft import __version__

    parser.add_argument("--version", action="version", version=f"quickdraft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser("serve", help="serve a model with an OpenAI-compatible API",
                           description="Serve a model over HTTP with OpenAI's API (/v1/completions, "
                                       "/v1/chat/completions, /v1/models), /tokenize, /detokenize, /health and "
                                       "Prometheus /metrics. Without MODEL: the embedded SmolLM2-135M-Instruct.")
    serve.add_argument("model", nargs="?", default=None, metavar="MODEL",
                       help="hub id (ORG/NAME, ORG/NAME:QUANT), HF folder, .gguf file or the default model's name")
    serve.add_argument("--model", dest="model_flag", default=None, help=argparse.SUPPRESS)
    srv = serve.add_argument_group("server")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name", nargs="+", default=None,
                     help="model name(s) the API accepts; the first is reported (default: MODEL as given)")
    srv.add_argument("--api-key", default=None,
                     help="require `Authorization: Bearer KEY` on every endpoint but /health "
                          "(default: $QUICKDRAFT_API_KEY)")
    srv.add_argument("--allowed-origins", nargs="+", default=None,
                     help="enable CORS for these origins (default: CORS off)")
    srv.add_argument("--enable-log-requests", action="store_true",
                     help="log each request's prompt and parameters (default: request content is not logged)")
    srv.add_argument("--shutdown-timeout", type=float, default=10.0,
                     help="on SIGTERM/SIGINT, seconds running requests may take to finish before they are aborted")
    lim = serve.add_argument_group("limits (each request is checked before any work; see the README)")
    d = ServerLimits()
    lim.add_argument("--max-logprobs", type=int, default=d.max_logprobs,
                     help="largest logprobs / top_logprobs a request may ask")
    lim.add_argument("--max-request-body-bytes", type=int, default=d.max_request_body_bytes,
                     help="larger bodies get 413 (default 4 MiB)")
    lim.add_argument("--max-n", type=int, default=None, help="largest n (default: --max-num-seqs)")
    lim.add_argument("--max-tokens-limit", type=int, default=None,
                     help="largest max_tokens a request may ask, and the default when it asks none "
                          "(default: only the context bounds it)")
    lim.add_argument("--max-prompts-per-request", type=int, default=d.max_prompts_per_request,
                     help="most prompts in one /v1/completions request")
    lim.add_argument("--max-stop-sequences", type=int, default=d.max_stop_sequences,
                     help="most stop strings (and bad_words) in one request")
    lim.add_argument("--max-waiting-requests", type=_optional_int, default=d.max_waiting_requests,
                     help="requests admitted beyond the --max-num-seqs running at once; more get 503 with "
                          "Retry-After ('none': unbounded; default %(default)s)")
    lim.add_argument("--request-timeout", type=_optional_float, default=d.request_timeout,
                     help="seconds after which a request is aborted with 504 ('none': never; default %(default)s)")
    ray = serve.add_argument_group("Ray Serve (the `ray` extra; see the README's 'On a cluster')")
    ray.add_argument("--ray", action="store_true",
                     help="serve replicas of the model on Ray Serve, behind Serve's proxy at --host:--port")
    ray.add_argument("--num-replicas", type=int, default=1, help="replicas, each with its own engine (default 1)")
    ray.add_argument("--num-cpus-per-replica", type=float, default=1.0,
                     help="CPUs Ray reserves for each replica; also its torch threads (default 1)")
    ray.add_argument("--num-gpus-per-replica", type=float, default=0.0,
                     help="GPUs Ray reserves for each replica (with --device cuda; default 0)")
    ray.add_argument("--ray-address", default=None,
                     help="the Ray cluster to join (e.g. 'auto' on a node where `ray start` ran; "
                          "default: $RAY_ADDRESS, else a new local instance)")
    srv.add_argument("--disable-log-stats", action="store_true", help="no periodic engine stats in the log")
    srv.add_argument("--uvicorn-log-level", default="info",
                     choices=["critical", "error", "warning", "info", "debug", "trace"])
    srv.add_argument("--disable-uvicorn-access-log", action="store_true")
    _add_engine_args(serve, seed_help="engine random seed (requests without their own seed)")
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="generate text for one prompt",
                         description="Generate a continuation of PROMPT (or a chat reply with --chat) and print it.")
    gen.add_argument("prompt", metavar="PROMPT")
    gen.add_argument("--model", default=None,
                     help="hub id (ORG/NAME, ORG/NAME:QUANT), HF folder or .gguf file (default: the embedded SmolLM2)")
    gen.add_argument("--chat", action="store_true", help="treat PROMPT as a user message (model's chat template)")
    gen.add_argument("--stream", action="store_true", help="print the text as it is generated")
    gen.add_argument("--stats", action="store_true", help="print tokens/s and draft acceptance to stderr")
    smp = gen.add_argument_group("sampling")
    smp.add_argument("--temperature", type=float, default=None, help="0 is greedy (default: the model's, else 1)")
    smp.add_argument("--top-p", type=float, default=None)
    smp.add_argument("--top-k", type=int, default=None)
    smp.add_argument("--min-p", type=float, default=None)
    smp.add_argument("--max-tokens", type=int, default=128)
    smp.add_argument("--seed", type=int, default=None, help="sampling seed of this request")
    smp.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    smp.add_argument("--ignore-eos", action="store_true")
    _add_engine_args(gen, seed_help=None)
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="run a benchmark from benchmarks/",
                           description="Run a script of benchmarks/: " + ", ".join(
                               f"{script} ({name})" for name, script in BENCHMARKS.items())
                           + "; the remaining arguments go to the benchmark (e.g. `quickdraft bench serve -- --help`).")
    bench.add_argument("name", choices=sorted(BENCHMARKS), metavar="{" + ",".join(BENCHMARKS) + "}")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    bench.set_defaults(func=cmd_bench)
    return parser


# ---- commands -----------------------------------------------------------------------------------
def server_limits(args: argparse.Namespace) -> ServerLimits:
    try:
        return ServerLimits(max_request_body_bytes=args.max_request_body_bytes, max_n=args.max_n,
                            max_tokens=args.max_tokens_limit, max_logprobs=args.max_logprobs,
                            max_prompts_per_request=args.max_prompts_per_request,
                            max_stop_sequences=args.max_stop_sequences,
                            max_waiting_requests=args.max_waiting_requests, request_timeout=args.request_timeout)
    except ValueError as e:
        raise SystemExit(f"quickdraft serve: {e}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from quickdraft.entrypoints.openai.api_server import run_server
    from quickdraft.models.default_model import DEFAULT_MODEL_NAME

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    model = args.model or args.model_flag
    names = args.served_model_name or [model or DEFAULT_MODEL_NAME]
    llm_kwargs = _llm_kwargs(args, model, seed=args.seed, disable_log_stats=args.disable_log_stats)
    llm_kwargs["max_logprobs"] = max(args.max_logprobs, 0)  # the engine allows what the server does
    if args.ray:
        return _serve_on_ray(args, llm_kwargs, names)
    run_server(llm_kwargs, served_model_names=names, host=args.host, port=args.port, api_key=args.api_key,
               limits=server_limits(args), shutdown_timeout=args.shutdown_timeout,
               allowed_origins=args.allowed_origins, enable_log_requests=args.enable_log_requests,
               uvicorn_log_level=args.uvicorn_log_level, access_log=not args.disable_uvicorn_access_log)
    return 0


def _serve_on_ray(args: argparse.Namespace, llm_kwargs: dict[str, Any], names: list[str]) -> int:
    if args.num_replicas < 1:
        raise SystemExit(f"quickdraft serve: --num-replicas must be at least 1, got {args.num_replicas}.")
    if not args.num_cpus_per_replica > 0:
        raise SystemExit(f"quickdraft serve: --num-cpus-per-replica must be positive, got {args.num_cpus_per_replica}.")
    try:
        from quickdraft.ray.serve import run_ray_server
    except ImportError as e:
        raise SystemExit(f"quickdraft serve --ray needs Ray Serve: pip install 'quickdraft[ray]' ({e}).") from None
    from quickdraft.entrypoints.openai.api_server import resolve_api_key

    run_ray_server(llm_kwargs, served_model_names=names, host=args.host, port=args.port,
                   ray_address=args.ray_address, num_replicas=args.num_replicas,
                   num_cpus_per_replica=args.num_cpus_per_replica,
                   num_gpus_per_replica=args.num_gpus_per_replica, api_key=resolve_api_key(args.api_key),
                   limits=server_limits(args), allowed_origins=args.allowed_origins,
                   enable_log_requests=args.enable_log_requests, shutdown_timeout=args.shutdown_timeout)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from quickdraft import LLM, SamplingParams

    llm = LLM(**_llm_kwargs(args, args.model))
    d = llm.get_default_sampling_params()

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    params = SamplingParams(temperature=pick(args.temperature, d.temperature), top_p=pick(args.top_p, d.top_p),
                            top_k=pick(args.top_k, d.top_k), min_p=pick(args.min_p, d.min_p),
                            repetition_penalty=d.repetition_penalty, max_tokens=args.max_tokens, seed=args.seed,
                            stop=args.stop, ignore_eos=args.ignore_eos)
    tok = llm.get_tokenizer()
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)
    else:
        text, ids = args.prompt, tok.encode(args.prompt)
    engine = llm.engine
    engine.validate_request(ids, params)
    t0 = time.perf_counter()
    if args.stream:
        engine.add_request("generate-0", text, ids, params)
        sent = 0
        final = None
        while engine.has_unfinished_requests():
            for out in engine.step(stream=True):
                o = out.outputs[0]
                end = len(o.text) if out.finished else max(sent, len(o.text) - params.output_text_buffer_length)
                sys.stdout.write(o.text[sent:end])
                sys.stdout.flush()
                sent = end
                if out.finished:
                    final = out
        sys.stdout.write("\n")
    else:
        final = llm.generate({"prompt": text, "prompt_token_ids": ids}, params, use_tqdm=False)[0]
        print(final.outputs[0].text)
    elapsed = time.perf_counter() - t0
    if args.stats and final is not None:
        o, m = final.outputs[0], final.metrics
        line = (f"{len(o.token_ids)} tokens in {elapsed:.2f}s ({len(o.token_ids) / max(elapsed, 1e-9):.1f} tok/s), "
                f"finish_reason={o.finish_reason}")
        if m is not None and m.num_drafts:
            line += (f", drafts={m.num_drafts} drafted={m.num_draft_tokens} accepted={m.num_accepted_tokens} "
                     f"(acceptance {m.acceptance_rate:.1%}, mean length {m.mean_acceptance_length:.2f})")
        print(line, file=sys.stderr)
    return 0


def benchmarks_dir() -> Path:
    import quickdraft

    return Path(quickdraft.__file__).resolve().parent.parent / "benchmarks"


def cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    script = benchmarks_dir() / BENCHMARKS[args.name]
    if not script.is_file():
        print(f"error: {script} not found; `quickdraft bench` runs from a source checkout.", file=sys.stderr)
        return 2
    rest = list(args.args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    old_argv = sys.argv
    sys.argv = [str(script), *rest]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        if args.command == "bench":
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
