"""Prometheus metrics at GET /metrics, named as vLLM names them (with our prefix), in a registry per server.

Gauges and the engine's own counters are read when scraped, from the engine's state as of its last step (sent
with each step's events: server/engine_core.py); counters and histograms are fed by the async engine as requests
arrive, tokens stream out and requests end.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from collections.abc import Callable

from mistral7b.engine.outputs import EngineStats
from mistral7b.server import pauses

PREFIX = "mistral7b:"
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0, 160.0)
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                 5.0, 10.0)


class _EngineCounters:
    """Counters the engine keeps itself (preemptions, prefix cache, what could stall it), exposed at scrape time;
    and this (the API) process's own garbage-collection pauses."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str):
        self.stats, self.model_name = stats, model_name

    def collect(self):
        stats = self.stats()
        for name, doc, value in (
                ("num_preemptions", "Sequences preempted (freed and recomputed).", stats.num_preemptions),
                ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats.prefix_cache_queries),
                ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits),
                ("engine_gc_pause_seconds", "Seconds the engine's process spent in garbage collection.",
                 stats.gc_seconds),
                ("api_gc_pause_seconds", "Seconds the API server's process spent in garbage collection.",
                 pauses.gc_seconds()),
                ("cuda_alloc_retries", "The CUDA caching allocator's retries (all cached memory freed, then "
                 "allocated again).", stats.cuda_alloc_retries)):
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats], active_requests: Callable[[], int], model_name: str):
        """`stats()` gives the engine's state as last reported, `active_requests()` the number of requests the
        server holds (running or waiting). Every metric carries the served `model_name` as a label, as vLLM's
        do (dashboards filter on it)."""
        self.registry = r = CollectorRegistry()
        label = {"model_name": model_name}

        def gauge(name: str, doc: str, read) -> None:
            Gauge(PREFIX + name, doc, ["model_name"], registry=r).labels(**label).set_function(read)

        gauge("num_requests_running", "Sequences in the running batch.", lambda: stats().num_running)
        gauge("num_requests_waiting", "Requests waiting to be scheduled.",
              lambda: max(0, active_requests() - stats().num_running))
        gauge("kv_cache_usage_perc", "Share of KV cache blocks in use (0 to 1).", lambda: stats().kv_cache_usage)
        r.register(_EngineCounters(stats, model_name))
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens received.", ["model_name"],
                                     registry=r).labels(**label)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", ["model_name"],
                                         registry=r).labels(**label)
        self._success = Counter(PREFIX + "request_success", "Requests finished, by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self.model_name = model_name
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.", ["model_name"],
                              buckets=LATENCY_BUCKETS, registry=r).labels(**label)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between two tokens of a sequence.",
                             ["model_name"], buckets=TOKEN_BUCKETS, registry=r).labels(**label)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Time from arrival to the last token.",
                             ["model_name"], buckets=LATENCY_BUCKETS, registry=r).labels(**label)

    def request_added(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def generated(self, tokens: int) -> None:
        self.generation_tokens.inc(tokens)

    def request_finished(self, seconds: float, reason: str) -> None:
        self.e2e.observe(seconds)
        self._success.labels(model_name=self.model_name, finished_reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
