"""Prometheus metrics at GET /metrics, named as vLLM names them (with our prefix), in a registry per server.

Gauges read the engine when scraped; counters and histograms are fed by the async engine as requests arrive,
tokens stream out and requests end.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from mistral7b.engine.llm_engine import LLMEngine

PREFIX = "mistral7b:"
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0, 160.0)
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                 5.0, 10.0)


class _EngineCounters:
    """Counters the engine keeps itself (preemptions, prefix cache), exposed at scrape time."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine

    def collect(self):
        yield CounterMetricFamily(PREFIX + "num_preemptions", "Sequences preempted (freed and recomputed).",
                                  value=self.engine.scheduler.num_preemptions)
        yield CounterMetricFamily(PREFIX + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  value=self.engine.blocks.prefix_queries)
        yield CounterMetricFamily(PREFIX + "prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                  value=self.engine.blocks.prefix_hits)


class Metrics:
    def __init__(self, engine: LLMEngine, active_requests):
        """`active_requests()` gives the number of requests the server holds (running or waiting)."""
        self.registry = r = CollectorRegistry()
        running = Gauge(PREFIX + "num_requests_running", "Sequences in the running batch.", registry=r)
        running.set_function(lambda: engine.num_running)
        waiting = Gauge(PREFIX + "num_requests_waiting", "Requests waiting to be scheduled.", registry=r)
        waiting.set_function(lambda: max(0, active_requests() - engine.num_running))
        usage = Gauge(PREFIX + "kv_cache_usage_perc", "Share of KV cache blocks in use (0 to 1).", registry=r)
        usage.set_function(lambda: engine.blocks.usage)
        r.register(_EngineCounters(engine))
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens received.", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", registry=r)
        self.request_success = Counter(PREFIX + "request_success", "Requests finished, by finish reason.",
                                       ["finished_reason"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between two tokens of a sequence.",
                             buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Time from arrival to the last token.",
                             buckets=LATENCY_BUCKETS, registry=r)

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
        self.request_success.labels(finished_reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
