"""Requests and their sequences (one per completion), with incremental detokenization.

A `Sequence` owns its token ids (prompt + generated), how many of them are in the KV cache
(`num_computed`), its pages, and the text produced so far. Stop strings are found here, on the
host, and text that might still become a stop string is held back from streaming.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools

from mobajax.serving.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from mobajax.serving.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # not yet admitted, or preempted (to be recomputed)
    FORKING = "forking"  # n > 1: waits for its parent's prefill, then shares its pages
    RUNNING = "running"
    FINISHED = "finished"


_seq_ids = itertools.count()


class IncrementalDetokenizer:
    """Turns a growing list of ids into text without re-decoding everything each time."""

    def __init__(self, tokenizer, skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token: int) -> str:
        """Append one id; return the new text it completes ("" while a character is partial,
        and always without a tokenizer)."""
        self.ids.append(token)
        if self.tokenizer is None:
            return ""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]


@dataclasses.dataclass(eq=False)
class Sequence:
    """One completion of a request: tokens, cache state, output text and logprobs."""

    request: Request
    index: int
    token_ids: list[int]
    num_prompt: int
    detokenizer: IncrementalDetokenizer
    seq_id: int = dataclasses.field(default_factory=lambda: next(_seq_ids))
    status: Status = Status.WAITING
    num_computed: int = 0
    pages: list[int] = dataclasses.field(default_factory=list)
    block_hashes: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, Logprob]] = dataclasses.field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    def visible_text(self) -> str:
        """Text safe to stream: while running, the tail that could start a stop string is held back."""
        if self.finish_reason is not None or not self.params.stop:
            return self.text
        hold = max(len(s) for s in self.params.stop) - 1
        return self.text[: len(self.text) - hold] if hold else self.text

    def append(self, token: int, logprob: dict[int, Logprob] | None, eos_ids: frozenset[int], max_len: int) -> None:
        """Record a sampled token, update the text and decide whether the sequence stops."""
        self.token_ids.append(token)
        params = self.params
        if logprob is not None:
            self.logprobs.append(logprob)
            self.cumulative_logprob += logprob[token].logprob
        min_reached = self.num_generated >= params.min_tokens
        if min_reached and token in params.stop_token_ids:
            self.finish_reason, self.stop_reason = "stop", token
            return
        if min_reached and not params.ignore_eos and token in eos_ids:
            self.finish_reason = "stop"
            return
        previous = len(self.text)
        self.text += self.detokenizer.add(token)
        if min_reached and params.stop and len(self.text) > previous:
            self._check_stop_strings(previous)
        if self.finish_reason is None:
            if params.max_tokens is not None and self.num_generated >= params.max_tokens:
                self.finish_reason = "length"
            elif len(self.token_ids) >= max_len:
                self.finish_reason = "length"

    def _check_stop_strings(self, previous: int) -> None:
        longest = max(len(s) for s in self.params.stop)
        search_from = max(0, previous - longest + 1)
        hits = [(self.text.find(s, search_from), s) for s in self.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            at, stop = min(hits)
            end = at + len(stop) if self.params.include_stop_str_in_output else at
            self.text = self.text[:end]
            self.finish_reason, self.stop_reason = "stop", stop

    def completion(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.visible_text(),
            token_ids=list(self.output_ids),
            cumulative_logprob=self.cumulative_logprob if self.params.logprobs is not None else None,
            logprobs=list(self.logprobs) if self.params.logprobs is not None else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclasses.dataclass(eq=False)
class Request:
    """A user request: prompt, sampling parameters, n sequences, timing."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    metrics: RequestMetrics
    seqs: list[Sequence] = dataclasses.field(default_factory=list)
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(s.status is Status.FINISHED for s in self.seqs)

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=list(self.prompt_token_ids),
            outputs=[s.completion() for s in self.seqs],
            finished=self.finished,
            metrics=self.metrics,
            num_cached_tokens=self.num_cached_tokens,
        )
