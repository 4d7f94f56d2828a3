"""Statistics shared by the distribution tests: Pearson's chi-square and its power.

Power convention (every law test states it): the alternative is the least detectable way of
moving a cell of mass 0.2 by 5% of its mass (0.01), the rest of the law scaled to compensate;
its noncentrality is n * delta^2 / (c (1 - c)) = n * 6.25e-4 whatever the other cells. A test
with n samples and df degrees of freedom detects it at level alpha with probability
chi_square_power(n, df, alpha); law tests choose n so that this is at least 0.8.
"""

from __future__ import annotations

import math

import torch

CELL_MASS = 0.2
RELATIVE_SHIFT = 0.05
MIN_POWER = 0.8


def _pool(counts: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Observed and expected counts with the cells of expected count < 5 pooled into one (and
    that one merged into the smallest other cell if it is still below 5)."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    probs = probs / probs.sum()
    expected = probs * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    if exp[-1] < 5:
        i = int(exp[:-1].argmin())
        obs[i] += obs[-1]
        exp[i] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    return obs, exp


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson goodness of fit (flattened); cells with expected count < 5 are pooled. Counts in
    cells of probability 0 give 0."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    if counts[probs == 0].sum() > 0:
        return 0.0
    obs, exp = _pool(counts, probs)
    df = obs.numel() - 1
    assert df >= 1
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def chi_square_df(probs: torch.Tensor, n: int) -> int:
    """Degrees of freedom of chi_square_pvalue for this law and n samples."""
    expected_law = probs.flatten().double()
    return _pool(expected_law / expected_law.sum() * n, expected_law)[0].numel() - 1


def _upper(a: float, x: float) -> float:
    return float(torch.special.gammaincc(torch.tensor(a, dtype=torch.float64), torch.tensor(x, dtype=torch.float64)))


def chi_square_power(n: int, df: int, alpha: float) -> float:
    """Probability that the chi-square test at level alpha with df degrees of freedom rejects
    the alternative of the module docstring after n samples (noncentral chi-square, summed as a
    Poisson mixture of central ones)."""
    lo, hi = 0.0, 1.0
    while _upper(df / 2, hi / 2) > alpha:
        hi *= 2
    for _ in range(200):  # critical value: P(chi2_df > crit) = alpha
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _upper(df / 2, mid / 2) > alpha else (lo, mid)
    crit = hi
    delta = CELL_MASS * RELATIVE_SHIFT
    half_lambda = n * delta**2 / (CELL_MASS * (1 - CELL_MASS)) / 2
    top = int(half_lambda + 12 * math.sqrt(half_lambda + 1) + 50)
    power = 0.0
    for j in range(top):
        weight = math.exp(-half_lambda + j * math.log(half_lambda) - math.lgamma(j + 1)) if half_lambda else float(j == 0)
        power += weight * _upper(df / 2 + j, crit / 2)
    return power


def samples_for_power(df: int, alpha: float, power: float = MIN_POWER) -> int:
    """The fewest samples (to 1%) for which chi_square_power >= power."""
    lo, hi = 1, 1000
    while chi_square_power(hi, df, alpha) < power:
        lo, hi = hi, hi * 2
    while hi - lo > max(1, lo // 100):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if chi_square_power(mid, df, alpha) < power else (lo, mid)
    return hi


def powered_sample_size(law: torch.Tensor, alpha: float) -> int:
    """Samples for an 80%-power chi-square test of this law at level alpha (its degrees of
    freedom as chi_square_pvalue will pool them), checked."""
    n = samples_for_power(chi_square_df(law, 10**5), alpha)
    assert chi_square_power(n, chi_square_df(law, n), alpha) >= MIN_POWER
    return n
