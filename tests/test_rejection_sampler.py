"""The verifier alone (a pure function over flat tensors) against exact laws.

Deterministic cases check the emitted tokens exactly; distribution cases draw drafts from a
known draft law q (standard), a fixed token (n-gram) or the target's own noise (coupled), verify
them against a known target law p, and compare what comes out with the law it must follow (p at
every position) by a chi-square test whose power is stated (tests/stats.py: n is chosen so that
moving a cell of mass 0.2 by 5% is detected with probability >= 0.8). The randomness is the
engine's own counter-based noise (sample/noise.py) with fixed seeds, so the tests are
deterministic; thresholds are set so that a correct sampler fails with probability below 1e-5
per assertion.
"""

from __future__ import annotations

import math

import pytest
import torch

from quickdraft.sample.noise import ACCEPT, TARGET, NoiseKey, exponential, uniform
from quickdraft.sample.sampler import SamplingMetadata, sample
from quickdraft.spec_decode.rejection_sampler import race, rejection_sample
from stats import chi_square_pvalue, powered_sample_size

P_MIN = 1e-5  # chi-square p-value threshold
CPU = torch.device("cpu")


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


class KeyedNoise:
    """The engine's noise: sequence i draws from NoiseKey(seeds[i], 0, offset, stream)."""

    def __init__(self, seeds, V: int) -> None:
        self.seeds, self.V = list(seeds), V

    def exponential(self, i: int, offset: int, stream: int) -> torch.Tensor:
        return exponential(NoiseKey(self.seeds[i], 0, offset, stream), self.V, CPU)

    def uniform(self, i: int, offset: int) -> float:
        return uniform(NoiseKey(self.seeds[i], 0, offset, ACCEPT))


def noise(n: int, V: int, base: int = 0) -> KeyedNoise:
    return KeyedNoise(range(base, base + n), V)


class ArrayNoise:
    """i.i.d. Exp(1) and U[0, 1) draws made up front from one generator (the law tests: the
    verifier is exact for any independent noise, and this one is fast to index)."""

    def __init__(self, n: int, V: int, seed: int, offsets: int = 3) -> None:
        g = gen(seed)
        self.exp = torch.empty(n, offsets, 4, V).exponential_(generator=g)  # [seq, offset, stream, V]
        self.u = torch.rand(n, offsets, generator=g, dtype=torch.float64).tolist()

    def exponential(self, i: int, offset: int, stream: int) -> torch.Tensor:
        return self.exp[i, offset, stream]

    def uniform(self, i: int, offset: int) -> float:
        return self.u[i][offset]


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
    res = rejection_sample(None, argmax, [[7, 3, 9]], [None], [True], noise(1, 12))
    assert res.emitted == [[7, 3, 9, 11]]
    assert res.num_accepted == [3]


@pytest.mark.parametrize("drafts, emitted", [
    ([7, 5, 9], [7, 3]),  # mismatch at position 1: keep the prefix, emit the argmax there
    ([8, 3, 9], [7]),  # mismatch at position 0: nothing accepted
    ([7, 3, 1], [7, 3, 9]),  # mismatch at the last position
])
def test_greedy_early_mismatch_emits_prefix_then_argmax(drafts, emitted):
    argmax = torch.tensor([7, 3, 9, 11])
    res = rejection_sample(None, argmax, [drafts], [None], [True], noise(1, 12))
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
    #  F sampled, point-mass draft [3] with p(3) = 0        -> rejected, the target's sample: 2
    #  G sampled, point-mass drafts [4, 6], p one-hot 4, 5  -> 4 accepted, then 5 emitted
    argmax = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 0, 2, 1, 4, 5, 0])
    probs = torch.stack([onehot(int(t)) for t in argmax])  # greedy rows' laws are not read
    drafts = [[1, 2], [], [], [6, 7, 8], [10], [3], [4, 6]]
    q_d = probs[5:8].clone()  # D's draft law equals its target law
    draft_probs = [None, None, None, q_d, None, None, None]
    greedy = [True, False, True, False, True, False, False]
    res = rejection_sample(probs, argmax, drafts, draft_probs, greedy, noise(7, V))
    assert res.emitted == [[1, 2, 3], [4], [5], [6, 7, 8, 9], [11], [2], [4, 5]]
    assert res.num_accepted == [2, 0, 0, 3, 0, 0, 1]


