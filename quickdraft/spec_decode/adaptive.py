"""Adaptive draft length: how many tokens to draft for a sequence, from its recent acceptance,
what verification costs on this machine, and the batch size. Any choice keeps outputs exact
(greedy stays token-identical, sampling keeps the target law); it only decides how much
verification work is spent on drafts.

Two limits, the smaller wins:

* the run-length rule (``update``): double k after a fully accepted draft, halve it after a
  full miss, else one past the accepted run;
* the cost rule (``worth``): with p the sequence's estimated probability that a draft token is
  accepted given the previous one was, a draft of k tokens yields on average
      E(k) = 1 + p + ... + p^k = (1 - p^(k+1)) / (1 - p)
  tokens in a step that costs cost[k] plain steps (step_cost.py, measured at start; in a batch of
  B the extra rows slow the step for all B sequences, see ``cost``). Drafting k
  tokens is worth it only if E(k) / cost[k] > 1 (faster than plain decoding); among those, the
  largest k within ``tolerance`` of the best ratio is taken (cost timings are noisy, and near a
  tie the longer draft wins more when acceptance runs are long).

Drafts that know their own odds (suffix decoding's cumulative probabilities) are then cut by
``trim`` to the prefix with the best expected tokens per cost.

p is a discounted count: after each verification, hits = decay * hits + accepted and
misses = decay * misses + (1 if a draft token was rejected), p = (hits + 1) / (hits + misses + 2).
"""

from __future__ import annotations

from dataclasses import dataclass

from quickdraft.spec_decode.step_cost import step_time


@dataclass(frozen=True)
class DraftLengthPolicy:
    max_k: int
    probe_interval: int = 4  # steps without drafting before trying one token again
    rows_budget: int = 128  # verification rows per step (sum of k_i + 1) worth spending on drafts
    step_cost: tuple[float, ...] | None = None  # cost[k], k = 0..max_k, in plain steps; None: free
    decay: float = 0.8
    tolerance: float = 0.05
    fixed: bool = False  # draft_length_policy="fixed": always max_k, none of the rules below
    # ((R, seconds), ...): a step of R rows (step_cost.measure_row_times); None: batch 1's costs
    row_time: tuple[tuple[int, float], ...] | None = None

    def update(self, k: int, drafted: int, accepted: int) -> int:
        """Next draft length after a verification of ``drafted`` tokens, ``accepted`` of them
        accepted: double after a full hit, halve after a full miss, else one past the hit."""
        if drafted == 0:
            return k
        if accepted == drafted:
            return min(self.max_k, max(1, 2 * drafted, k))
        if accepted == 0:
            return drafted // 2
        return min(self.max_k, accepted + 1)

    def for_batch(self, k: int, batch_size: int) -> int:
        """Cap k so that a large batch does not spend its step verifying drafts."""
        return max(0, min(k, self.rows_budget // max(batch_size, 1) - 1))

    def observe(self, hits: float, misses: float, drafted: int, accepted: int) -> tuple[float, float]:
        """The sequence's discounted (hits, misses) after a verification."""
        if drafted == 0:
            return hits, misses
        return self.decay * hits + accepted, self.decay * misses + (1.0 if accepted < drafted else 0.0)

    @staticmethod
    def acceptance(hits: float, misses: float) -> float:
        return (hits + 1.0) / (hits + misses + 2.0)

    @staticmethod
    def expected_tokens(k: int, p: float) -> float:
        """E(k): tokens a step emits on average with a k-token draft, p per token as above."""
        return float(k + 1) if p >= 1.0 else (1.0 - p ** (k + 1)) / (1.0 - p)

    def cost(self, k: int, batch: int = 1) -> float:
        """What drafting k tokens costs one of ``batch`` running sequences, in its plain steps.
        Alone, the measured cost[k]. In a batch the step is shared: k more rows make the step of
        B rows last T(B + k) / T(B) as long for all B sequences, so per sequence, in the batch's
        plain-step throughput, 1 + B * (T(B + k) - T(B)) / T(B) (never below the alone cost)."""
        alone = self.step_cost[k]
        if batch <= 1 or self.row_time is None or k == 0:
            return alone
        t = step_time(self.row_time, batch)
        return max(alone, 1.0 + batch * (step_time(self.row_time, batch + k) - t) / t)

    def worth(self, k: int, p: float, batch: int = 1) -> int:
        """The draft length in [0, k] that the cost rule allows (0: plain decoding is faster)."""
        if self.step_cost is None or k <= 0:
            return max(k, 0)
        k = min(k, len(self.step_cost) - 1)
        ratios = [self.expected_tokens(j, p) / self.cost(j, batch) for j in range(k + 1)]
        best = max(ratios)
        for j in range(k, 0, -1):
            if ratios[j] > 1.0 and ratios[j] >= (1.0 - self.tolerance) * best:
                return j
        return 0

    def trim(self, probs: list[float], p: float | None = None, batch: int = 1) -> int:
        """How much of a draft that knows its own odds to verify: the length j in
        [0, len(probs)] that maximises (1 + probs[0] + ... + probs[j-1]) / cost[j], probs[i]
        being the draft's estimate that its first i + 1 tokens are all accepted (suffix
        decoding's cumulative empirical probabilities), each capped by p^(i+1) when the
        sequence's record p is given. 0 when no length beats plain decoding."""
        if self.fixed or self.step_cost is None:
            return len(probs)
        best_j, best, gain, q = 0, 1.0, 1.0, 1.0
        for j in range(1, min(len(probs), len(self.step_cost) - 1) + 1):
            c = probs[j - 1]
            if p is not None:
                q *= p
                c = min(c, q)
            gain += c
            ratio = gain / self.cost(j, batch)
            if ratio > best * (1.0 + 1e-9):
                best_j, best = j, ratio
        return best_j

    def break_even(self) -> float:
        """The lowest acceptance p at which some draft length beats plain decoding (1.0: none)."""
        lo, hi = 0.0, 1.0
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if self.worth(self.max_k, mid) > 0 else (mid, hi)
        return hi
