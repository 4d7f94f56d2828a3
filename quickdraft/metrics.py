"""Engine metrics readable through `LLM.get_metrics()` (vLLM's names, `quickdraft:` prefix)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from quickdraft.engine.llm_engine import LLMEngine


@dataclass(frozen=True)
class Metric:
    name: str


@dataclass(frozen=True)
class Counter(Metric):
    value: int


@dataclass(frozen=True)
class Gauge(Metric):
    value: float


@dataclass(frozen=True)
class Vector(Metric):
    values: list[int]


@dataclass(frozen=True)
class LabeledCounter(Metric):
    """A counter per value of one label, e.g. {"request": 12, "global": 40} by ``source``."""

    label: str
    values: dict[str, int]


def engine_metrics(engine: "LLMEngine") -> list[Metric]:
    sched = engine.scheduler
    out: list[Metric] = [
        Counter("quickdraft:prompt_tokens", engine.num_prompt_tokens_total),
        Counter("quickdraft:generation_tokens", engine.num_generation_tokens_total),
        Counter("quickdraft:num_preemptions", sched.num_preemptions),
        Gauge("quickdraft:num_requests_running", float(len({s.request_id for s in sched.running}))),
        Gauge("quickdraft:num_requests_waiting", float(len({s.request_id for s in sched.waiting}))),
        Gauge("quickdraft:kv_cache_usage_perc", engine.block_manager.usage),
        Counter("quickdraft:prefix_cache_queries", engine.block_manager.queries),
        Counter("quickdraft:prefix_cache_hits", engine.block_manager.hits),
    ]
    stats = engine.spec_stats
    if stats is not None:
        out += [
            Counter("quickdraft:spec_decode_num_drafts", stats.num_drafts),
            Counter("quickdraft:spec_decode_num_draft_tokens", stats.num_draft_tokens),
            Counter("quickdraft:spec_decode_num_accepted_tokens", stats.num_accepted_tokens),
            Vector("quickdraft:spec_decode_num_accepted_tokens_per_pos", list(stats.accepted_per_pos)),
        ]
        grammar = stats.by_source.get("grammar", [0, 0, 0])  # drafts led by a grammar's forced tokens
        out += [Counter(f"quickdraft:spec_decode_grammar_{what}", grammar[i])
                for i, what in enumerate(("num_drafts", "num_draft_tokens", "num_accepted_tokens"))]
        if engine.speculative_config.method == "suffix":
            src = {name: stats.by_source.get(name, [0, 0, 0]) for name in ("request", "global")}
            out += [LabeledCounter(f"quickdraft:spec_decode_suffix_{what}", "source",
                                   {name: counts[i] for name, counts in src.items()})
                    for i, what in enumerate(("num_drafts", "num_draft_tokens", "num_accepted_tokens"))]
    return out
