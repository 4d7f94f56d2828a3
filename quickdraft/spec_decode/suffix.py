"""Suffix decoding (Oliaro et al., arXiv 2411.04975): drafts from suffix tries of earlier text.

Two tries answer "what followed the text I am looking at, and how often":

* the request's own trie over its prompt and the tokens it has generated so far (prompt lookup,
  with frequencies instead of the first occurrence);
* a global trie over the outputs of earlier requests (and of the running ones as they grow),
  keeping the ``max_cached_requests`` most recently finished ones, so that what repeats *across*
  requests (the same JSON keys, the same refactoring, an agent's recurring tool calls) is drafted.

Both are depth-limited suffix tries with occurrence counts (``SuffixTrie``). For the context's
last m tokens s (a "match" of length m), the empirical law of the next token is
count[s + t] / out[s], with out[s] the number of occurrences of s that some token follows. A
draft follows the most frequent continuation from s while the draft's cumulative empirical
probability P_j = p_1 * ... * p_j stays >= ``min_token_prob``, for at most
min(k, floor(m * max_spec_factor), max_depth - m) tokens (the trie stores strings of at most
max_depth tokens, so match and draft share that depth). Its score is the expected number of
accepted tokens under that law, sum_j P_j. Every match length of both tries is tried and the
best score wins (a tie goes to the longer match, then to the request's own trie).

Updates are incremental: appending a token to a sequence touches at most one node per depth
(the sequence keeps its "active" places, those of its last 0..max_depth-1 tokens), so it costs
O(max_depth) dictionary operations whatever the number of cached requests; text seen only once
is not stored node by node (``SuffixTrie``: pointers into the sequence instead). Evicting a request
replays its tokens with decrements, at most ``evict_budget`` tokens per update so that no step
pays for a whole eviction at once.

Pure Python over token ids; the engine adapter is ``SuffixProposer`` in proposer.py.
"""

from __future__ import annotations

from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Sequence

_ROOT = 0
_NONE = -1
_DIRTY = -2  # best child unknown after a decrement: recomputed when next needed
_STRIDE = 1 << 32  # edge key = parent * _STRIDE + token (token ids < 2**32)


class _SeqState:
    """A sequence stored in a trie: its tokens and, for each depth d < max_depth, the place of
    its last d tokens (node, extra): the deepest stored node on that string's path and how many
    tokens of the sequence follow it virtually (0: the string is a node)."""

    __slots__ = ("tokens", "nodes", "extras", "live")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.nodes = [_ROOT]
        self.extras = [0]
        self.live = True  # False once its eviction has started


