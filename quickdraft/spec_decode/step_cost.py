"""What a speculative step costs, measured once at engine start.

A step that drafts k tokens for a sequence and verifies them computes k + 1 target rows (plus, for
a draft model, k one-row draft steps). How much more that costs than a plain one-row step depends
on the kernels: little on a GPU or with float32 CPU kernels (memory-bound), about 20% a row with
integer CPU kernels (compute-bound per row). The adaptive policy (adaptive.py) needs the ratios to
know when a draft of expected length E pays for itself: E(k) / cost(k) > 1.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from quickdraft.engine.block_manager import BlockManager
from quickdraft.engine.model_runner import ModelRunner, SeqInput

_CALIBRATION_SEQ = -1  # a block-table id no request uses
CONTEXT = 128  # tokens in the cache while timing (a typical short chat)


def _timed(runner: ModelRunner, inp: SeqInput) -> float:
    t0 = time.perf_counter()
    logits = runner.execute([inp])
    float(logits[-1, 0])  # waits for the device
    return time.perf_counter() - t0


@contextmanager
def _calibration(runners: list[ModelRunner], block_manager: BlockManager, rows: int,
                 max_len: int | None) -> Iterator[tuple[list[int], list[int], int]]:
    """(token ids, block table, context) for timing steps of up to ``rows`` rows after a cached
    context of CONTEXT tokens (fewer where ``max_len`` leaves no room), which every runner has
    computed; the blocks are freed afterwards."""
    vocab = runners[0].model.cfg.vocab_size
    context = CONTEXT if max_len is None else max(1, min(CONTEXT, max_len - rows))
    ids = [(i * 7919) % (vocab - 10) + 10 for i in range(context + rows)]
    table = block_manager.grow_to(_CALIBRATION_SEQ, context + rows)
    try:
        for r in runners:
            r.execute([SeqInput(ids[:context], 0, table, context - 1)])
        yield ids, table, context
    finally:
        block_manager.free(_CALIBRATION_SEQ)


def measure_step_costs(runner: ModelRunner, block_manager: BlockManager, max_k: int,
                       draft_runner: ModelRunner | None = None, repeats: int = 5,
                       max_len: int | None = None) -> tuple[float, ...]:
    """cost[k] for k = 0..max_k: seconds of a step that drafts k tokens and verifies them (k + 1
    target rows, plus k one-row draft steps with a draft model) over seconds of a plain step, for
    one sequence with CONTEXT tokens cached (fewer where ``max_len``, the shortest context of
    target and draft, leaves no room for them). Minimum of ``repeats`` interleaved timings per row
    count (the least disturbed by other work on the machine); made non-decreasing in k."""
    rows = max_k + 1
    runners = [runner] if draft_runner is None else [runner, draft_runner]
    with _calibration(runners, block_manager, rows, max_len) as (ids, table, context):
        best = [float("inf")] * (rows + 1)
        draft_best = float("inf")
        for rnd in range(repeats + 1):  # round 0 only warms up
            if rnd == 1:
                best, draft_best = [float("inf")] * (rows + 1), float("inf")
            for r in range(1, rows + 1):
                best[r] = min(best[r], _timed(runner, SeqInput(ids[context:context + r], context, table, 0)))
            if draft_runner is not None:
                draft_best = min(draft_best, _timed(draft_runner, SeqInput(ids[context:context + 1], context,
                                                                            table, 0)))
    draft = draft_best / best[1] if draft_runner is not None else 0.0
    costs: list[float] = []
    for k in range(max_k + 1):
        c = best[k + 1] / best[1] + k * draft
        costs.append(max(c, costs[-1] if costs else 1.0))
    return tuple(costs)


BATCH_ROWS = (1, 2, 4, 8, 16, 32, 64, 128)


def measure_row_times(runner: ModelRunner, block_manager: BlockManager, rows: tuple[int, ...] = BATCH_ROWS,
                      repeats: int = 3, max_len: int | None = None) -> tuple[tuple[int, float], ...]:
    """((R, seconds), ...): what a step of R rows costs, for the batch-size-aware costs of
    adaptive.py (a batch of B sequences adds k draft rows to a step of B). Timed as R rows of
    one sequence with CONTEXT tokens cached (a batch's rows share the weights the same way);
    minimum of ``repeats`` after a warm-up round; made non-decreasing in R."""
    best = {r: float("inf") for r in rows}
    with _calibration([runner], block_manager, max(rows), max_len) as (ids, table, context):
        for rnd in range(repeats + 1):
            for r in rows:
                t = _timed(runner, SeqInput(ids[context:context + r], context, table, 0))
                if rnd:
                    best[r] = min(best[r], t)
    out: list[tuple[int, float]] = []
    for r in sorted(rows):
        out.append((r, max(best[r], out[-1][1] if out else 0.0)))
    return tuple(out)


def step_time(row_times: tuple[tuple[int, float], ...], rows: float) -> float:
    """Seconds of a step of ``rows`` rows, interpolated linearly between measured row counts
    (extrapolated from the last two beyond them)."""
    pts = row_times
    if rows <= pts[0][0]:
        return pts[0][1]
    for (r0, t0), (r1, t1) in zip(pts, pts[1:]):
        if rows <= r1:
            return t0 + (t1 - t0) * (rows - r0) / (r1 - r0)
    (r0, t0), (r1, t1) = pts[-2], pts[-1]
    return t1 + (t1 - t0) * (rows - r1) / (r1 - r0)
