"""What the engine returns: vLLM-shaped request outputs, and the engine's counters for metrics."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Logprob:
    """A token's log-probability (natural log) and, when known, its decoded text."""

    logprob: float
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
    """One of the n completions of a request.

    logprobs: per generated token, {token id: Logprob} holding the sampled token and the top
    alternatives (None unless requested). finish_reason: "stop", "length", "abort" or None while
    running; stop_reason: the stop string or token id that ended it (None for EOS or length).
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestMetrics:
    """Wall-clock times (time.monotonic seconds) of one request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclasses.dataclass
class RequestOutput:
    """State of one request after an engine step (cumulative: full text and tokens so far)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0


@dataclasses.dataclass
class EngineStats:
    """Gauges and cumulative counters of the engine (read by the metrics endpoint).

    kv_cache_usage: fraction of pages in use (0..1). Counters only ever increase.
    """

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_free_pages: int = 0
    num_total_pages: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    requests_finished: dict[str, int] = dataclasses.field(default_factory=dict)
