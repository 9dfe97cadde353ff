"""FCFS scheduler with a token budget, chunked prefill, decodes first and preemption by recompute.

Each step computes, for every scheduled sequence, the tokens from `num_computed` on (a whole
decode token, or a chunk of a prompt), within `max_num_batched_tokens` and `max_num_seqs`.
Running sequences go first (those decoding before those still prefilling), then waiting ones in
arrival order. When pages run out, the most recently admitted running sequence is preempted:
its pages are freed and it goes back to the front of the queue to be recomputed (its tokens are
kept, so the output does not change). Nothing runs out of memory and nothing is lost.
"""

from __future__ import annotations

import collections
import dataclasses

from mobajax.serving.block_manager import BlockManager
from mobajax.serving.config import EngineConfig
from mobajax.serving.sequence import Request, Sequence, Status


@dataclasses.dataclass
class ScheduledSeq:
    """Compute tokens [start, start + count) of `seq`; sample after them if `sample`."""

    seq: Sequence
    start: int
    count: int

    @property
    def sample(self) -> bool:
        return self.start + self.count == len(self.seq.token_ids)


@dataclasses.dataclass
class SchedulerOutput:
    """One step's work. forks: (child, parent) pairs; the child samples from the parent's row.
    copies: (source page, destination page) copies to make before the step (copy-on-write)."""

    scheduled: list[ScheduledSeq]
    forks: list[tuple[Sequence, Sequence]]
    copies: list[tuple[int, int]]

    @property
    def num_tokens(self) -> int:
        return sum(s.count for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config = config
        self.blocks = block_manager
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which were found

    def add(self, request: Request) -> None:
        first, *children = request.seqs
        for child in children:
            child.status = Status.FORKING
        self.waiting.append(first)

    # -- pages ---------------------------------------------------------------------------
    def reserve(self, seq: Sequence, count: int, copies: list[tuple[int, int]]) -> bool:
        """Pages for positions [num_computed, num_computed + count), copying shared ones."""
        g = self.blocks.page_size
        end = seq.num_computed + count
        new_pages = -(-end // g) - len(seq.pages)
        shared = [i for i in range(seq.num_computed // g, len(seq.pages)) if self.blocks.is_shared(seq.pages[i])]
        if self.blocks.num_free < max(new_pages, 0) + len(shared):
            return False
        for i in shared:
            fresh = self.blocks.copy_on_write(seq.pages[i])
            copies.append((seq.pages[i], fresh))
            seq.pages[i] = fresh
        seq.pages.extend(self.blocks.allocate() for _ in range(new_pages))
        return True

    def free(self, seq: Sequence) -> None:
        self.blocks.release(seq.pages)
        seq.pages, seq.block_hashes = [], []

    def _preempt(self, seq: Sequence, scheduled: list[ScheduledSeq]) -> None:
        self.free(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        scheduled[:] = [s for s in scheduled if s.seq is not seq]
        self.num_preemptions += 1

    # -- the step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        copies: list[tuple[int, int]] = []
        preempted = False
        decoding = [s for s in self.running if len(s.token_ids) - s.num_computed == 1]
        prefilling = [s for s in self.running if len(s.token_ids) - s.num_computed > 1]
        for seq in decoding + prefilling:
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this step
            used = sum(s.count for s in scheduled)
            count = min(len(seq.token_ids) - seq.num_computed, budget - used)
            if count <= 0:
                continue
            while not self.reserve(seq, count, copies):
                victim = self.running[-1]
                preempted = True
                self._preempt(victim, scheduled)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                scheduled.append(ScheduledSeq(seq, seq.num_computed, count))
        if not preempted:
            self._admit(scheduled, budget, copies)
        forks = self._fork(scheduled)
        return SchedulerOutput(scheduled, forks, copies)

    def _admit(self, scheduled: list[ScheduledSeq], budget: int, copies: list[tuple[int, int]]) -> None:
        g = self.blocks.page_size
        while self.waiting:
            seq = self.waiting[0]
            budget_left = budget - sum(s.count for s in scheduled)
            width = 1 + sum(1 for c in seq.request.seqs if c.status is Status.FORKING)
            if budget_left <= 0 or len(self.running) + width > self.config.max_num_seqs:
                return
            cached, hashes = self.blocks.match_prefix(seq.token_ids)
            count = min(len(seq.token_ids) - len(cached) * g, budget_left)
            new_pages = -(-(len(cached) * g + count) // g) - len(cached)
            reusable = sum(1 for p in cached if self.blocks.ref_counts[p] == 0)  # leave the free list
            if self.blocks.num_free - reusable < new_pages:
                return
            if self.blocks.enable_prefix_caching:
                self.prefix_queries += len(seq.token_ids)
                self.prefix_hits += len(cached) * g
            for page in cached:
                self.blocks.acquire(page)
            seq.pages, seq.block_hashes = list(cached), list(hashes)
            seq.num_computed = len(cached) * g
            if seq.num_generated == 0 and seq.index == 0:
                seq.request.num_cached_tokens = seq.num_computed
            seq.pages.extend(self.blocks.allocate() for _ in range(new_pages))
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, seq.num_computed, count))

    def _fork(self, scheduled: list[ScheduledSeq]) -> list[tuple[Sequence, Sequence]]:
        """n > 1: children join when their parent's prompt is complete, sharing its pages."""
        forks = []
        for item in scheduled:
            parent = item.seq
            if not item.sample or parent.num_generated or parent.index:
                continue
            for child in parent.request.seqs:
                if child.status is not Status.FORKING:
                    continue
                for page in parent.pages:
                    self.blocks.acquire(page)
                child.pages, child.block_hashes = list(parent.pages), list(parent.block_hashes)
                child.num_computed = item.start + item.count
                child.status = Status.RUNNING
                self.running.append(child)
                forks.append((child, parent))
        return forks

    def advance(self, item: ScheduledSeq) -> None:
        """After the step ran: the tokens are cached; newly full pages join the prefix cache."""
        seq = item.seq
        seq.num_computed = item.start + item.count
        g = self.blocks.page_size
        for i in range(len(seq.block_hashes), seq.num_computed // g):
            previous = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(self.blocks.register(seq.pages[i], previous, seq.token_ids[i * g : (i + 1) * g]))

    def finish(self, seq: Sequence) -> None:
        """Free a finished (or aborted) sequence's pages and drop it from the queues."""
        self.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
