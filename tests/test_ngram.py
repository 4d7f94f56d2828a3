"""Prompt-lookup drafting: `find_ngram_draft` against hand-worked cases and a brute-force
reference written here, and the engine's context cap with n-gram speculation."""

from __future__ import annotations

import random

import numpy as np
import pytest

from quickdraft import LLM, SamplingParams
from quickdraft.spec_decode.ngram import find_ngram_draft
from tiny_models import self_copy_prompts


def reference_draft(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """The rule, written out by brute force: for n from max_n down to min_n, the first start
    s < len - n (so that a token follows and it is not the suffix itself) with
    tokens[s:s+n] == tokens[-n:]; propose up to k tokens after it."""
    L = len(tokens)
    for n in range(max_n, min_n - 1, -1):
        if n >= L:
            continue
        suffix = tokens[L - n:]
        for s in range(0, L - n):
            if tokens[s:s + n] == suffix:
                return tokens[s + n:s + n + k]
    return []


# ---- hand-worked cases -------------------------------------------------------------------------

def test_no_match_gives_nothing():
    assert find_ngram_draft([1, 2, 3, 4, 5], 1, 3, 4) == []
    assert find_ngram_draft([7], 1, 3, 4) == []
    assert find_ngram_draft([], 1, 3, 4) == []
    # a 2-gram match exists, but min_n = 3 asks for more
    assert find_ngram_draft([1, 2, 9, 8, 1, 2], 3, 4, 4) == []


def test_k_truncates_the_proposal():
    tokens = [5, 6, 10, 11, 12, 13, 14, 6]
    assert find_ngram_draft(tokens, 1, 1, 3) == [10, 11, 12]
    assert find_ngram_draft(tokens, 1, 1, 1) == [10]
    assert find_ngram_draft(tokens, 1, 1, 6) == [10, 11, 12, 13, 14, 6]
    assert find_ngram_draft(tokens, 1, 1, 0) == []


def test_min_one_matches_the_last_token_alone():
    assert find_ngram_draft([4, 9, 9, 3, 4], 1, 3, 2) == [9, 9]
    assert find_ngram_draft([4, 9, 9, 3, 4], 2, 3, 2) == []


def test_longest_ngram_wins_over_an_earlier_shorter_one():
    # "3" alone occurs first at index 0 (followed by 100), but "2 3" occurs at index 3
    # (followed by 200) and "1 2 3" at index 7 (followed by 300).
    tokens = [3, 100, 0, 2, 3, 200, 0, 1, 2, 3, 300, 5, 1, 2, 3]
    assert find_ngram_draft(tokens, 1, 3, 1) == [300]
    assert find_ngram_draft(tokens, 1, 2, 1) == [200]
    assert find_ngram_draft(tokens, 1, 1, 1) == [100]
    assert find_ngram_draft(tokens, 1, 5, 2) == [300, 5]  # no 4- or 5-gram match: falls back to 3


def test_earliest_occurrence_wins_on_ties():
    tokens = [1, 2, 50, 1, 2, 60, 1, 2, 70, 1, 2]
    assert find_ngram_draft(tokens, 2, 2, 2) == [50, 1]


def test_fewer_than_k_tokens_available_at_the_end():
    # the only earlier occurrence of "8 9" is followed by just two tokens before the suffix
    assert find_ngram_draft([8, 9, 4, 8, 9], 2, 2, 5) == [4, 8, 9]
    # overlapping occurrence: "7 7" at index 0 is followed by the rest of the sequence
    assert find_ngram_draft([7, 7, 7], 2, 2, 5) == [7]


def test_the_suffix_itself_never_counts_as_a_match():
    assert find_ngram_draft([1, 2, 3], 1, 3, 4) == []
    assert find_ngram_draft([1, 2, 3, 1, 2, 3], 3, 3, 4) == [1, 2, 3]
    assert find_ngram_draft([5, 5], 1, 1, 3) == [5]
    assert find_ngram_draft([5, 5], 2, 2, 3) == []  # only the suffix itself is a 2-gram


def test_max_n_longer_than_the_sequence():
    assert find_ngram_draft([3, 4, 3], 1, 10, 2) == [4, 3]


def test_numpy_input_is_accepted():
    tokens = np.array([1, 2, 3, 9, 1, 2], dtype=np.int32)
    assert find_ngram_draft(tokens, 1, 3, 3) == [3, 9, 1]


# ---- brute force on long random contexts ---------------------------------------------------------

def _random_context(rng: random.Random, length: int) -> list[int]:
    """Random tokens over an alphabet of varied size, with copied spans planted so that long
    matches, no matches and ties all occur."""
    alphabet = rng.choice([2, 3, 5, 20, 400, 50000])
    tokens = [rng.randrange(alphabet) for _ in range(length)]
    for _ in range(rng.randrange(0, 4)):
        if length < 3:
            break
        n = rng.randrange(1, min(12, length - 1))
        src = rng.randrange(0, length - n)
        dst = rng.choice([length - n, rng.randrange(0, length - n)])  # often at the very end
        tokens[dst:dst + n] = tokens[src:src + n]
    return tokens


def test_matches_brute_force_on_4096_token_contexts():
    rng = random.Random(1234)
    kinds = {"match": 0, "none": 0}
    for case in range(150):
        length = 4096 if case % 3 else rng.randrange(1, 64)
        tokens = _random_context(rng, length)
        min_n = rng.randrange(1, 5)
        max_n = min_n + rng.randrange(0, 5)
        k = rng.randrange(1, 9)
        expected = reference_draft(tokens, min_n, max_n, k)
        assert find_ngram_draft(tokens, min_n, max_n, k) == expected, (case, min_n, max_n, k)
        kinds["match" if expected else "none"] += 1
    assert kinds["match"] > 30 and kinds["none"] > 10


def test_matches_brute_force_when_the_sequence_grows_token_by_token():
    """As the engine calls it: the same sequence, one token longer each step."""
    rng = random.Random(99)
    tokens = [rng.randrange(6) for _ in range(300)]
    for end in range(1, len(tokens) + 1):
        assert find_ngram_draft(tokens[:end], 2, 4, 3) == reference_draft(tokens[:end], 2, 4, 3)


# ---- the context cap, through the engine --------------------------------------------------------

def _spec_counts(llm: LLM) -> tuple[int, int]:
    m = {x.name: x for x in llm.get_metrics()}
    return (m["quickdraft:spec_decode_num_draft_tokens"].value,
            m["quickdraft:spec_decode_num_accepted_tokens"].value)


@pytest.mark.parametrize("max_model_len", [83, 96])
def test_drafts_never_run_past_max_model_len(tiny_checkpoint, max_model_len):
    path = str(tiny_checkpoint("mistral"))
    cap = max_model_len
    prompts = [{"prompt_token_ids": p} for p in self_copy_prompts(
        LLM(path, dtype="float32", device="cpu", max_model_len=256), [cap - 13, cap - 8, cap - 5, cap - 2, cap - 1],
        seed=cap)]
    sp = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    plain = LLM(path, dtype="float32", device="cpu", max_model_len=cap)
    spec = LLM(path, dtype="float32", device="cpu", max_model_len=cap,
               speculative_config={"method": "ngram", "num_speculative_tokens": 5,
                                   "prompt_lookup_min": 1, "prompt_lookup_max": 3})
    ref = plain.generate(prompts, sp, use_tqdm=False)
    out = spec.generate(prompts, sp, use_tqdm=False)
    drafted, accepted = _spec_counts(spec)
    assert drafted > 0 and accepted > 0
    for p, r, o in zip(prompts, ref, out):
        n = len(p["prompt_token_ids"])
        assert n + len(o.outputs[0].token_ids) == cap  # filled exactly up to the cap, never past it
        assert o.outputs[0].token_ids == r.outputs[0].token_ids
        assert o.outputs[0].finish_reason == "length"
        # the copy really happened: the output repeats the prompt's head
        assert o.outputs[0].token_ids == p["prompt_token_ids"][:len(o.outputs[0].token_ids)]
    bm = spec.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
