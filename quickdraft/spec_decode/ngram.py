"""Prompt-lookup (n-gram) drafting: propose the tokens that followed an earlier occurrence of
the sequence's current suffix. A pure function over token ids."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def find_ngram_draft(tokens: Sequence[int] | np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """Up to ``k`` tokens that followed the earliest earlier occurrence of the longest suffix
    n-gram of ``tokens`` with ``min_n <= n <= max_n``; [] when no such n-gram occurred before.

    An occurrence counts only if at least one token follows it and it is not the suffix itself.
    Cost: O(len(tokens)) vectorised comparisons per n.
    """
    if k <= 0 or min_n < 1 or max_n < min_n:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    L = arr.shape[0]
    # A candidate n-gram ends at j with n - 1 <= j < L - 1 (a token follows it); candidates are
    # first narrowed to the positions holding the suffix's last token.
    last = arr[-1] if L else 0
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        # Positions j (end of a candidate n-gram) where arr[j] == last, with j - n + 1 >= 0 and j < L - 1.
        ends = np.flatnonzero(arr[n - 1:L - 1] == last) + (n - 1)
        if ends.size == 0:
            continue
        suffix = arr[L - n:]
        starts = ends - (n - 1)
        ok = np.ones(starts.shape[0], dtype=bool)
        for off in range(n - 1):
            ok &= arr[starts + off] == suffix[off]
        hits = starts[ok]
        if hits.size:
            begin = int(hits[0]) + n
            return arr[begin:begin + k].tolist()
    return []