class SuffixTrie:
    """Depth-limited suffix trie with occurrence counts over a set of token sequences.

    String s (of at most max_depth tokens) has count(s) = the number of positions of the stored
    sequences where s ends; out(s) = the sum of its continuations' counts. Path-compressed the
    simple way: a string is stored as a node only once it occurs twice, or where its parent
    branches; a string that occurs once, below a stored node that occurred once and has no
    children, is "virtual": the node keeps a pointer to its one occurrence (sequence, position)
    and the sequence's own tokens spell out the rest. Memory is then about a few nodes per
    stored token rather than max_depth. When a second occurrence reaches a virtual string, its
    path is stored one node at a time as the newcomer walks it ("split").

    Nodes live in flat arrays; children hang off a doubly linked sibling list (enumerated only to
    find a new most frequent child after a decrement) and are found through one dictionary of
    edges. Sequences are appended to with ``append`` and evicted with ``retract``.
    """

    def __init__(self, max_depth: int) -> None:
        if max_depth < 2:
            raise ValueError(f"max_depth must be at least 2, got {max_depth}.")
        self.max_depth = max_depth
        self._edges: dict[int, int] = {}
        self._count = array("q", [0])
        self._out = array("q", [0])
        self._token = array("q", [_NONE])
        self._depth = array("q", [0])
        self._first = array("q", [_NONE])  # first child
        self._next = array("q", [_NONE])  # next sibling
        self._prev = array("q", [_NONE])  # previous sibling
        self._best = array("q", [_NONE])  # most frequent child, or _DIRTY
        self._second = array("q", [0])  # an upper bound on the counts of the children but the best
        # (of all children while the best is _DIRTY)
        self._occ_seq = array("q", [_NONE])  # a count-1 leaf's occurrence: sequence id ...
        self._occ_pos = array("q", [_NONE])  # ... and the position of its string's last token
        self._free: list[int] = []
        self._size = 1  # nodes in use or free (the arrays are allocated ahead)
        self._seqs: dict[int, _SeqState] = {}
        # Evictions in progress: sid -> (next token index, nodes, extras, zeroed nodes).
        self._retracting: dict[int, tuple[int, list[int], list[int], list[int]]] = {}

    # ---- reading ---------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return self._size - len(self._free) - 1

    def _virtual_tail(self, node: int, extra: int) -> tuple[list[int], int] | None:
        """(tokens, start): where the virtual continuation of node (+ extra tokens) reads on,
        when node is a count-1 leaf whose occurrence is still stored."""
        if self._first[node] != _NONE or self._count[node] != 1:
            return None
        st = self._seqs.get(self._occ_seq[node])
        if st is None or not st.live:
            return None
        return st.tokens, self._occ_pos[node] + extra + 1

    def find(self, tokens: Sequence[int]) -> tuple[int, int] | None:
        """(node, extra) of ``tokens`` (at most max_depth of them), or None if they never occurred."""
        if len(tokens) > self.max_depth:
            return None
        node = _ROOT
        edges = self._edges
        for j, t in enumerate(tokens):
            c = edges.get(node * _STRIDE + t, _NONE)
            if c == _NONE:
                tail = self._virtual_tail(node, 0) if node != _ROOT else None
                if tail is None:
                    return None
                seq, start = tail
                rest = list(tokens[j:])
                return (node, len(rest)) if seq[start:start + len(rest)] == rest else None
            node = c
        return node, 0

    def count_of(self, tokens: Sequence[int]) -> int:
        place = self.find(tokens)
        if place is None:
            return 0
        return self._count[place[0]] if place[1] == 0 else 1

    def continuations(self, node: int) -> dict[int, int]:
        """{token: count} of the tokens that followed ``node``'s string."""
        tail = self._virtual_tail(node, 0)
        if tail is not None:
            seq, start = tail
            return {seq[start]: 1} if start < len(seq) and self._depth[node] < self.max_depth else {}
        out = {}
        c = self._first[node]
        while c != _NONE:
            out[self._token[c]] = self._count[c]
            c = self._next[c]
        return out

    def best_child(self, node: int) -> int:
        b = self._best[node]
        if b == _DIRTY:
            b, top, second = _NONE, 0, 0
            c = self._first[node]
            count, nxt, token = self._count, self._next, self._token
            while c != _NONE:
                if b == _NONE or count[c] > top or (count[c] == top and token[c] < token[b]):
                    b, top, second = c, count[c], top
                else:
                    second = max(second, count[c])
                c = nxt[c]
            self._best[node], self._second[node] = b, second
        return b

    def greedy_path(self, node: int, extra: int, max_tokens: int, min_prob: float) -> tuple[list[int], list[float]]:
        """Follow the most frequent continuation from the string at (node, extra) while the
        cumulative empirical probability stays >= min_prob, for at most max_tokens tokens (the
        caller keeps within max_depth). Returns (tokens, probs), probs[j] = the cumulative
        probability of tokens[:j + 1] (their sum: the expected number of accepted tokens)."""
        tokens: list[int] = []
        prob = 1.0
        probs: list[float] = []
        count, out, token = self._count, self._out, self._token
        tail = self._virtual_tail(node, extra) if node != _ROOT else None
        if extra > 0 and tail is None:  # its one occurrence was evicted meanwhile
            return tokens, probs
        while tail is None and len(tokens) < max_tokens and out[node] > 0:
            if self._best[node] == _DIRTY and prob * self._second[node] < min_prob * out[node]:
                return tokens, probs  # no child can pass: skip finding the most frequent one
            c = self.best_child(node)
            prob *= count[c] / out[node]
            if prob < min_prob:
                return tokens, probs
            tokens.append(token[c])
            probs.append(prob)
            node = c
            tail = self._virtual_tail(node, 0)
        if tail is not None:  # one occurrence: its continuation has probability 1
            seq, start = tail
            for t in seq[start:start + max_tokens - len(tokens)]:
                tokens.append(t)
                probs.append(prob)
        return tokens, probs

    def has_sequence(self, sid: int) -> bool:
        return sid in self._seqs

    def num_tokens(self, sid: int) -> int:
        st = self._seqs.get(sid)
        return len(st.tokens) if st is not None else 0

    def active(self, sid: int) -> tuple[list[int], list[int]]:
        """The (nodes, extras) of a stored sequence's last 0..max_depth-1 tokens."""
        st = self._seqs[sid]
        return st.nodes, st.extras

    def suffix_places(self, context: Sequence[int]) -> tuple[list[int], list[int]]:
        """(nodes, extras)[m] = the place of the last m tokens of ``context`` (m = 0 is the
        root), for m up to max_depth - 1 or the longest that occurs (a longer match contains
        the shorter one, so none is missed)."""
        tail = list(context[-(self.max_depth - 1):])
        nodes, extras = [_ROOT], [0]
        for m in range(1, len(tail) + 1):
            place = self.find(tail[len(tail) - m:])
            if place is None:
                break
            nodes.append(place[0])
            extras.append(place[1])
        return nodes, extras

    # ---- writing ---------------------------------------------------------------------------
    def _new_node(self, parent: int, token: int, sid: int, pos: int) -> int:
        if self._free:
            c = self._free.pop()
        else:
            c = self._size
            if c == len(self._count):  # grow every array by half at once
                extra = max(64, c // 2)
                for arr in (self._count, self._out, self._token, self._depth, self._first, self._next, self._prev,
                            self._best, self._second, self._occ_seq, self._occ_pos):
                    arr.extend(array("q", [0]) * extra)
            self._size = c + 1
        self._count[c] = self._out[c] = self._second[c] = 0
        self._token[c] = token
        self._first[c] = self._best[c] = _NONE
        self._depth[c] = self._depth[parent] + 1
        self._occ_seq[c], self._occ_pos[c] = sid, pos
        head = self._first[parent]
        self._next[c], self._prev[c] = head, _NONE
        if head != _NONE:
            self._prev[head] = c
        self._first[parent] = c
        self._edges[parent * _STRIDE + token] = c
        return c

    def _unlink(self, parent: int, c: int) -> None:
        del self._edges[parent * _STRIDE + self._token[c]]
        p, n = self._prev[c], self._next[c]
        if p != _NONE:
            self._next[p] = n
        else:
            self._first[parent] = n
        if n != _NONE:
            self._prev[n] = p

    def _bump(self, parent: int, c: int, by: int) -> None:
        """count[c] += by for c a child of parent, keeping parent's most frequent child (ties to
        the smaller token id) without scanning the siblings unless the best one falls to the
        bound on the others (``_second``)."""
        count = self._count
        count[c] += by
        self._out[parent] += by
        if parent == _ROOT:  # the root's best child is never asked for
            return
        best, second = self._best, self._second
        b = best[parent]
        if b == _DIRTY:  # second[parent] bounds every child's count
            if count[c] > second[parent]:
                second[parent] = count[c]
        elif by < 0:
            if b == c and count[c] <= second[parent]:
                best[parent] = _DIRTY
        elif b == _NONE:
            best[parent], second[parent] = c, 0
        elif b != c:
            if count[c] > count[b] or (count[c] == count[b] and self._token[c] < self._token[b]):
                best[parent], second[parent] = c, count[b]
            elif count[c] > second[parent]:
                second[parent] = count[c]

    def _split(self, c: int, sid: int, pos: int) -> None:
        """c (a count-1 leaf) is about to get a second occurrence: store the next node of its
        first occurrence's virtual path, unless that token is the one being appended now
        (sequence ``sid`` at ``pos``), which the caller counts itself."""
        tail = self._virtual_tail(c, 0)
        if tail is None or self._depth[c] >= self.max_depth:
            return
        seq, start = tail
        if start >= len(seq) or (self._occ_seq[c] == sid and start >= pos):
            return
        cu = self._new_node(c, seq[start], self._occ_seq[c], start)
        self._bump(c, cu, 1)

    def _catch_up(self, node: int, e: int, tokens: list[int], i: int) -> tuple[int, int]:
        """The place (node, e) of a sequence's string ending before position i, moved down the
        nodes another occurrence may have stored on its virtual path since."""
        edges = self._edges
        while e:
            c = edges.get(node * _STRIDE + tokens[i - e], _NONE)
            if c == _NONE:
                break
            node, e = c, e - 1
        return node, e

    def append(self, sid: int, token: int) -> None:
        """Count ``token`` appended to sequence ``sid`` (a new sequence starts empty)."""
        st = self._seqs.get(sid)
        if st is None:
            st = self._seqs[sid] = _SeqState()
        tokens = st.tokens
        i = len(tokens)
        tokens.append(token)
        edges, count, first = self._edges, self._count, self._first
        nodes, extras = [_ROOT], [0]
        depth_cap = self.max_depth - 1
        prev_nodes, prev_extras = st.nodes, st.extras
        for d in range(len(prev_nodes)):
            node, e = prev_nodes[d], prev_extras[d]
            if e:
                if first[node] != _NONE:
                    node, e = self._catch_up(node, e, tokens, i)
                if e:  # still virtual: one more token of the same single occurrence
                    if d < depth_cap:
                        nodes.append(node)
                        extras.append(e + 1)
                    continue
            c = edges.get(node * _STRIDE + token, _NONE)
            if c != _NONE:
                if count[c] == 1 and first[c] == _NONE:
                    self._split(c, sid, i)
                self._bump(node, c, 1)
            elif node != _ROOT and count[node] == 1 and first[node] == _NONE:
                # The string occurs only here: its continuation stays virtual.
                self._occ_seq[node], self._occ_pos[node] = sid, i - 1
                if d < depth_cap:
                    nodes.append(node)
                    extras.append(1)
                continue
            else:
                c = self._new_node(node, token, sid, i)
                self._bump(node, c, 1)
            if d < depth_cap:
                nodes.append(c)
                extras.append(0)
        st.nodes, st.extras = nodes, extras

    def extend(self, sid: int, tokens: Iterable[int]) -> None:
        for t in tokens:
            self.append(sid, t)

    def retract(self, sid: int, max_tokens: int) -> int:
        """Evict sequence ``sid``: undo its appends from its start, at most ``max_tokens`` of
        them in this call; returns how many were undone (0 once the sequence is gone). Nodes
        whose count reaches 0 are detached at once and freed when the sequence is done (later
        tokens still walk through them)."""
        st = self._seqs.get(sid)
        if st is None:
            return 0
        st.live = False
        i0, nodes_, extras_, zeroed = self._retracting.pop(sid, None) or (0, [_ROOT], [0], [])
        tokens = st.tokens
        edges, count = self._edges, self._count
        depth_cap = self.max_depth - 1
        end = min(len(tokens), i0 + max_tokens)
        for i in range(i0, end):
            token = tokens[i]
            nodes, extras = [_ROOT], [0]
            for d, (node, e) in enumerate(zip(nodes_, extras_)):
                if e:
                    node, e = self._catch_up(node, e, tokens, i)
                if e == 0:
                    c = edges.get(node * _STRIDE + token, _NONE)
                    if c == _NONE:  # counted virtually: nothing stored
                        e = 1
                    else:
                        self._bump(node, c, -1)
                        if count[c] == 0:
                            self._unlink(node, c)
                            zeroed.append(c)
                        node = c
                else:
                    e += 1
                if d < depth_cap:
                    nodes.append(node)
                    extras.append(e)
            nodes_, extras_ = nodes, extras
        if end == len(tokens):
            del self._seqs[sid]
            self._free.extend(zeroed)
        else:
            self._retracting[sid] = (end, nodes_, extras_, zeroed)
        return end - i0


@dataclass
class SuffixDraft:
    token_ids: list[int]
    score: float  # expected accepted tokens under the trie's empirical law: sum(probs)
    match_len: int
    source: str  # "request" or "global" ("" when empty)
    probs: list[float] = field(default_factory=list)  # cumulative probability of each prefix


def best_draft(trie: SuffixTrie, places: tuple[Sequence[int], Sequence[int]], k: int, max_spec_factor: float,
               min_token_prob: float, source: str, beat: float = 0.0) -> SuffixDraft:
    """The best-scoring draft from ``trie`` given the places of the context's suffixes
    (``SuffixTrie.suffix_places``, or a stored sequence's ``active``), if it scores more than
    ``beat``; see the module doc. Longest matches first: a draft of at most ``cap`` tokens
    scores at most ``cap``, so shorter matches that cannot win are skipped."""
    best = SuffixDraft([], beat, 0, "")
    depth = trie.max_depth
    nodes, extras = places
    for m in range(len(nodes) - 1, 0, -1):
        cap = min(k, int(m * max_spec_factor), depth - m)
        if cap <= best.score:
            continue
        tokens, probs = trie.greedy_path(nodes[m], extras[m], cap, min_token_prob)
        score = sum(probs)
        if tokens and score > best.score:
            best = SuffixDraft(tokens, score, m, source, probs)
    return best if best.token_ids else SuffixDraft([], 0.0, 0, "")


class SuffixCache:
    """The global trie and the running sequences' own tries, keyed by sequence id.

    ``update(seq_id, token_ids, num_prompt)`` brings a sequence up to date (incrementally);
    ``speculate`` drafts for it; ``finish`` keeps its output as one of the cached requests,
    evicting the oldest beyond ``max_cached_requests`` (0: no global trie at all), at most
    ``evict_budget`` tokens per call."""

    def __init__(self, max_tree_depth: int = 24, max_cached_requests: int = 10000,
                 max_spec_factor: float = 1.0, min_token_prob: float = 0.1, evict_budget: int = 256) -> None:
        self.max_tree_depth = max_tree_depth
        self.max_cached_requests = max_cached_requests
        self.max_spec_factor = max_spec_factor
        self.min_token_prob = min_token_prob
        self.evict_budget = evict_budget
        self.global_trie = SuffixTrie(max_tree_depth) if max_cached_requests > 0 else None
        self._local: dict[int, SuffixTrie] = {}
        self._finished: deque[int] = deque()  # sequences whose output is cached, oldest first
        self._to_evict: deque[int] = deque()

    @property
    def num_cached_requests(self) -> int:
        return len(self._finished)

    def update(self, seq_id: int, token_ids: Sequence[int], num_prompt: int) -> None:
        local = self._local.get(seq_id)
        if local is None:
            local = self._local[seq_id] = SuffixTrie(self.max_tree_depth)
        seen = local.num_tokens(0)
        if seen < len(token_ids):
            local.extend(0, token_ids[seen:])
        self._update_global(seq_id, token_ids, num_prompt)
        self._evict_some()

    def _update_global(self, seq_id: int, token_ids: Sequence[int], num_prompt: int) -> None:
        trie = self.global_trie
        if trie is not None:
            have = num_prompt + trie.num_tokens(seq_id)
            if have < len(token_ids):
                trie.extend(seq_id, token_ids[have:])

    def speculate(self, seq_id: int, token_ids: Sequence[int], k: int, after: Sequence[int] = ()) -> SuffixDraft:
        """The best draft of at most k tokens to follow ``token_ids`` (``update`` it first), or
        to follow ``token_ids + after`` when tokens not emitted yet (a grammar's forced ones)
        come first."""
        local = self._local[seq_id]
        context = list(token_ids[-self.max_tree_depth:]) + list(after) if after else token_ids
        places = local.suffix_places(context) if after else local.active(0)
        draft = best_draft(local, places, k, self.max_spec_factor, self.min_token_prob, "request")
        if self.global_trie is not None:
            other = best_draft(self.global_trie, self.global_trie.suffix_places(context), k,
                               self.max_spec_factor, self.min_token_prob, "global", beat=draft.score)
            if other.token_ids:
                draft = other
        return draft

    def finish(self, seq_id: int, token_ids: Sequence[int], num_prompt: int) -> None:
        """The sequence is done (finished or aborted): drop its own trie; its whole output
        stays in the global trie as one of the cached requests."""
        self._local.pop(seq_id, None)
        if self.global_trie is None:
            return
        self._update_global(seq_id, token_ids, num_prompt)
        self._finished.append(seq_id)
        while len(self._finished) > self.max_cached_requests:
            self._to_evict.append(self._finished.popleft())
        self._evict_some()

    def _evict_some(self) -> None:
        budget = self.evict_budget
        while budget > 0 and self._to_evict:
            done = self.global_trie.retract(self._to_evict[0], budget)
            budget -= done
            if not self.global_trie.has_sequence(self._to_evict[0]):
                self._to_evict.popleft()