def test_all_rejected_sampled_rows_emit_one_recovered_token_from_the_residual():
    V = 8
    p = law(0, 0, 3, 1, 0, 0, 0, 0)  # support {2, 3}
    q = law(1, 1, 0, 0, 0, 0, 0, 0)  # support disjoint from p: every draft is rejected
    n = powered_sample_size(p, P_MIN)
    res = rejection_sample(p.repeat(n * 3, 1), torch.full((n * 3,), 2),
                           [[0, 1]] * n, [q.repeat(2, 1)] * n, [False] * n, ArrayNoise(n, V, 1))
    assert res.num_accepted == [0] * n
    tokens = torch.tensor([e[0] for e in res.emitted])
    assert all(len(e) == 1 for e in res.emitted)
    counts = torch.bincount(tokens, minlength=V)
    # residual = normalize(max(p - q, 0)) = p here
    assert chi_square_pvalue(counts, p) > P_MIN
    # point-mass drafts of zero probability are always rejected too
    m = 500
    res = rejection_sample(p.repeat(m * 2, 1), torch.zeros(m * 2, dtype=torch.long),
                           [[5]] * m, [None] * m, [False] * m, noise(m, V, base=n))
    assert res.num_accepted == [0] * m
    assert all(e[0] in (2, 3) for e in res.emitted)


def test_draft_law_equal_to_target_law_accepts_everything():
    V, k, n = 7, 3, 300
    g = gen(2)
    laws = torch.stack([random_law(V, g, zeros=2) for _ in range(k + 1)])  # [k + 1, V]
    drafts = [torch.multinomial(laws[:k], 1, generator=g).squeeze(1).tolist() for _ in range(n)]
    res = rejection_sample(laws.repeat(n, 1), laws.argmax(1).repeat(n), drafts, [laws[:k].clone()] * n,
                           [False] * n, noise(n, V))
    assert res.num_accepted == [k] * n
    assert [e[:k] for e in res.emitted] == drafts
    assert all(laws[k, e[k]] > 0 for e in res.emitted)


# ---- sample-and-match emits plain sampling's tokens ------------------------------------------

def _plain_token(p: torch.Tensor, keyed: KeyedNoise, i: int, offset: int) -> int:
    """What plain sampling draws for sequence i at this offset: sample() on one row."""
    md = SamplingMetadata(temperature=torch.ones(1), greedy=torch.zeros(1, dtype=torch.bool), all_greedy=False)
    return int(sample(p.log().unsqueeze(0), md, keyed.exponential(i, offset, TARGET).unsqueeze(0))[0])


def test_sample_and_match_emits_exactly_what_plain_sampling_draws_at_every_position():
    """Point-mass drafts (any tokens): every emitted token equals the token plain sampling draws
    at that position with the same noise, whatever was drafted; drafting plain sampling's own
    tokens accepts all of them."""
    V, k, n = 20, 4, 300
    g = gen(10)
    keyed = noise(n, V, base=1000)
    laws = [torch.stack([random_law(V, g, zeros=8) for _ in range(k + 1)]) for _ in range(n)]
    plain = [[_plain_token(laws[i][j], keyed, i, j) for j in range(k + 1)] for i in range(n)]
    # drafts: the plain tokens with a random position changed (or none changed)
    drafts = []
    for i in range(n):
        d = plain[i][:k]
        cut = int(torch.randint(0, k + 1, (1,), generator=g))
        if cut < k:
            d = d[:cut] + [(d[cut] + 1) % V] + d[cut + 1:]
        drafts.append(d)
    probs = torch.cat(laws)
    res = rejection_sample(probs, probs.argmax(1), drafts, [None] * n, [False] * n, keyed)
    for i in range(n):
        m = res.num_accepted[i]
        assert res.emitted[i] == plain[i][:m + 1]
        assert m == k or drafts[i][m] != plain[i][m]
    assert sum(m == k for m in res.num_accepted) > n // 10 and sum(m < k for m in res.num_accepted) > n // 2


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
    n, V = 40, 9
    probs, argmax, drafts, qs = _random_batch(3, n, V)

    def run(base):
        return rejection_sample(probs, argmax, drafts, qs, [False] * n, noise(n, V, base))

    a = run(100)
    b = run(100)
    assert a.emitted == b.emitted and a.num_accepted == b.num_accepted
    c = run(200)
    assert c.emitted != a.emitted
    # row i alone, with the same seed, gives the same result as inside the batch
    row = 0
    for i in range(n):
        k = len(drafts[i])
        alone = rejection_sample(probs[row:row + k + 1], argmax[row:row + k + 1], [drafts[i]], [qs[i]],
                                 [False], noise(1, V, 100 + i))
        assert alone.emitted[0] == a.emitted[i]
        row += k + 1


