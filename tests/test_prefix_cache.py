"""Automatic prefix caching: the hash chain and lookup (pure), the block manager's reference
counts and LRU eviction, and the engine's promise that a request served from cached blocks gives
the same bits as the same request computed cold (enable_prefix_caching=False is the oracle):
tokens, logprobs, seeded samples, with and without speculation, chunked, preempted, n > 1."""

from __future__ import annotations

import pytest

from quickdraft import LLM, SamplingParams
from quickdraft.engine.block_manager import BlockManager
from quickdraft.engine.prefix_cache import block_hashes, hash_block, longest_cached_prefix, max_cached_blocks

TINY = dict(dtype="float32", device="cpu", max_model_len=256)


def ids(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def logprob_lists(outs) -> list:
    return [[{t: (lp.logprob, lp.rank) for t, lp in d.items()} for d in o.outputs[0].logprobs] for o in outs]


# ---- pure parts ----------------------------------------------------------------------------------

def test_hash_chain_names_full_blocks_only():
    toks = list(range(10, 47))  # 37 tokens, block size 8: 4 full blocks and 5 tokens over
    hs = block_hashes(toks, 8)
    assert len(hs) == 4
    assert hs[0] == hash_block(b"", toks[:8]) and hs[1] == hash_block(hs[0], toks[8:16])
    assert block_hashes(toks, 8, known=hs[:2]) == hs  # incremental: the same chain
    assert block_hashes(toks[:7], 8) == []  # a partial block is never named
    assert block_hashes(toks, 8, extra_key=b"adapter-1")[0] != hs[0]  # an extra key changes the KV's name
    # The chain: equal tokens after a different block are a different block.
    other = [99] + toks[1:]
    assert block_hashes(other, 8)[1] != hs[1]


def test_lookup_stops_at_the_first_difference_and_keeps_one_token():
    toks = list(range(100, 164))  # 64 tokens = 4 blocks of 16
    hs = block_hashes(toks, 16)
    table = {h: 10 + i for i, h in enumerate(hs)}
    assert longest_cached_prefix(hs, table.get) == [10, 11, 12, 13]
    changed = toks[:40] + [7] + toks[41:]  # a one-token difference in block 3 (tokens 32..47)
    assert longest_cached_prefix(block_hashes(changed, 16), table.get) == [10, 11]
    # At least the last token is computed: 64 tokens may take 3 blocks, 65 may take 4, 1 none.
    assert max_cached_blocks(64, 16) == 3 and max_cached_blocks(65, 16) == 4 and max_cached_blocks(1, 16) == 0


def test_block_manager_shares_counts_and_evicts_lru_tail_first():
    bm = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=True)
    a = list(range(1, 14))  # 13 tokens: 3 full blocks + 1
    bm.grow_to(1, 13)
    bm.register(1, a, 13)
    assert bm.num_cached_blocks == 3
    blocks, hashes = bm.lookup(a)
    assert blocks == bm.block_table(1)[:3]
    bm.acquire_cached(2, blocks, hashes)  # a second sequence shares them
    bm.free(1)
    assert bm.num_free_blocks == 6 - 3  # still held by sequence 2
    bm.free(2)
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 3  # free, still findable
    # Allocation takes the unnamed blocks first, then the least recently used named one: the
    # freed sequence's tail block (its blocks entered the queue tail first).
    bm.grow_to(3, 4 * 4)  # 4 blocks: 3 unnamed + 1 evicted
    assert bm.num_cached_blocks == 2
    assert bm.lookup(a)[0] == blocks[:2]  # block 3 (tokens 9..12) was evicted, blocks 1-2 remain
    bm.free(3)
    assert bm.reset_prefix_cache() and bm.num_cached_blocks == 0 and bm.lookup(a) == ([], [])
    bm.grow_to(4, 4)
    assert not bm.reset_prefix_cache()  # refused while a sequence holds blocks
    off = BlockManager(num_blocks=4, block_size=4)
    off.grow_to(1, 12)
    off.register(1, a, 12)
    assert off.num_cached_blocks == 0 and off.lookup(a) == ([], [])


