"""LLMEngine: continuous batching over a static page pool.

    add_request(...)   validate, queue
    step()             schedule -> one jitted call (mixed step, or fused decode steps) -> outputs

A step makes one device round trip: the host builds small index arrays, the device runs the
model over the donated pool and samples, and only the sampled ids (and requested logprobs) come
back.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from mobajax.attention import PagedMetadata
from mobajax.models import MobaConfig, Pretrained, load_pretrained
from mobajax.models.convert import resolve_dtype
from mobajax.pallas.attention_chunk import HEAD_DIMS
from mobajax.pallas.paged_decode import PAGE_SIZES
from mobajax.serving import batch
from mobajax.serving.block_manager import BlockManager
from mobajax.serving.config import EngineConfig
from mobajax.serving.model_runner import Flags, ModelRunner, next_power_of_two, select_rows
from mobajax.serving.outputs import EngineStats, Logprob, RequestMetrics, RequestOutput
from mobajax.serving.sampler import Sampled, SamplingArrays
from mobajax.serving.sampling_params import SamplingParams
from mobajax.serving.scheduler import ScheduledSeq, Scheduler
from mobajax.serving.sequence import IncrementalDetokenizer, Request, Sequence, Status

CPU_POOL_BYTES = 2 << 30  # default KV pool on a CPU: 2 GiB


@dataclasses.dataclass
class StepTimes:
    """Cumulative wall seconds of `LLMEngine.step` by phase: `schedule` (scheduler, decode
    look-ahead), `inputs` (index and sampling arrays built on the host; for fused decodes also the
    dispatch of the jitted call, which returns before the device finishes on a GPU), `device`
    (waiting until the sampled ids are on the host), `outputs` (appending tokens, stop checks,
    detokenising, building the outputs)."""

    schedule: float = 0.0
    inputs: float = 0.0
    device: float = 0.0
    outputs: float = 0.0

    def total(self) -> float:
        return self.schedule + self.inputs + self.device + self.outputs


@dataclasses.dataclass
class InFlightDecode:
    """A dispatched fused decode whose sampled ids (device arrays) the host has not read yet."""

    seqs: list[Sequence]
    steps: list[int]
    num_steps: int
    arrays: SamplingArrays
    flags: Flags
    sampled: Sampled


class LLMEngine:
    def __init__(self, pretrained: Pretrained, config: EngineConfig = EngineConfig()):
        mc = pretrained.config
        if config.max_model_len is not None and config.max_model_len > mc.max_position_embeddings:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the model's maximum length {mc.max_position_embeddings}"
            )
        if mc.moba is not None and mc.moba.block_size % config.page_size:
            raise ValueError(
                f"MoBA block_size {mc.moba.block_size} must be a multiple of the page size {config.page_size}"
            )
        self.config = config
        self.tokenizer = pretrained.tokenizer
        self.model_config = mc
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        pool_sharding = None
        devices_needed = config.tensor_parallel_size * config.expert_parallel_size
        if devices_needed > 1:
            pretrained, pool_sharding = self._parallelize(pretrained, config, devices_needed)
        dtype = resolve_dtype(config.dtype)
        params = pretrained.params
        if pretrained.dtype != config.dtype:
            params = jax.tree.map(lambda x: x.astype(dtype), params)
        module = pretrained.module.clone(
            config=dataclasses.replace(mc, attention_impl=self.attention_impl(mc, config)), dtype=dtype
        )
        num_pages = config.num_pages or self._auto_num_pages(mc, dtype)
        if num_pages * config.page_size < self.max_model_len:
            raise ValueError(
                f"the KV pool ({num_pages} pages of {config.page_size} tokens) cannot hold one request of "
                f"max_model_len {self.max_model_len}: raise num_pages or lower max_model_len"
            )
        self.blocks = BlockManager(num_pages, config.page_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.blocks)
        self.runner = ModelRunner(module, params, num_pages, config.page_size, self.max_model_len, dtype, pool_sharding)
        self.max_rows = next_power_of_two(config.max_num_seqs)
        eos = set(mc.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        self.requests: dict[str, Request] = {}
        self.stats_counters = EngineStats()
        self._rng = np.random.default_rng(config.seed)
        self.times = StepTimes()
        self._in_flight: InFlightDecode | None = None
        self.num_chained_decodes = 0  # fused decodes dispatched before the previous one's results were read

    @classmethod
    def from_pretrained(
        cls, model: str = "default", config: EngineConfig = EngineConfig(), moba: MobaConfig | None = None
    ) -> LLMEngine:
        """Load `model` (optionally with MoBA attention) and build an engine for it."""
        return cls(load_pretrained(model, dtype=config.dtype, moba=moba), config)

    @staticmethod
    def attention_impl(mc, config: EngineConfig) -> str:
        """"pallas" (the paged Triton kernels) on a GPU when they support the model's shapes, else "xla"."""
        supported = (
            mc.head_dim in HEAD_DIMS and config.page_size in PAGE_SIZES and not any(mc.layer_windows)
        )
        return "pallas" if jax.default_backend() == "gpu" and supported else "xla"

    @staticmethod
    def _parallelize(pretrained: Pretrained, config: EngineConfig, devices_needed: int):
        """(pretrained sharded over a (1, expert, tensor) mesh, the page pool's sharding)."""
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from mobajax.parallel import make_parallel

        devices = jax.devices()
        if len(devices) < devices_needed:
            raise ValueError(
                f"tensor_parallel_size {config.tensor_parallel_size} x expert_parallel_size "
                f"{config.expert_parallel_size} needs {devices_needed} devices, found {len(devices)}"
            )
        pretrained, mesh = make_parallel(
            pretrained, tensor_parallel_size=config.tensor_parallel_size,
            expert_parallel_size=config.expert_parallel_size, devices=devices[:devices_needed],
        )
        return pretrained, NamedSharding(mesh, P(None, None, "tensor", None))

    def _auto_num_pages(self, mc, dtype) -> int:
        page_bytes = ModelRunner.page_bytes(mc, self.config.page_size, dtype)
        if jax.default_backend() == "cpu":
            wanted = self.config.max_num_seqs * -(-self.max_model_len // self.config.page_size)
            return max(2, min(wanted, CPU_POOL_BYTES // page_bytes))
        stats = jax.devices()[0].memory_stats() or {}
        free = stats.get("bytes_limit", 0) * self.config.gpu_memory_utilization - stats.get("bytes_in_use", 0)
        return max(2, int(free // page_bytes))

    # -- requests ------------------------------------------------------------------------
    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """ValueError naming the problem if the request cannot be served (reads no engine state)."""
        n_prompt = len(prompt_token_ids)
        if n_prompt == 0:
            raise ValueError("the prompt is empty: it must hold at least one token")
        vocab = self.model_config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        room = self.max_model_len - n_prompt
        if room < 1 or (params.max_tokens is not None and params.max_tokens > room):
            wanted = n_prompt + (params.max_tokens or 1)
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{wanted} tokens ({n_prompt} in the prompt, {wanted - n_prompt} for the completion). "
                "Please reduce the prompt or max_tokens."
            )
        if params.min_tokens > room:
            raise ValueError(f"min_tokens ({params.min_tokens}) exceeds the {room} tokens left after the prompt")
        if any(t >= vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must lie in [0, {vocab})")
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n ({params.n}) exceeds max_num_seqs ({self.config.max_num_seqs})")

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None
    ) -> None:
        """Queue a request; ValueError (naming the problem) if it cannot be served."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate_request(prompt_token_ids, params)
        n_prompt = len(prompt_token_ids)
        seed = params.seed if params.seed is not None else int(self._rng.integers(1 << 31))
        request = Request(request_id, prompt, list(prompt_token_ids), params, seed, RequestMetrics(time.monotonic()))
        request.seqs = [
            Sequence(request, i, list(prompt_token_ids), n_prompt,
                     IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens))
            for i in range(params.n)
        ]
        self.requests[request_id] = request
        self.scheduler.add(request)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its pages; returns its final output (None if unknown)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if seq.status is not Status.FINISHED:
                seq.finish_reason = seq.finish_reason or "abort"
                self.scheduler.finish(seq)
        self._count_finished(request)
        return request.output()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def stats(self) -> EngineStats:
        s = self.stats_counters
        s.num_running = len(self.scheduler.running)
        s.num_waiting = len(self.scheduler.waiting)
        s.kv_cache_usage = self.blocks.usage()
        s.num_free_pages, s.num_total_pages = self.blocks.num_free, self.blocks.num_pages
        s.num_preemptions = self.scheduler.num_preemptions
        s.prefix_cache_queries, s.prefix_cache_hits = self.scheduler.prefix_queries, self.scheduler.prefix_hits
        return dataclasses.replace(s, requests_finished=dict(s.requests_finished))

    # -- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; returns the outputs of the requests it advanced.

        With async scheduling, a fused decode may already be in flight (dispatched by the previous
        step before it read its own results): then this step collects it instead of scheduling."""
        start = time.perf_counter()
        flight, self._in_flight = self._in_flight, None
        if flight is not None and all(seq.finish_reason is not None for seq in flight.seqs):
            flight = None  # every sequence finished (or was aborted) meanwhile: nothing to collect
        out = decodes = None
        if flight is None:
            out = self.scheduler.schedule()
            decodes = None if out.is_empty else self._fused_decode_plan(out)
        scheduled = time.perf_counter()
        self.times.schedule += scheduled - start
        if flight is None and out.is_empty:
            return []
        inputs, device = self.times.inputs, self.times.device
        if flight is not None:
            touched = self._complete(flight)
        elif decodes is not None:
            touched = self._run_decode(*decodes)
        else:
            now = time.monotonic()
            for item in out.scheduled:
                if item.seq.request.metrics.first_scheduled_time is None:
                    item.seq.request.metrics.first_scheduled_time = now
            touched = self._run_step(out)
        outputs = self._collect(touched)
        run = time.perf_counter() - scheduled
        self.times.outputs += run - (self.times.inputs - inputs) - (self.times.device - device)
        return outputs

    def _stop_ids(self, seq: Sequence) -> list[int]:
        ids = list(seq.params.stop_token_ids)
        if not seq.params.ignore_eos:
            ids += sorted(self.eos_ids)
        return ids

    def _run_step(self, out) -> set[Request]:
        start = time.perf_counter()
        tokens, positions, meta, logits_index, sample_seqs, rows = batch.step_inputs(
            out, self.config.page_size, self.runner.pages_per_seq, self.max_rows
        )
        flags = batch.flags_for(sample_seqs)
        arrays = batch.sampling_arrays(
            sample_seqs, rows, [self._stop_ids(s) for s in sample_seqs], self.model_config.vocab_size, flags
        )
        dispatch = time.perf_counter()
        self.times.inputs += dispatch - start
        sampled = jax.device_get(self.runner.step(out.copies, tokens, positions, meta, logits_index, arrays, flags))
        self.times.device += time.perf_counter() - dispatch
        for item in out.scheduled:
            self.scheduler.advance(item)
        for i, seq in enumerate(sample_seqs):
            self._append(seq, sampled, (i,))
        return {item.seq.request for item in out.scheduled} | {seq.request for seq in sample_seqs}

    def _allowed(self, seq: Sequence) -> int:
        """Tokens the sequence may still generate."""
        by_len = self.max_model_len - len(seq.token_ids)
        if seq.params.max_tokens is None:
            return by_len
        return min(by_len, seq.params.max_tokens - seq.num_generated)

    def _worth_fusing(self, useful_steps: int) -> bool:
        """A fused call always runs decode_steps steps; with fewer useful ones left it still beats
        single steps (a host round trip each, and the general attention path) when over half are."""
        return 2 * useful_steps > self.config.decode_steps

    def _fused_decode_plan(self, out):
        """(seqs, steps per seq, num_steps) when several decode steps can run in one call."""
        k = self.config.decode_steps
        if k == 1 or self.scheduler.waiting or out.forks or out.copies:
            return None
        if any(item.count != 1 or not item.sample for item in out.scheduled):
            return None
        seqs = [item.seq for item in out.scheduled]
        if not self._worth_fusing(max(self._allowed(s) for s in seqs)):
            return None
        steps, copies = [], []
        for seq in seqs:
            want = min(k, self._allowed(seq))
            if want > 1 and not self.scheduler.reserve(seq, want, copies):
                return None  # not enough free pages for the look-ahead: single step
            steps.append(want)
        assert not copies, "look-ahead pages are fresh: the page being written was made private this step"
        return seqs, steps, k

    def _run_decode(self, seqs: list[Sequence], steps: list[int], num_steps: int) -> set[Request]:
        start = time.perf_counter()
        now = time.monotonic()
        for seq in seqs:
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = now
        tokens, positions, slots, page_table, remaining = batch.decode_inputs(
            seqs, steps, num_steps, self.config.page_size, self.runner.pages_per_seq
        )
        flags = batch.flags_for(seqs)
        arrays = batch.sampling_arrays(
            seqs, len(tokens), [self._stop_ids(s) for s in seqs], self.model_config.vocab_size, flags
        )
        sampled = self.runner.decode(tokens, positions, slots, page_table, remaining, arrays, flags, num_steps)
        self.times.inputs += time.perf_counter() - start
        return self._complete(InFlightDecode(seqs, steps, num_steps, arrays, flags, sampled))

    def _chain(self, flight: InFlightDecode) -> InFlightDecode | None:
        """Dispatch the next fused decode before `flight`'s results are read, from its last sampled
        tokens on the device, when nothing can change the batch: async scheduling, no request
        waiting, no penalties (their token counts live on the host), over half of the chained steps
        useful, and pages for the look-ahead.

        It runs the sequences of `flight` that may go on: not finished, and not ending by length
        in `flight`. One that stops on a token during `flight` still runs in it; its tokens are
        dropped when collected, and its writes land in pages it owns until then (any later owner
        writes them after this call, in device order)."""
        k = flight.num_steps
        if not self.config.async_scheduling or self.scheduler.waiting or flight.flags.use_penalties:
            return None
        keep = [
            b for b, (seq, steps) in enumerate(zip(flight.seqs, flight.steps))
            if seq.finish_reason is None and steps == k and self._allowed(seq) > k
        ]
        seqs = [flight.seqs[b] for b in keep]
        steps = [min(k, self._allowed(seq) - k) for seq in seqs]
        if not seqs or not self._worth_fusing(max(steps)):
            return None
        start = time.perf_counter()
        copies: list[tuple[int, int]] = []
        if not all(self.scheduler.reserve(seq, k + n, copies) for seq, n in zip(seqs, steps)):
            return None
        assert not copies, "the chained call's pages are fresh"
        _, positions, slots, page_table, remaining = batch.decode_inputs(
            seqs, steps, k, self.config.page_size, self.runner.pages_per_seq, offset=k
        )
        last = flight.sampled.tokens[k - 1]  # -1 where the row stopped before its last step: it stays stopped
        arrays = flight.arrays
        if len(seqs) < len(flight.seqs):  # fewer rows: gather their tokens and parameters
            rows = np.full(len(positions), -1, np.int32)
            rows[: len(keep)] = keep
            last = select_rows(last, rows)
            stop_ids = [self._stop_ids(s) for s in seqs]
            arrays = batch.sampling_arrays(seqs, len(positions), stop_ids, self.model_config.vocab_size, flight.flags)
        arrays = arrays._replace(counters=arrays.counters + k)
        sampled = self.runner.decode(last, positions, slots, page_table, remaining, arrays, flight.flags, k)
        self.times.inputs += time.perf_counter() - start
        self.num_chained_decodes += 1
        return InFlightDecode(seqs, steps, k, arrays, flight.flags, sampled)

    def _complete(self, flight: InFlightDecode) -> set[Request]:
        """Chain the next call if allowed, then wait for `flight`'s tokens and append them."""
        self._in_flight = self._chain(flight)
        start = time.perf_counter()
        sampled = jax.device_get(flight.sampled)
        self.times.device += time.perf_counter() - start
        for b, seq in enumerate(flight.seqs):
            first = seq.num_computed
            taken = 0
            for i in range(flight.num_steps):
                if sampled.tokens[i, b] < 0 or seq.finish_reason is not None:
                    break
                self._append(seq, sampled, (i, b))
                taken += 1
            if seq.status is not Status.FINISHED:
                self.scheduler.advance(ScheduledSeq(seq, first, taken))
        return {seq.request for seq in flight.seqs}

    def _append(self, seq: Sequence, sampled: Sampled, at: tuple[int, ...]) -> None:
        token = int(sampled.tokens[at])
        logprob = None
        if seq.params.logprobs is not None:
            logprob = {token: Logprob(float(sampled.logprob[at]), self._piece(token))}
            for tid, lp in zip(
                sampled.top_ids[at][: seq.params.logprobs], sampled.top_logprobs[at][: seq.params.logprobs]
            ):
                logprob.setdefault(int(tid), Logprob(float(lp), self._piece(int(tid))))
        seq.append(token, logprob, self.eos_ids, self.max_model_len)
        metrics = seq.request.metrics
        metrics.last_token_time = time.monotonic()
        if metrics.first_token_time is None:
            metrics.first_token_time = metrics.last_token_time
            self.stats_counters.prompt_tokens += len(seq.request.prompt_token_ids)
        self.stats_counters.generation_tokens += 1
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)

    def _piece(self, token: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token])

    def _count_finished(self, request: Request) -> None:
        request.metrics.finished_time = time.monotonic()
        reason = request.seqs[0].finish_reason or "abort"
        counts = self.stats_counters.requests_finished
        counts[reason] = counts.get(reason, 0) + 1

    def _collect(self, touched: set[Request]) -> list[RequestOutput]:
        outputs = []
        for request in sorted(touched, key=lambda r: r.metrics.arrival_time):
            if request.request_id not in self.requests:
                continue  # aborted during the step
            if request.finished:
                del self.requests[request.request_id]
                self._count_finished(request)
            outputs.append(request.output())
        return outputs

    # -- warm-up -------------------------------------------------------------------------
    def buckets(self) -> tuple[list[int], list[int]]:
        """(token counts of mixed steps, row counts of fused decodes) that get compiled."""
        top = batch.token_bucket(self.config.max_num_batched_tokens, 0)
        tokens = [t for t in (1 << i for i in range(4, top.bit_length())) if t <= top]
        rows = [1 << i for i in range(self.max_rows.bit_length())]
        return tokens, rows if self.config.decode_steps > 1 else []

    def warmup(self) -> None:
        """Compile every step bucket now, with a progress bar, instead of on the first requests.

        Runs the steps on padding only (no token is written, no page is used)."""
        token_buckets, row_buckets = self.buckets()
        pages = self.runner.pages_per_seq
        vocab = self.model_config.vocab_size
        with tqdm(total=len(token_buckets) + len(row_buckets), desc="compiling steps", unit="bucket") as bar:
            for t in token_buckets:
                rows = min(t, self.max_rows)
                meta = PagedMetadata(
                    np.full(t, -1, np.int32), np.zeros((rows, pages), np.int32), np.zeros(rows + 1, np.int32),
                    np.zeros(rows, np.int32), np.zeros(t, np.int32),
                )
                arrays = batch.sampling_arrays([], rows, [], vocab, Flags())
                self.runner.step(
                    [], np.zeros(t, np.int32), np.full(t, -1, np.int32), meta, np.zeros(rows, np.int32), arrays, Flags()
                )
                bar.update()
            for rows in row_buckets:
                k = self.config.decode_steps
                zeros = np.zeros(rows, np.int32)
                arrays = batch.sampling_arrays([], rows, [], vocab, Flags())
                slots = np.full((k, rows), -1, np.int32)
                self.runner.decode(zeros, zeros, slots, np.zeros((rows, pages), np.int32), zeros, arrays, Flags(), k)
                if self.config.async_scheduling:  # a chain that drops rows gathers into a smaller bucket
                    for fewer in (r for r in row_buckets if r <= rows):
                        select_rows(zeros, np.full(fewer, -1, np.int32))
                bar.update()
        jax.block_until_ready(self.runner.pools)
