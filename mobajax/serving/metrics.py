"""Prometheus metrics of the server, with vLLM's metric names, in a per-app registry.

Gauges and counters are read from `engine.stats()` (an `EngineStats`) at scrape time, so they
are never out of date; the latency histograms (time to first token, inter-token latency,
end-to-end latency) are fed by the server as request outputs arrive. Every metric carries a
`model_name` label, as in vLLM.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mobajax.serving.outputs import EngineStats, RequestOutput

# vLLM's buckets (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class EngineCollector(Collector):
    """Gauges and counters of `EngineStats`, read when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str):
        self._stats, self._model = stats, model_name

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        label = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            metric = GaugeMetricFamily(name, doc, labels=label)
            metric.add_metric([self._model], value)
            return metric

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            metric = CounterMetricFamily(name, doc, labels=label)
            metric.add_metric([self._model], value)
            return metric

        yield gauge("vllm:num_requests_running", "Requests in the running batch.", s.num_running)
        yield gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "Fraction of KV pages in use (1 = full).", s.kv_cache_usage)
        yield gauge("mobajax:kv_cache_free_pages", "KV pages free (including unreferenced cached pages).",
                    s.num_free_pages)
        yield gauge("mobajax:kv_cache_total_pages", "KV pages in the pool.", s.num_total_pages)
        yield counter("vllm:num_preemptions", "Requests preempted (their KV freed, recomputed later).",
                      s.num_preemptions)
        yield counter("vllm:prompt_tokens", "Prefill tokens processed.", s.prompt_tokens)
        yield counter("vllm:generation_tokens", "Tokens generated.", s.generation_tokens)
        yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s.prefix_cache_queries)
        yield counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)
        success = CounterMetricFamily("vllm:request_success", "Finished requests, by finish reason.",
                                      labels=["model_name", "finished_reason"])
        for reason in sorted(set(s.requests_finished) | {"stop", "length", "abort"}):
            success.add_metric([self._model, reason], s.requests_finished.get(reason, 0))
        yield success


class ServerMetrics:
    """The registry of one app: engine gauges/counters plus request latency histograms."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(EngineCollector(stats, model_name))
        self._model = model_name

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=self.registry).labels(model_name)

        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token (s).", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between output tokens (s).", ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Request latency, arrival to finish (s).",
                             E2E_BUCKETS)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def tracker(self, arrival: float | None = None) -> RequestTimer:
        return RequestTimer(self, time.monotonic() if arrival is None else arrival)


class RequestTimer:
    """Feeds the histograms from the outputs of one request, as the server sees them arrive.

    Inter-token latency: the time between two outputs spread over the tokens the second one
    added (several decode steps can arrive in one output).
    """

    def __init__(self, metrics: ServerMetrics, arrival: float):
        self._metrics, self._arrival = metrics, arrival
        self._last_time: float | None = None
        self._tokens = 0
        self._done = False

    def observe(self, output: RequestOutput) -> None:
        if self._done:
            return
        now = time.monotonic()
        tokens = max((len(c.token_ids) for c in output.outputs), default=0)  # decode steps so far
        if tokens > self._tokens:
            if self._last_time is None:
                self._metrics.ttft.observe(now - self._arrival)
            else:
                gap = (now - self._last_time) / (tokens - self._tokens)
                for _ in range(tokens - self._tokens):
                    self._metrics.itl.observe(gap)
            self._tokens, self._last_time = tokens, now
        if output.finished:
            self._metrics.e2e.observe(now - self._arrival)
            self._done = True
