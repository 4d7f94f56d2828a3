"""The suffix-decoding drafter (spec_decode/suffix.py) against a brute-force oracle that counts
substrings directly, with hand-computed cases, and eviction down to an empty trie."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from quickdraft.spec_decode.suffix import SuffixCache, SuffixTrie, best_draft


def substring_counts(seqs: list[list[int]], depth: int) -> Counter:
    """count[s] for every string s of 1..depth tokens: the positions where s ends."""
    c: Counter = Counter()
    for seq in seqs:
        for end in range(1, len(seq) + 1):
            for m in range(1, min(depth, end) + 1):
                c[tuple(seq[end - m:end])] += 1
    return c


def oracle_draft(seqs: list[list[int]], context: list[int], depth: int, k: int, factor: float,
                 min_prob: float) -> tuple[list[int], float, int]:
    """The module doc's rule computed from substring counts: for each match length m, follow the
    most frequent continuation (ties: smaller token id) while the cumulative probability stays
    >= min_prob, up to min(k, floor(m * factor), depth - m) tokens; best score wins, ties to
    the longer match."""
    counts = substring_counts(seqs, depth)
    best: tuple[list[int], float, int] = ([], 0.0, 0)
    for m in range(1, min(len(context), depth - 1) + 1):
        s = tuple(context[-m:])
        if counts[s] == 0:
            break
        cap = min(k, int(m * factor), depth - m)
        tokens, prob, score = [], 1.0, 0.0
        while len(tokens) < cap:
            cont = {key[-1]: v for key, v in counts.items() if len(key) == len(s) + 1 and key[:-1] == s}
            if not cont:
                break
            top = max(cont.values())
            t = min(tok for tok, v in cont.items() if v == top)
            prob *= top / sum(cont.values())
            if prob < min_prob:
                break
            tokens.append(t)
            score += prob
            s = s + (t,)
        if tokens and score >= best[1]:
            best = (tokens, score, m)
    return best


def build(seqs: list[list[int]], depth: int, interleave: bool = False) -> SuffixTrie:
    """A trie over ``seqs``, appended one after the other or token by token in turn."""
    trie = SuffixTrie(depth)
    if interleave:
        for j in range(max(map(len, seqs))):
            for sid, seq in enumerate(seqs):
                if j < len(seq):
                    trie.append(sid, seq[j])
    else:
        for sid, seq in enumerate(seqs):
            trie.extend(sid, seq)
    return trie


def assert_counts(trie: SuffixTrie, seqs: list[list[int]], depth: int, vocab: int) -> None:
    """Every occurring string counted exactly, and strings one token longer (which may not
    occur) counted 0."""
    counts = substring_counts(seqs, depth)
    for s, v in counts.items():
        assert trie.count_of(s) == v, s
        for t in range(vocab):
            if len(s) < depth:
                assert trie.count_of(s + (t,)) == counts.get(s + (t,), 0), s + (t,)


def assert_drafts(trie: SuffixTrie, seqs: list[list[int]], vocab: int, rng: random.Random, n: int = 30) -> None:
    for _ in range(n):
        ctx = [rng.randrange(vocab) for _ in range(rng.randrange(1, 12))]
        k = rng.randrange(1, 10)
        factor = rng.choice([0.5, 1.0, 2.0])
        min_prob = rng.choice([0.0, 0.1, 0.4])
        got = best_draft(trie, trie.suffix_places(ctx), k, factor, min_prob, "global")
        want = oracle_draft(seqs, ctx, trie.max_depth, k, factor, min_prob)
        assert (got.token_ids, got.match_len) == (want[0], want[2]), (ctx, k, factor, min_prob)
        assert got.score == pytest.approx(want[1])


def test_hand_computed_counts_and_draft():
    # "a b c a b d a b c": after "a b", c followed twice and d once.
    a, b, c, d = 1, 2, 3, 4
    trie = build([[a, b, c, a, b, d, a, b, c]], depth=4)
    ab, extra = trie.find([a, b])
    assert extra == 0 and trie.count_of([a, b]) == 3
    assert trie.continuations(ab) == {c: 2, d: 1}
    # From "a b": c with probability 2/3, then "a b c" -> a with probability 1 (the last c ends
    # the text), cumulative 2/3; the depth limit 4 allows 4 - 2 = 2 tokens.
    tokens, probs = trie.greedy_path(ab, 0, 2, 0.1)
    assert tokens == [c, a]
    assert probs == pytest.approx([2 / 3, 2 / 3])
    # A threshold above 2/3 stops before the first token.
    assert trie.greedy_path(ab, 0, 2, 0.7) == ([], [])
    # For the context "... a b", match length 2 caps the draft at floor(2 * 1.0) = 2 tokens.
    draft = best_draft(trie, trie.suffix_places([d, a, b]), 8, 1.0, 0.1, "request")
    assert draft.token_ids == [c, a] and draft.match_len == 2


@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force_oracle(seed):
    rng = random.Random(seed)
    depth = rng.choice([3, 5, 8])
    vocab = rng.choice([3, 5, 50])
    seqs = [[rng.randrange(vocab) for _ in range(rng.randrange(5, 40))] for _ in range(4)]
    trie = build(seqs, depth, interleave=seed % 2 == 1)
    assert_counts(trie, seqs, depth, min(vocab, 6))
    assert trie.num_nodes <= len(substring_counts(seqs, depth))
    assert_drafts(trie, seqs, vocab, rng)


def test_active_places_are_the_suffix_places():
    rng = random.Random(3)
    trie = SuffixTrie(6)
    seq: list[int] = []
    for _ in range(50):
        t = rng.randrange(4)
        seq.append(t)
        trie.append(0, t)
        assert trie.active(0) == trie.suffix_places(seq)


def test_text_seen_once_is_not_stored_node_by_node():
    """Path compression: distinct text costs about one node per token, not one per depth."""
    rng = random.Random(5)
    seqs = [[rng.randrange(10**6) for _ in range(300)] for _ in range(3)]
    trie = build(seqs, depth=24)
    assert trie.num_nodes <= 2 * 900
    for seq in seqs:
        assert trie.count_of(seq[100:124]) == 1 and trie.count_of(seq[100:125]) == 0


@pytest.mark.parametrize("budget", [1, 7, 10_000])
def test_eviction_keeps_the_newest_and_frees_every_node(budget):
    rng = random.Random(budget)
    outputs = [[rng.randrange(4) for _ in range(rng.randrange(3, 30))] for _ in range(7)]
    cache = SuffixCache(max_tree_depth=5, max_cached_requests=3, evict_budget=budget)
    for i, out in enumerate(outputs):
        prompt = [9, 9]
        for j in range(len(out) + 1):  # tokens arrive one at a time
            cache.update(i, prompt + out[:j], num_prompt=len(prompt))
        cache.finish(i, prompt + out, len(prompt))
    for _ in range(200):  # let a slow eviction finish
        cache._evict_some()
    kept = outputs[-3:]
    trie = cache.global_trie
    assert cache.num_cached_requests == 3
    assert_counts(trie, kept, 5, 4)
    assert_drafts(trie, kept, 4, rng)
    # Evicting everything leaves an empty trie, and freed nodes are reused.
    size = trie._size
    for sid in range(4, 7):
        while trie.retract(sid, 3):
            pass
    assert trie.num_nodes == 0 and trie.count_of([0]) == 0
    trie.extend(99, outputs[-1])
    assert trie._size == size


def test_interleaved_insertion_during_eviction():
    """Sequences keep growing while an old one is evicted a token at a time: the counts stay
    those of the live text."""
    rng = random.Random(11)
    cache = SuffixCache(max_tree_depth=4, max_cached_requests=1, evict_budget=1)
    texts = {i: [] for i in range(4)}
    for i in range(2):
        texts[i] = [rng.randrange(3) for _ in range(25)]
        cache.update(i, texts[i], 0)
        cache.finish(i, texts[i], 0)  # the second finish starts evicting the first, one token per update
    for step in range(40):
        for i in (2, 3):
            texts[i].append(rng.randrange(3))
            cache.update(i, texts[i], 0)
    live = [texts[1], texts[2], texts[3]]
    assert_counts(cache.global_trie, live, 4, 3)
    assert_drafts(cache.global_trie, live, 3, rng)


def test_request_and_global_sources():
    cache = SuffixCache(max_tree_depth=8, max_cached_requests=10)
    schema = [5, 6, 7, 8, 9, 10, 11]
    cache.update(0, [1] + schema, num_prompt=1)
    cache.finish(0, [1] + schema, 1)
    # A new request whose prompt does not hold the schema: only the global trie knows it.
    ctx = [2, 3, 5, 6, 7]
    cache.update(1, ctx, num_prompt=5)
    d = cache.speculate(1, ctx, 8)
    assert d.source == "global" and d.token_ids == [8, 9, 10]  # match 3 (+ factor 1.0) caps at 3
    # Its own text, repeated, is found in its own trie.
    ctx2 = [20, 21, 22, 23, 24, 20, 21, 22]
    cache.update(2, ctx2, num_prompt=8)
    d2 = cache.speculate(2, ctx2, 8)
    assert d2.source == "request" and d2.token_ids == [23, 24, 20]
    # With no global trie, the first request's text is forgotten.
    off = SuffixCache(max_tree_depth=8, max_cached_requests=0)
    off.update(0, [1] + schema, 1)
    off.finish(0, [1] + schema, 1)
    off.update(1, ctx, 5)
    assert off.global_trie is None and off.speculate(1, ctx, 8).token_ids == []
