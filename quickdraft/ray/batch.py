"""Offline batches on Ray Data, shaped like vLLM's ``ray.data.llm``::

    from quickdraft.ray import ProcessorConfig, build_processor
    config = ProcessorConfig(model="model.gguf", engine_kwargs={"speculative_config": {...}},
                             sampling_params={"temperature": 0, "max_tokens": 64}, concurrency=2)
    out = build_processor(config)(ds)          # a lazy ray.data.Dataset
    print(summarize(out))                      # runs it; speculation counters summed over replicas

Each replica is a Ray actor holding one `LLM`, loaded once, behind the same engine thread the
server uses (`AsyncLLM`): the batches an actor has in flight share one continuous batch, so a
replica runs as full a batch as `LLM.generate` would.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from quickdraft.ray.rows import OUTPUT_COLUMNS, PreparedRow, output_columns, prepare_row
from quickdraft.spec_decode.metrics import AcceptanceFigures

if TYPE_CHECKING:
    import pyarrow
    import ray.data

logger = logging.getLogger(__name__)


@dataclass
class ProcessorConfig:
    """What `build_processor` builds.

    ``model`` and ``engine_kwargs`` are `LLM`'s arguments (``speculative_config`` included);
    ``sampling_params`` are `SamplingParams` fields for every row (a row's own ``sampling_params``
    override them). ``concurrency`` replicas (actors), each with ``num_cpus_per_replica`` CPUs
    (its torch threads) and ``num_gpus_per_replica`` GPUs (with ``engine_kwargs`` device
    "cuda"); ``batch_size`` rows per Ray batch and ``max_concurrent_batches`` batches
    in flight per replica, whose requests the replica's engine batches together.
    ``preserve_order`` keeps the output rows in input order."""

    model: str | None = None
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    sampling_params: dict[str, Any] = field(default_factory=dict)
    concurrency: int = 1
    batch_size: int = 16
    max_concurrent_batches: int = 8
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float = 0.0
    preserve_order: bool = True

    def __post_init__(self) -> None:
        for name in ("concurrency", "batch_size", "max_concurrent_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ProcessorConfig.{name} must be a positive integer, got {value!r}.")
        if not self.num_cpus_per_replica > 0:
            raise ValueError(f"ProcessorConfig.num_cpus_per_replica must be positive, got {self.num_cpus_per_replica!r}.")
        if not self.num_gpus_per_replica >= 0:
            raise ValueError(f"ProcessorConfig.num_gpus_per_replica must be >= 0, got {self.num_gpus_per_replica!r}.")
        if "model" in self.engine_kwargs:
            raise ValueError("Give the model as ProcessorConfig.model, not in engine_kwargs.")
        # Fail on the driver, not in every actor: the defaults must make valid SamplingParams.
        from quickdraft.ray.rows import sampling_params_for

        sampling_params_for(self.sampling_params, None)


class LLMReplica:
    """One replica: an `LLM` loaded once, its engine on a thread, rows in and out as Arrow tables.
    Ray Data calls it with several batches at once (an async actor); all of them run in the
    same engine."""

    def __init__(self, model: str | None, engine_kwargs: dict[str, Any], sampling_params: dict[str, Any],
                 num_threads: int) -> None:
        from quickdraft.entrypoints.async_engine import AsyncLLM
        from quickdraft.llm import LLM

        # built on the engine's own thread (see AsyncLLM.load)
        self.engine = AsyncLLM.load(lambda: LLM(model=model, **engine_kwargs), num_threads=num_threads)
        self.llm = self.engine.llm
        self.engine.start()
        self.tokenizer = self.llm.get_tokenizer()
        self.defaults = dict(sampling_params)
        self._ids = itertools.count()

    async def __call__(self, batch: pyarrow.Table) -> pyarrow.Table:
        from quickdraft.entrypoints.async_engine import RequestGroup

        rows = batch.to_pylist()
        errors: list[str | None] = [None] * len(rows)
        prepared: list[PreparedRow | None] = [None] * len(rows)
        for i, row in enumerate(rows):
            try:  # the engine checks the rest (length, vocabulary) when the row is added
                prepared[i] = prepare_row(row, self.defaults, self.tokenizer)
            except (ValueError, TypeError) as e:
                errors[i] = f"{type(e).__name__}: {e}"
        # Only final outputs (no per-step snapshots); a row the engine aborted alone keeps its error.
        group = RequestGroup(self.engine, stream=False, raise_errors=False)
        added: list[int] = []
        try:
            todo = [i for i, p in enumerate(prepared) if p is not None]
            refused = await group.add_many([(f"ray-{next(self._ids)}", prepared[i].prompt, prepared[i].prompt_token_ids,
                                             prepared[i].params) for i in todo])
            for i, e in zip(todo, refused):
                if e is None:
                    added.append(i)
                elif isinstance(e, ValueError):  # refused by the engine: too long, out of vocabulary...
                    errors[i] = f"ValueError: {e}"
                else:
                    raise e
            results = await group.results()
        except BaseException:
            group.abort()
            raise
        outputs: list[Any] = [None] * len(rows)
        for i, out in zip(added, results):
            if out.error is not None:
                errors[i] = f"{type(out.error).__name__}: {out.error}"
            else:
                outputs[i] = out
        return _with_columns(batch, [output_columns(o, e) for o, e in zip(outputs, errors)])

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout=5)


def _with_columns(batch: pyarrow.Table, columns: list[dict[str, Any]]) -> pyarrow.Table:
    """``batch`` with the output columns appended (replacing input columns of the same names),
    typed explicitly so that every batch has the same schema, errors or not."""
    import pyarrow as pa

    types = {"generated_text": pa.string(), "generated_token_ids": pa.list_(pa.int64()),
             "finish_reason": pa.string(), "error": pa.string()}
    table = batch.drop_columns([c for c in OUTPUT_COLUMNS if c in batch.column_names])
    for name in OUTPUT_COLUMNS:
        table = table.append_column(name, pa.array([c[name] for c in columns], type=types.get(name, pa.int64())))
    return table


class Processor:
    """``processor(ds)`` returns ``ds`` with the generation columns added (lazily, as Ray Data
    does); see `ProcessorConfig`."""

    def __init__(self, config: ProcessorConfig) -> None:
        self.config = config

    def __call__(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        from ray.data import ActorPoolStrategy

        c = self.config
        out = ds.map_batches(
            LLMReplica, batch_size=c.batch_size, batch_format="pyarrow", zero_copy_batch=True,
            fn_constructor_kwargs={"model": c.model, "engine_kwargs": dict(c.engine_kwargs),
                                   "sampling_params": dict(c.sampling_params),
                                   "num_threads": int(c.num_cpus_per_replica)},
            compute=ActorPoolStrategy(size=c.concurrency, max_tasks_in_flight_per_actor=c.max_concurrent_batches,
                                      max_concurrent_calls_per_actor=c.max_concurrent_batches),
            num_cpus=c.num_cpus_per_replica, num_gpus=c.num_gpus_per_replica or None)
        if c.preserve_order:
            out.context.execution_options.preserve_order = True
        return out


def build_processor(config: ProcessorConfig) -> Processor:
    return Processor(config)


@dataclass
class BatchSummary(AcceptanceFigures):
    """A finished job's totals, speculation counters summed over every row (so over replicas)."""

    num_rows: int
    num_errors: int
    num_input_tokens: int
    num_generated_tokens: int
    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int

    def __str__(self) -> str:
        line = (f"{self.num_rows} rows ({self.num_errors} failed): {self.num_input_tokens} input tokens, "
                f"{self.num_generated_tokens} generated")
        if self.num_drafts:
            line += (f"; speculation: {self.num_drafts} drafts, {self.num_draft_tokens} drafted, "
                     f"{self.num_accepted_tokens} accepted (acceptance {self.acceptance_rate:.1%}, "
                     f"mean acceptance length {self.mean_acceptance_length:.2f})")
        return line


