"""The rejection sampler alone (a pure function over flat tensors) against exact laws.

Deterministic cases check the emitted tokens exactly; distribution cases draw drafts from a
known draft law q, verify them against a known target law p, and compare what comes out with
the law it must follow (p at every position: Leviathan et al. 2023, Chen et al. 2023) by a
chi-square test. Every random draw comes from an explicitly seeded torch.Generator, so the
tests are deterministic; thresholds are set so that a correct sampler fails with probability
below 1e-5 per assertion.
"""

from __future__ import annotations

import math

import pytest
import torch

from quickdraft.sample.sampler import exponential_noise, sample_from_probs
from quickdraft.spec_decode.rejection_sampler import rejection_sample
from stats import chi_square_pvalue

P_MIN = 1e-5  # chi-square p-value threshold


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def binomial_tolerance(prob: float, n: int, sigmas: float = 5.0) -> float:
    """5 standard deviations of a proportion over n trials (two-sided miss rate < 6e-7)."""
    return sigmas * math.sqrt(max(prob * (1 - prob), 1e-12) / n) + 1e-12


def law(*weights: float) -> torch.Tensor:
    t = torch.tensor(weights, dtype=torch.float64)
    return (t / t.sum()).float()


def random_law(V: int, g: torch.Generator, zeros: int = 0) -> torch.Tensor:
    w = torch.rand(V, generator=g, dtype=torch.float64) + 0.05
    if zeros:
        w[torch.randperm(V, generator=g)[:zeros]] = 0.0
    return (w / w.sum()).float()


# ---- deterministic cases ---------------------------------------------------------------------

def test_greedy_all_drafts_match_emits_them_and_the_bonus_argmax():
    argmax = torch.tensor([7, 3, 9, 11])  # row j: the target's greedy token after j drafts
    res = rejection_sample(None, argmax, [[7, 3, 9]], [None], [True], [gen(0)])
    assert res.emitted == [[7, 3, 9, 11]]
    assert res.num_accepted == [3]


@pytest.mark.parametrize("drafts, emitted", [
    ([7, 5, 9], [7, 3]),  # mismatch at position 1: keep the prefix, emit the argmax there
    ([8, 3, 9], [7]),  # mismatch at position 0: nothing accepted
    ([7, 3, 1], [7, 3, 9]),  # mismatch at the last position
])
def test_greedy_early_mismatch_emits_prefix_then_argmax(drafts, emitted):
    argmax = torch.tensor([7, 3, 9, 11])
    res = rejection_sample(None, argmax, [drafts], [None], [True], [gen(0)])
    assert res.emitted == [emitted]
    assert res.num_accepted == [len(emitted) - 1]


def test_ragged_batch_with_zero_draft_rows_keeps_every_row_aligned():
    V = 12

    def onehot(t: int) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor(t), V).float()

    # Sequences, each owning k_i + 1 consecutive rows:
    #  A greedy,  drafts [1, 2]    -> argmax rows 1, 2, 3   -> all accepted, bonus 3
    #  B sampled, no draft         -> p row one-hot 4      -> emits 4
    #  C greedy,  no draft         -> argmax row 5         -> emits 5
    #  D sampled, drafts [6, 7, 8], q = p (one-hot)         -> all accepted, bonus from p row = 9
    #  E greedy,  drafts [10]      -> argmax rows 11, 0     -> rejected, emits 11
    #  F sampled, one-hot draft [3] with p(3) = 0           -> rejected, residual = one-hot 2
    argmax = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 0, 2, 1])
    probs = torch.stack([onehot(int(t)) for t in argmax])  # greedy rows' laws are not read
    drafts = [[1, 2], [], [], [6, 7, 8], [10], [3]]
    q_d = probs[5:8].clone()  # D's draft law equals its target law
    draft_probs = [None, None, None, q_d, None, None]
    greedy = [True, False, True, False, True, False]
    res = rejection_sample(probs, argmax, drafts, draft_probs, greedy, [gen(i) for i in range(6)])
    assert res.emitted == [[1, 2, 3], [4], [5], [6, 7, 8, 9], [11], [2]]
    assert res.num_accepted == [2, 0, 0, 3, 0, 0]


def test_all_rejected_sampled_rows_emit_one_recovered_token_from_the_residual():
    V = 8
    p = law(0, 0, 3, 1, 0, 0, 0, 0)  # support {2, 3}
    q = law(1, 1, 0, 0, 0, 0, 0, 0)  # support disjoint from p: every draft is rejected
    n = 400
    g = gen(1)
    res = rejection_sample(p.repeat(n * 3, 1), torch.full((n * 3,), 2),
                           [[0, 1]] * n, [q.repeat(2, 1)] * n, [False] * n, [g] * n)
    assert res.num_accepted == [0] * n
    tokens = torch.tensor([e[0] for e in res.emitted])
    assert all(len(e) == 1 for e in res.emitted)
    counts = torch.bincount(tokens, minlength=V)
    # residual = normalize(max(p - q, 0)) = p here
    assert chi_square_pvalue(counts, p) > P_MIN
    # one-hot drafts of zero probability are always rejected too
    res = rejection_sample(p.repeat(n * 2, 1), torch.zeros(n * 2, dtype=torch.long),
                           [[5]] * n, [None] * n, [False] * n, [g] * n)
    assert res.num_accepted == [0] * n
    assert all(e[0] in (2, 3) for e in res.emitted)


