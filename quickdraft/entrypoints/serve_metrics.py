"""Prometheus metrics of the server, in a registry of its own (vLLM's names, `quickdraft:` prefix).

Engine counters and gauges are read from the engine's last snapshot at scrape time; latency
histograms and the finished-request counter are observed when a request finishes.
prometheus_client appends `_total` to counter names in the exposition, so the speculative
counters read e.g. `quickdraft:spec_decode_num_drafts_total`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric as PromMetric
from prometheus_client.registry import Collector

from quickdraft import metrics as engine_metrics
from quickdraft.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_DOCS = {
    "quickdraft:prompt_tokens": "Number of prefill tokens processed.",
    "quickdraft:generation_tokens": "Number of generation tokens processed.",
    "quickdraft:num_preemptions": "Cumulative number of preemptions from the engine.",
    "quickdraft:num_requests_running": "Number of requests in model execution batches.",
    "quickdraft:num_requests_waiting": "Number of requests waiting to be processed.",
    "quickdraft:kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
    "quickdraft:prefix_cache_queries": "Prefix cache queries, in terms of number of queried tokens.",
    "quickdraft:prefix_cache_hits": "Prefix cache hits, in terms of number of cached tokens.",
    "quickdraft:spec_decode_num_drafts": "Number of spec decoding drafts.",
    "quickdraft:spec_decode_num_draft_tokens": "Number of draft tokens.",
    "quickdraft:spec_decode_num_accepted_tokens": "Number of accepted tokens.",
    "quickdraft:spec_decode_num_accepted_tokens_per_pos": "Accepted tokens per draft position.",
    "quickdraft:spec_decode_suffix_num_drafts": "Suffix decoding drafts by the trie that supplied them.",
    "quickdraft:spec_decode_suffix_num_draft_tokens": "Suffix decoding draft tokens by source trie.",
    "quickdraft:spec_decode_suffix_num_accepted_tokens": "Suffix decoding accepted tokens by source trie.",
    "quickdraft:spec_decode_grammar_num_drafts": "Drafts led by tokens a structured-output grammar forces.",
    "quickdraft:spec_decode_grammar_num_draft_tokens": "Draft tokens of drafts led by grammar-forced tokens.",
    "quickdraft:spec_decode_grammar_num_accepted_tokens": "Accepted tokens of drafts led by grammar-forced tokens.",
}

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)


class _EngineCollector(Collector):
    def __init__(self, model_name: str, read: Callable[[], list[engine_metrics.Metric]]) -> None:
        self.model_name = model_name
        self.read = read

    def collect(self) -> Iterator[PromMetric]:
        for m in self.read():
            doc = _DOCS.get(m.name, m.name)
            if isinstance(m, engine_metrics.Vector):
                fam = CounterMetricFamily(m.name, doc, labels=["model_name", "position"])
                for pos, value in enumerate(m.values):
                    fam.add_metric([self.model_name, str(pos)], value)
            elif isinstance(m, engine_metrics.LabeledCounter):
                fam = CounterMetricFamily(m.name, doc, labels=["model_name", m.label])
                for value, count in m.values.items():
                    fam.add_metric([self.model_name, value], count)
            elif isinstance(m, engine_metrics.Counter):
                fam = CounterMetricFamily(m.name, doc, labels=["model_name"])
                fam.add_metric([self.model_name], m.value)
            elif isinstance(m, engine_metrics.Gauge):
                fam = GaugeMetricFamily(m.name, doc, labels=["model_name"])
                fam.add_metric([self.model_name], m.value)
            else:
                continue
            yield fam


class ServeMetrics:
    """The server's metrics: `render()` gives the Prometheus text exposition."""

    def __init__(self, model_name: str, read_engine_metrics: Callable[[], list[engine_metrics.Metric]]) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(model_name, read_engine_metrics))
        self.time_to_first_token = Histogram(
            "quickdraft:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
            ["model_name"], buckets=_LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e_latency = Histogram(
            "quickdraft:e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.",
            ["model_name"], buckets=_LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self.request_success = Counter(
            "quickdraft:request_success", "Count of successfully processed requests.",
            ["model_name", "finished_reason"], registry=self.registry)

    def observe_finished(self, out: RequestOutput) -> None:
        """Record a finished request (called by the engine thread; prometheus_client is thread-safe)."""
        m = out.metrics
        reason = out.outputs[0].finish_reason if out.outputs else None
        if m is not None:
            if m.time_to_first_token is not None:
                self.time_to_first_token.observe(max(0.0, m.time_to_first_token))
            if m.e2e_latency is not None and reason != "abort":
                self.e2e_latency.observe(max(0.0, m.e2e_latency))
        self.request_success.labels(self.model_name, reason or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
