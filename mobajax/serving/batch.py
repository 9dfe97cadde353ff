"""Host-side assembly of one step's device arrays from the scheduler's output (bucketed shapes)."""

from __future__ import annotations

import numpy as np

from mobajax.attention import PagedMetadata
from mobajax.serving.model_runner import Flags, next_power_of_two
from mobajax.serving.sampler import NUM_TOP_LOGPROBS, SamplingArrays
from mobajax.serving.scheduler import SchedulerOutput
from mobajax.serving.sequence import Sequence

MIN_TOKENS_BUCKET = 16


def flags_for(seqs: list[Sequence]) -> Flags:
    """The sampler variant a set of sequences needs."""
    params = [s.params for s in seqs]
    return Flags(
        use_filters=any(p.temperature > 0 and (p.top_k > 0 or p.top_p < 1 or p.min_p > 0) for p in params),
        use_penalties=any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1 for p in params),
        num_logprobs=NUM_TOP_LOGPROBS if any(p.logprobs for p in params) else 0,
    )


def sampling_arrays(
    seqs: list[Sequence], rows: int, stop_ids: list[list[int]], vocab: int, flags: Flags
) -> SamplingArrays:
    """Per-row sampling parameters for `seqs`, padded to `rows` (padding rows are greedy)."""
    width = next_power_of_two(max([4] + [len(s) for s in stop_ids]))
    a = {
        name: np.zeros(rows, dtype)
        for name, dtype in [
            ("temperature", np.float32), ("top_k", np.int32), ("top_p", np.float32), ("min_p", np.float32),
            ("presence", np.float32), ("frequency", np.float32), ("repetition", np.float32),
            ("seeds", np.uint32), ("counters", np.int32), ("min_tokens", np.int32),
        ]
    }
    a["top_p"][:] = 1.0
    a["repetition"][:] = 1.0
    stops = np.full((rows, width), -1, np.int32)
    counts = np.zeros((rows, vocab), np.int32) if flags.use_penalties else None
    prompt_mask = np.zeros((rows, vocab), bool) if flags.use_penalties else None
    for i, (seq, ids) in enumerate(zip(seqs, stop_ids)):
        p = seq.params
        top_k = p.top_k if p.top_k < vocab else 0  # a top-k over the whole vocabulary is no filter
        a["temperature"][i], a["top_k"][i], a["top_p"][i], a["min_p"][i] = p.temperature, top_k, p.top_p, p.min_p
        a["presence"][i], a["frequency"][i] = p.presence_penalty, p.frequency_penalty
        a["repetition"][i] = p.repetition_penalty
        a["seeds"][i] = (seq.request.seed * 1_000_003 + seq.index) % (1 << 32)
        a["counters"][i], a["min_tokens"][i] = seq.num_generated, p.min_tokens
        stops[i, : len(ids)] = ids
        if flags.use_penalties:
            counts[i] = np.bincount(seq.output_ids, minlength=vocab)[:vocab]
            prompt_mask[i, seq.token_ids[: seq.num_prompt]] = True
    return SamplingArrays(**a, stop_ids=stops, counts=counts, prompt_mask=prompt_mask)


def token_bucket(num_tokens: int, num_samples: int) -> int:
    return next_power_of_two(max(num_tokens, num_samples, MIN_TOKENS_BUCKET))


def step_inputs(out: SchedulerOutput, page_size: int, pages_per_seq: int, max_rows: int):
    """(tokens, positions, meta, logits_index, sample seqs, rows) for a mixed step.

    Token rows are padded to a power of two T; sequence rows and sample rows to min(T, max_rows).
    Padding tokens have position and slot -1; padding sequences have no tokens and length 0.
    """
    tokens, positions, slots, token_seq, cu, kv_lens = [], [], [], [], [0], []
    samples: list[tuple[Sequence, int]] = []
    sample_row_of: dict[int, int] = {}
    for r, item in enumerate(out.scheduled):
        seq = item.seq
        for p in range(item.start, item.start + item.count):
            tokens.append(seq.token_ids[p])
            positions.append(p)
            slots.append(seq.pages[p // page_size] * page_size + p % page_size)
            token_seq.append(r)
        cu.append(len(tokens))
        kv_lens.append(item.start + item.count)
        if item.sample:
            samples.append((seq, len(tokens) - 1))
            sample_row_of[seq.seq_id] = len(tokens) - 1
    samples += [(child, sample_row_of[parent.seq_id]) for child, parent in out.forks]
    t = token_bucket(len(tokens), len(samples))
    rows = min(t, max_rows)
    while rows < max(len(out.scheduled), len(samples)):
        t *= 2
        rows = min(t, max_rows)
    pad = t - len(tokens)
    page_table = np.zeros((rows, pages_per_seq), np.int32)
    for r, item in enumerate(out.scheduled):
        page_table[r, : len(item.seq.pages)] = item.seq.pages
    meta = PagedMetadata(
        slots=np.asarray(slots + [-1] * pad, np.int32),
        page_table=page_table,
        cu_q_lens=np.asarray(cu + [cu[-1]] * (rows - len(out.scheduled)), np.int32),
        kv_lens=np.asarray(kv_lens + [0] * (rows - len(out.scheduled)), np.int32),
        token_seq=np.asarray(token_seq + [0] * pad, np.int32),
    )
    logits_index = np.zeros(rows, np.int32)
    logits_index[: len(samples)] = [row for _, row in samples]
    return (
        np.asarray(tokens + [0] * pad, np.int32),
        np.asarray(positions + [-1] * pad, np.int32),
        meta,
        logits_index,
        [seq for seq, _ in samples],
        rows,
    )


def decode_inputs(
    seqs: list[Sequence], steps: list[int], num_steps: int, page_size: int, pages_per_seq: int, offset: int = 0
):
    """(tokens, positions, slots [num_steps, R], page_table, remaining) for a fused decode.

    steps[b]: decode steps sequence b may take (its pages are reserved for them). offset: the call
    starts that many tokens past each sequence's computed ones (a call chained after one whose
    tokens the host has not seen yet); its input tokens are then unknown here (zeros).
    """
    rows = next_power_of_two(len(seqs))
    tokens = np.zeros(rows, np.int32)
    positions = np.zeros(rows, np.int32)
    remaining = np.zeros(rows, np.int32)
    slots = np.full((num_steps, rows), -1, np.int32)
    page_table = np.zeros((rows, pages_per_seq), np.int32)
    for b, (seq, k) in enumerate(zip(seqs, steps)):
        start = seq.num_computed + offset
        positions[b], remaining[b] = start, k
        if not offset:
            tokens[b] = seq.token_ids[start]
        page_table[b, : len(seq.pages)] = seq.pages
        for i in range(k):
            p = start + i
            slots[i, b] = seq.pages[p // page_size] * page_size + p % page_size
    return tokens, positions, slots, page_table, remaining