def test_draft_law_equal_to_target_law_accepts_everything():
    V, k, n = 7, 3, 300
    g = gen(2)
    laws = torch.stack([random_law(V, g, zeros=2) for _ in range(k + 1)])  # [k + 1, V]
    drafts = [torch.multinomial(laws[:k], 1, generator=g).squeeze(1).tolist() for _ in range(n)]
    res = rejection_sample(laws.repeat(n, 1), laws.argmax(1).repeat(n), drafts, [laws[:k].clone()] * n,
                           [False] * n, [g] * n)
    assert res.num_accepted == [k] * n
    assert [e[:k] for e in res.emitted] == drafts
    assert all(laws[k, e[k]] > 0 for e in res.emitted)


# ---- randomness: seeds, batch invariance, no extra draws -----------------------------------

def _random_batch(seed: int, n: int, V: int = 9, k: int = 3):
    g = gen(seed)
    probs, drafts, qs = [], [], []
    for i in range(n):
        ki = i % (k + 1)
        rows = torch.stack([random_law(V, g, zeros=2) for _ in range(ki + 1)])
        probs.append(rows)
        if i % 2:
            q = torch.stack([random_law(V, g) for _ in range(ki)]) if ki else torch.zeros(0, V)
            drafts.append(torch.multinomial(q, 1, generator=g).squeeze(1).tolist() if ki else [])
            qs.append(q)
        else:
            drafts.append(torch.randint(0, V, (ki,), generator=g).tolist())
            qs.append(None)
    probs = torch.cat(probs)
    return probs, probs.argmax(1), drafts, qs


def test_same_seeds_give_the_same_output_and_rows_do_not_depend_on_the_batch():
    n = 40
    probs, argmax, drafts, qs = _random_batch(3, n)

    def run(seeds):
        return rejection_sample(probs, argmax, drafts, qs, [False] * n, [gen(s) for s in seeds])

    a = run(range(100, 100 + n))
    b = run(range(100, 100 + n))
    assert a.emitted == b.emitted and a.num_accepted == b.num_accepted
    c = run(range(200, 200 + n))
    assert c.emitted != a.emitted
    # row i alone, with the same generator seed, gives the same result as inside the batch
    row = 0
    for i in range(n):
        k = len(drafts[i])
        alone = rejection_sample(probs[row:row + k + 1], argmax[row:row + k + 1], [drafts[i]], [qs[i]],
                                 [False], [gen(100 + i)])
        assert alone.emitted[0] == a.emitted[i]
        row += k + 1


def test_a_row_without_draft_draws_exactly_what_plain_sampling_draws():
    V = 50
    g = gen(4)
    for seed in range(20):
        p = random_law(V, g, zeros=10)
        res = rejection_sample(p.unsqueeze(0), p.argmax().reshape(1), [[]], [None], [False], [gen(seed)])
        noise = exponential_noise(V, 1, [gen(seed)], gen(999), torch.device("cpu"))
        assert res.emitted == [[int(sample_from_probs(p.unsqueeze(0), noise))]]


def test_recovered_tokens_stay_in_the_support_and_never_repeat_the_rejected_one_hot_draft():
    V, k, n = 8, 3, 1500
    g = gen(5)
    # top-k style laws: zeros outside a small support
    laws = torch.stack([random_law(V, g, zeros=5) for _ in range(k + 1)])
    drafts = torch.randint(0, V, (n, k), generator=g).tolist()  # any token, supported or not
    res = rejection_sample(laws.repeat(n, 1), laws.argmax(1).repeat(n), drafts, [None] * n,
                           [False] * n, [g] * n)
    rejections = 0
    for d, e, m in zip(drafts, res.emitted, res.num_accepted):
        assert e[:m] == d[:m] and len(e) == m + 1
        assert all(laws[j, t] > 0 for j, t in enumerate(e))
        if m < k:
            rejections += 1
            assert e[m] != d[m]
    assert rejections > n // 2
    # explicit q: a recovered token y always has p(y) > q(y)
    qs = torch.stack([random_law(V, g, zeros=3) for _ in range(k)])
    drafts = torch.multinomial(qs, n, replacement=True, generator=g).T.tolist()
    res = rejection_sample(laws.repeat(n, 1), laws.argmax(1).repeat(n), drafts, [qs] * n,
                           [False] * n, [g] * n)
    rejections = 0
    for e, m in zip(res.emitted, res.num_accepted):
        if m < k:
            rejections += 1
            assert laws[m, e[m]] > qs[m, e[m]]
    assert rejections > n // 4