def test_a_row_without_draft_draws_exactly_what_plain_sampling_draws():
    V = 50
    g = gen(4)
    for seed in range(20):
        p = random_law(V, g, zeros=10)
        keyed = noise(1, V, seed)
        res = rejection_sample(p.unsqueeze(0), p.argmax().reshape(1), [[]], [None], [False], keyed)
        assert res.emitted == [[_plain_token(p, keyed, 0, 0)]]
        standard = rejection_sample(p.unsqueeze(0), p.argmax().reshape(1), [[]], [torch.zeros(0, V)], [False],
                                    keyed)
        assert standard.emitted == res.emitted


def test_recovered_tokens_stay_in_the_support_and_never_repeat_the_rejected_point_mass_draft():
    V, k, n = 8, 3, 1500
    g = gen(5)
    # top-k style laws: zeros outside a small support
    laws = torch.stack([random_law(V, g, zeros=5) for _ in range(k + 1)])
    drafts = torch.randint(0, V, (n, k), generator=g).tolist()  # any token, supported or not
    res = rejection_sample(laws.repeat(n, 1), laws.argmax(1).repeat(n), drafts, [None] * n,
                           [False] * n, noise(n, V))
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
                           [False] * n, noise(n, V, base=n))
    rejections = 0
    for e, m in zip(res.emitted, res.num_accepted):
        if m < k:
            rejections += 1
            assert laws[m, e[m]] > qs[m, e[m]]
    assert rejections > n // 4


# ---- the emitted law is the target law --------------------------------------------------------

V_LAW = 6
KINDS = ["standard", "point_mass", "coupled"]


@pytest.fixture(scope="module")
def laws():
    g = gen(6)
    p1 = law(0.30, 0.25, 0.20, 0.15, 0.10, 0.0)  # token 5 is outside the target's support
    q1 = law(0.05, 0.10, 0.15, 0.20, 0.25, 0.25)
    P2 = torch.stack([random_law(V_LAW, g, zeros=1) for _ in range(V_LAW)])  # target at pos 2 | x1
    Q2 = torch.stack([random_law(V_LAW, g) for _ in range(V_LAW)])  # draft at pos 2 | x1
    P3 = random_law(V_LAW, g)  # bonus law (its exact value does not matter for these checks)
    return p1, q1, P2, Q2, P3


def coupled_acceptance(p: torch.Tensor, q: torch.Tensor) -> float:
    """Pr(argmax(q / E) == argmax(p / E)) for shared Exp(1) noise E: the race picks v under
    both laws iff E_u > E_v max(p_u / p_v, q_u / q_v) for every u != v, so
    Pr = sum_v 1 / sum_u max(p_u / p_v, q_u / q_v) over v in both supports."""
    p, q = p.double(), q.double()
    total = 0.0
    for v in range(p.numel()):
        if p[v] > 0 and q[v] > 0:
            total += 1.0 / float(torch.maximum(p / p[v], q / q[v]).sum())
    return total