_SUMMED = ("num_input_tokens", "num_generated_tokens", "num_drafts", "num_draft_tokens", "num_accepted_tokens")


def summarize_rows(rows: list[Mapping[str, Any]]) -> BatchSummary:
    """The summary of output rows already in memory."""
    return BatchSummary(num_rows=len(rows), num_errors=sum(r["error"] is not None for r in rows),
                        **{k: sum(r[k] or 0 for r in rows) for k in _SUMMED})


def summarize(ds: ray.data.Dataset | list[Mapping[str, Any]]) -> BatchSummary:
    """Run (or read) a processed dataset and sum its rows' counters. Materialize the dataset first
    (``ds = ds.materialize()``) to keep its rows and summarize without generating twice."""
    if isinstance(ds, list):
        return summarize_rows(ds)
    totals = ds.select_columns([*_SUMMED, "error"]).map_batches(_partial_sums, batch_format="pyarrow").take_all()
    return BatchSummary(num_rows=sum(t["num_rows"] for t in totals), num_errors=sum(t["num_errors"] for t in totals),
                        **{k: sum(t[k] for t in totals) for k in _SUMMED})


def _partial_sums(batch: pyarrow.Table) -> dict[str, list[int]]:
    import pyarrow.compute as pc

    sums = {k: [int(pc.sum(batch[k]).as_py() or 0)] for k in _SUMMED}
    return {**sums, "num_rows": [batch.num_rows], "num_errors": [batch.num_rows - batch["error"].null_count]}