# ---- the emitted law is the target law --------------------------------------------------------

N_TRIALS = 10000
V_LAW = 6


@pytest.fixture(scope="module")
def laws():
    g = gen(6)
    p1 = law(0.30, 0.25, 0.20, 0.15, 0.10, 0.0)  # token 5 is outside the target's support
    q1 = law(0.05, 0.10, 0.15, 0.20, 0.25, 0.25)
    P2 = torch.stack([random_law(V_LAW, g, zeros=1) for _ in range(V_LAW)])  # target at pos 2 | x1
    Q2 = torch.stack([random_law(V_LAW, g) for _ in range(V_LAW)])  # draft at pos 2 | x1
    P3 = random_law(V_LAW, g)  # bonus law (its exact value does not matter for these checks)
    return p1, q1, P2, Q2, P3


@pytest.mark.parametrize("kind", ["explicit_q", "one_hot"])
def test_first_token_law_equals_p_and_acceptance_rate_matches_theory(laws, kind):
    p1, q1, P2, _, _ = laws
    n = N_TRIALS
    g = gen(7)
    if kind == "explicit_q":
        x1 = torch.multinomial(q1, n, replacement=True, generator=g)
        alpha = float(torch.minimum(p1, q1).sum())  # Pr(accept) = sum_x min(p, q)
        draft_probs = [q1.unsqueeze(0)] * n
    else:
        x1 = torch.full((n,), 1)  # a deterministic (n-gram style) draft
        alpha = float(p1[1])  # Pr(accept) = p(x)
        draft_probs = [None] * n
    # each trial: target rows [p1, P2[x1]] (the law after the draft token)
    target = torch.stack([p1.expand(n, V_LAW), P2[x1]], dim=1).reshape(2 * n, V_LAW)
    res = rejection_sample(target, target.argmax(1), [[int(x)] for x in x1], draft_probs,
                           [False] * n, [g] * n)
    first = torch.tensor([e[0] for e in res.emitted])
    assert chi_square_pvalue(torch.bincount(first, minlength=V_LAW), p1) > P_MIN
    acc = torch.tensor(res.num_accepted, dtype=torch.float64)
    assert abs(float(acc.mean()) - alpha) < binomial_tolerance(alpha, n)
    # after an accepted draft the bonus token follows the target law given that draft
    bonus = [(int(x), e[1]) for x, e in zip(x1, res.emitted) if len(e) == 2]
    assert len(bonus) == int(acc.sum())
    for x in set(b[0] for b in bonus):
        tokens = torch.tensor([b[1] for b in bonus if b[0] == x])
        if tokens.numel() >= 200:
            assert chi_square_pvalue(torch.bincount(tokens, minlength=V_LAW), P2[x]) > P_MIN
    if kind == "one_hot":  # the rejected draft never comes back as the recovered token
        assert all(e[0] != 1 for e, m in zip(res.emitted, res.num_accepted) if m == 0)


@pytest.mark.parametrize("kind", ["explicit_q", "one_hot"])
def test_joint_law_of_two_positions_equals_the_target_joint_law(laws, kind):
    """Drafts x1 ~ q1, x2 ~ Q2[x1] (or deterministic drafts); the target rows are p1, P2[x1],
    P3. The first two tokens y1, y2 of the output (y2 from the same step when y1 was an accepted
    draft, else sampled from P2[y1] as the next plain step would) must follow p1(y1) P2[y1](y2)."""
    p1, q1, P2, Q2, P3 = laws
    n = N_TRIALS
    g, g_next = gen(8), gen(9)
    if kind == "explicit_q":
        x1 = torch.multinomial(q1, n, replacement=True, generator=g)
        x2 = torch.multinomial(Q2[x1], 1, generator=g).squeeze(1)
        draft_probs = [torch.stack([q1, Q2[a]]) for a in x1.tolist()]
    else:
        x1 = torch.full((n,), 0)
        x2 = torch.tensor([3, 4, 0, 2, 1, 5])[x1]  # the draft's second token is a function of the first
        draft_probs = [None] * n
    target = torch.stack([p1.expand(n, V_LAW), P2[x1], P3.expand(n, V_LAW)], dim=1).reshape(3 * n, V_LAW)
    drafts = torch.stack([x1, x2], 1).tolist()
    res = rejection_sample(target, target.argmax(1), drafts, draft_probs, [False] * n, [g] * n)
    y1 = torch.tensor([e[0] for e in res.emitted])
    y2 = torch.tensor([e[1] if len(e) > 1 else -1 for e in res.emitted])
    missing = y2 < 0
    y2[missing] = torch.multinomial(P2[y1[missing]], 1, generator=g_next).squeeze(1)
    counts = torch.bincount(y1 * V_LAW + y2, minlength=V_LAW * V_LAW)
    joint = p1.unsqueeze(1) * P2  # [y1, y2]
    assert 0 < int(missing.sum()) < n and sum(m == 2 for m in res.num_accepted) > 0
    assert chi_square_pvalue(counts, joint) > P_MIN