# ---- the engine on SmolLM2: cold == warm ----------------------------------------------------------

SYSTEM = ("You are the support assistant of a hardware store. Answer in at most three sentences, be "
          "precise about sizes and materials, never invent prices, and suggest a safer alternative when "
          "a customer describes a risky plan. ") * 7  # ~300 tokens


def convs(n: int) -> list[list[dict]]:
    items = ["screws", "paint", "a ladder", "glue", "tiles", "a drill", "rope", "nails", "sandpaper", "a saw"]
    return [[{"role": "system", "content": SYSTEM},
             {"role": "user", "content": f"What should I know before buying {items[i % 10]} for job {i}?"}]
            for i in range(n)]


@pytest.fixture(scope="module")
def smol_pair(smollm2_gguf):
    """(caching off, caching on) on the default path."""
    kw = dict(device="cpu", max_model_len=1024)
    return LLM(str(smollm2_gguf), enable_prefix_caching=False, **kw), LLM(str(smollm2_gguf), **kw)


def test_warm_equals_cold_greedy_and_seeded_with_logprobs(smol_pair):
    """20 chats sharing a ~300-token system prompt: greedy with logprobs and seeded sampling give
    the same tokens and the same logprob bits from cached blocks as computed cold; the warm run
    takes the shared blocks from the cache."""
    off, on = smol_pair
    chats = convs(20)
    assert on.reset_prefix_cache()
    greedy = SamplingParams(temperature=0, max_tokens=24, logprobs=3)
    cold = off.chat(chats, greedy, use_tqdm=False)
    first = on.chat(chats[:1], greedy, use_tqdm=False)[0]  # fills the cache
    assert first.num_cached_tokens == 0
    warm = on.chat(chats, greedy, use_tqdm=False)
    assert ids(warm) == ids(cold) and logprob_lists(warm) == logprob_lists(cold)
    n_prompt = len(warm[0].prompt_token_ids)
    assert n_prompt > 300
    assert all(o.num_cached_tokens >= 288 for o in warm)  # the shared system prompt, block-aligned
    assert warm[0].num_cached_tokens == (n_prompt - 1) // 16 * 16  # its own prompt: all but the tail
    assert all(o.num_cached_tokens is None or o.num_cached_tokens == 0 for o in cold)
    seeded = [SamplingParams(temperature=0.9, top_p=0.95, seed=i, max_tokens=24, logprobs=2) for i in range(20)]
    cold = off.chat(chats, seeded, use_tqdm=False)
    warm = on.chat(chats, seeded, use_tqdm=False)
    assert ids(warm) == ids(cold) and logprob_lists(warm) == logprob_lists(cold)
    assert all(o.num_cached_tokens > 0 for o in warm)
    m = {x.name: x for x in on.get_metrics()}
    assert m["quickdraft:prefix_cache_hits"].value > 0
    assert m["quickdraft:prefix_cache_queries"].value >= m["quickdraft:prefix_cache_hits"].value


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_warm_equals_cold_with_speculation(smollm2_gguf, smol_pair, method):
    """Speculation on the warm engine: only verified tokens are cached, drafts are checked
    against the same bits; a draft model's KV is valid on hit blocks (or recomputed)."""
    off, _ = smol_pair
    spec = ({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
            if method == "ngram" else
            {"model": str(smollm2_gguf), "num_speculative_tokens": 3, "quantization": None,
             "draft_length_policy": "fixed"})
    on = LLM(str(smollm2_gguf), device="cpu", max_model_len=1024, speculative_config=spec)
    chats = convs(8)
    greedy = SamplingParams(temperature=0, max_tokens=32, logprobs=2)
    seeded = [SamplingParams(temperature=0.8, seed=7 + i, max_tokens=32) for i in range(8)]
    want_g, want_s = off.chat(chats, greedy, use_tqdm=False), off.chat(chats, seeded, use_tqdm=False)
    for _ in range(2):  # cold cache, then warm
        got = on.chat(chats, greedy, use_tqdm=False)
        assert ids(got) == ids(want_g) and logprob_lists(got) == logprob_lists(want_g)
        assert ids(on.chat(chats, seeded, use_tqdm=False)) == ids(want_s)
    assert all(o.num_cached_tokens > 0 for o in got)
    assert sum(o.metrics.num_draft_tokens for o in got) > 0 and sum(o.metrics.num_accepted_tokens for o in got) > 0
    if method == "draft_model":  # the draft's KV of the cached system prompt was kept, not recomputed
        bm = on.engine.block_manager
        blocks, _ = bm.lookup(got[0].prompt_token_ids)
        assert bm.draft_valid_blocks(blocks) == len(blocks) > 0


def test_multi_turn_hits_everything_before_the_new_message(smol_pair):
    off, on = smol_pair
    on.reset_prefix_cache()
    sp = SamplingParams(temperature=0, max_tokens=64)
    conv = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name three rivers."}]
    computed: list[int] = []  # tokens whose KV the last turn left in the cache
    for turn, question in enumerate(["And three mountains?", "And three deserts?", None]):
        out = on.chat(conv, sp, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == off.chat(conv, sp, use_tqdm=False)[0].outputs[0].token_ids
        prompt = out.prompt_token_ids
        if turn > 0:
            common = 0
            while common < min(len(prompt), len(computed)) and prompt[common] == computed[common]:
                common += 1
            # Everything before the new message: the last prompt and its answer, which the
            # template re-renders as the same tokens (the answer's closing tag may differ).
            assert common >= len(computed) - 1 and common > prev_prompt
            assert out.num_cached_tokens == min(common, len(prompt) - 1) // 16 * 16 > 0
        # All but the last emitted token were computed (the last one's KV never is).
        computed = list(prompt) + list(out.outputs[0].token_ids[:-1])
        prev_prompt = len(prompt)
        if question is None:
            break
        conv = conv + [{"role": "assistant", "content": out.outputs[0].text}, {"role": "user", "content": question}]


def test_prompt_logprobs_requests_write_but_do_not_read(smol_pair):
    off, on = smol_pair
    on.reset_prefix_cache()
    chat = convs(1)
    sp = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=2)
    on.chat(chat, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # cache the prompt
    got = on.chat(chat, sp, use_tqdm=False)[0]
    want = off.chat(chat, sp, use_tqdm=False)[0]
    assert got.num_cached_tokens == 0  # every prompt row is needed
    assert got.prompt_logprobs == want.prompt_logprobs and got.outputs[0].token_ids == want.outputs[0].token_ids
    on.reset_prefix_cache()
    on.chat(chat, sp, use_tqdm=False)  # written by a prompt-logprobs request ...
    assert on.chat(chat, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0].num_cached_tokens > 0


# ---- tiny models: chunking, sliding window, n > 1, eviction, preemption ---------------------------

def _shared_prompts(n: int, prefix_len: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    prefix = [rng.randrange(3, 250) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(3, 250) for _ in range(rng.randrange(3, 20))] for _ in range(n)]


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # mistral: sliding window of 24
def test_tiny_chunked_prefill_and_sliding_window_with_hits(tiny_checkpoint, arch):
    path = str(tiny_checkpoint(arch))
    prompts = [{"prompt_token_ids": p} for p in _shared_prompts(12, 70, seed=3)]
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=2)
    off = LLM(path, enable_prefix_caching=False, **TINY)
    want = off.generate(prompts, sp, use_tqdm=False)
    on = LLM(path, max_num_batched_tokens=24, **TINY)  # prompts arrive in chunks of <= 24 tokens
    for _ in range(2):
        got = on.generate(prompts, sp, use_tqdm=False)
        assert ids(got) == ids(want) and logprob_lists(got) == logprob_lists(want)
    assert all(o.num_cached_tokens >= 64 for o in got)


def test_n_samples_share_the_prompt_blocks(tiny_checkpoint):
    path = str(tiny_checkpoint("llama"))
    prompt = {"prompt_token_ids": _shared_prompts(1, 80, seed=4)[0]}
    sp = SamplingParams(temperature=1.0, seed=11, n=4, max_tokens=20, ignore_eos=True)
    want = LLM(path, enable_prefix_caching=False, **TINY).generate(prompt, sp, use_tqdm=False)[0]
    on = LLM(path, **TINY)
    got = on.generate(prompt, sp, use_tqdm=False)[0]
    assert [o.token_ids for o in got.outputs] == [o.token_ids for o in want.outputs]
    bm = on.engine.block_manager
    assert bm.hits == 3 * ((len(prompt["prompt_token_ids"]) - 1) // 16 * 16)  # samples 1..3 hit sample 0's


def test_eviction_under_a_tiny_kv_budget_preemption_and_no_leaks(tiny_checkpoint):
    """8 blocks of 16 slots for prompts of ~85 tokens that share 64: blocks are evicted, shared
    and preempted; outputs equal caching off, nothing leaks, the cache kept working."""
    path = str(tiny_checkpoint("llama"))
    per_block = 2 * 2 * 16 * 2 * 16 * 4
    prompts = [{"prompt_token_ids": p} for p in _shared_prompts(10, 64, seed=5)]
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    seeded = [SamplingParams(temperature=1.0, seed=50 + i, max_tokens=40, ignore_eos=True) for i in range(10)]
    ref = LLM(path, enable_prefix_caching=False, **TINY)
    small = LLM(path, kv_cache_memory=8 * per_block, **{**TINY, "max_model_len": 128})
    bm = small.engine.block_manager
    assert bm.num_blocks == 8
    for params in (greedy, seeded, greedy):
        assert ids(small.generate(prompts, params, use_tqdm=False)) == ids(ref.generate(prompts, params,
                                                                                       use_tqdm=False))
        assert bm.num_free_blocks == bm.num_blocks and bm.num_allocated_blocks() == 0  # no leaks
    assert small.engine.scheduler.num_preemptions > 0
    assert bm.hits > 0 and 0 < bm.num_cached_blocks <= 8


def test_cli_flag_turns_it_off(tiny_checkpoint):
    from quickdraft.entrypoints import cli

    args = cli.build_parser().parse_args(["generate", "x", "--no-enable-prefix-caching"])
    assert cli._llm_kwargs(args, None)["enable_prefix_caching"] is False
    args = cli.build_parser().parse_args(["serve"])
    assert cli._llm_kwargs(args, None)["enable_prefix_caching"] is True
    off = LLM(str(tiny_checkpoint("llama")), enable_prefix_caching=False, **TINY)
    prompt = {"prompt_token_ids": _shared_prompts(1, 40)[0]}
    for _ in range(2):
        out = off.generate(prompt, SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert out.num_cached_tokens == 0 and off.engine.block_manager.queries == 0


def test_a_stop_inside_an_accepted_run_names_only_kept_blocks(tiny_checkpoint):
    """Regression: a stop token early in a fully accepted run drops the run's later tokens,
    whose keys and values were computed; with blocks of 2 tokens those crossed a block boundary
    past the end of the kept text, and naming them failed. The draft is the target (every draft
    accepted); each stop position is tried; the blocks of the kept text are then served warm."""
    path = str(tiny_checkpoint("llama"))
    spec = {"method": "draft_model", "model": path, "num_speculative_tokens": 5, "draft_length_policy": "fixed"}
    on = LLM(path, block_size=2, speculative_config=spec, enable_prefix_caching=True, **TINY)
    off = LLM(path, block_size=2, enable_prefix_caching=False, **TINY)
    prompt = {"prompt_token_ids": _shared_prompts(1, 12, seed=8)[0]}
    base = ids(off.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False))[0]
    for j in range(2, 14):
        if base[j] in base[:j]:
            continue
        sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[base[j]])
        got = on.generate(prompt, sp, use_tqdm=False)[0]
        assert got.outputs[0].token_ids == base[:j + 1]
        assert got.metrics.num_accepted_tokens > 0
    bm = on.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and bm.hits > 0