def _draft_first(kind: str, q1: torch.Tensor, n: int, keyed: ArrayNoise, g: torch.Generator
                 ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """First drafted tokens [n] and their laws for the verifier."""
    if kind == "standard":
        return torch.multinomial(q1, n, replacement=True, generator=g), [q1.unsqueeze(0)] * n
    if kind == "point_mass":
        return torch.full((n,), 1), [None] * n  # a fixed (n-gram style) draft
    # coupled: the draft races its own law with the target's noise of the position
    return torch.tensor([race(q1, keyed.exponential(i, 0, TARGET)) for i in range(n)]), [None] * n


@pytest.mark.parametrize("kind", KINDS)
def test_first_token_law_equals_p_and_acceptance_rate_matches_theory(laws, kind):
    p1, q1, P2, _, _ = laws
    n = powered_sample_size(p1, P_MIN)
    keyed = ArrayNoise(n, V_LAW, 11)
    x1, draft_probs = _draft_first(kind, q1, n, keyed, gen(7))
    alpha = {"standard": float(torch.minimum(p1, q1).sum()),  # Pr(accept) = sum_x min(p, q)
             "point_mass": float(p1[1]),  # Pr(accept) = p(x)
             "coupled": coupled_acceptance(p1, q1)}[kind]
    # each trial: target rows [p1, P2[x1]] (the law after the draft token)
    target = torch.stack([p1.expand(n, V_LAW), P2[x1]], dim=1).reshape(2 * n, V_LAW)
    res = rejection_sample(target, target.argmax(1), [[int(x)] for x in x1], draft_probs, [False] * n, keyed)
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
    if kind == "point_mass":  # the rejected draft never comes back as the recovered token
        assert all(e[0] != 1 for e, m in zip(res.emitted, res.num_accepted) if m == 0)


def test_coupling_accepts_less_than_the_maximal_coupling_but_more_than_its_lower_bound(laws):
    """The figures behind the default rejection_sample_method: for these laws the coupled
    acceptance sits between (1 - TV) / (1 + TV) and 1 - TV = sum min(p, q)."""
    p1, q1, _, _, _ = laws
    overlap = float(torch.minimum(p1, q1).sum())
    tv = 1 - overlap
    assert (1 - tv) / (1 + tv) - 1e-9 <= coupled_acceptance(p1, q1) <= overlap + 1e-9
    assert coupled_acceptance(p1, p1) == pytest.approx(1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_joint_law_of_two_positions_equals_the_target_joint_law(laws, kind):
    """Drafts x1, x2 (x1 ~ q1, x2 ~ Q2[x1]; fixed tokens; or races of q1, Q2[x1] with the
    target's noise); the target rows are p1, P2[x1], P3. The first two tokens y1, y2 of the
    output (y2 from the same step when y1 was an accepted draft, else sampled from P2[y1] with
    the position's noise as the next plain step would) must follow p1(y1) P2[y1](y2)."""
    p1, q1, P2, Q2, P3 = laws
    joint = p1.unsqueeze(1) * P2  # [y1, y2]
    n = powered_sample_size(joint, P_MIN)
    keyed = ArrayNoise(n, V_LAW, 12)
    g = gen(8)
    if kind == "standard":
        x1 = torch.multinomial(q1, n, replacement=True, generator=g)
        x2 = torch.multinomial(Q2[x1], 1, generator=g).squeeze(1)
        draft_probs = [torch.stack([q1, Q2[a]]) for a in x1.tolist()]
    elif kind == "point_mass":
        x1 = torch.full((n,), 0)
        x2 = torch.tensor([3, 4, 0, 2, 1, 5])[x1]  # the draft's second token is a function of the first
        draft_probs = [None] * n
    else:
        x1 = torch.tensor([race(q1, keyed.exponential(i, 0, TARGET)) for i in range(n)])
        x2 = torch.tensor([race(Q2[a], keyed.exponential(i, 1, TARGET)) for i, a in enumerate(x1.tolist())])
        draft_probs = [None] * n
    target = torch.stack([p1.expand(n, V_LAW), P2[x1], P3.expand(n, V_LAW)], dim=1).reshape(3 * n, V_LAW)
    drafts = torch.stack([x1, x2], 1).tolist()
    res = rejection_sample(target, target.argmax(1), drafts, draft_probs, [False] * n, keyed)
    y1 = [e[0] for e in res.emitted]
    y2 = [e[1] if len(e) > 1 else race(P2[y1[i]], keyed.exponential(i, 1, TARGET)) for i, e in enumerate(res.emitted)]
    missing = sum(len(e) == 1 for e in res.emitted)
    counts = torch.bincount(torch.tensor(y1) * V_LAW + torch.tensor(y2), minlength=V_LAW * V_LAW)
    assert 0 < missing < n and sum(m == 2 for m in res.num_accepted) > 0
    assert chi_square_pvalue(counts, joint) > P_MIN
