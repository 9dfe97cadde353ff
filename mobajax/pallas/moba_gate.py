"""MoBA gate in Pallas (Triton lowering): pooled keys and per-token top-k chunk selection.

The gate never writes a [tokens, chunks] score tensor: each program scores one tile of tokens, with
all the query heads of one kv head, against that kv head's pooled keys in registers and writes only
the chosen chunk ids, so HBM holds [T, N, top_k] int32 indices and the pooled keys [K, Cp, H]
(float32, or a 16-bit hi + lo pair for 16-bit queries).

Ragged batches are flat: q [T, N, H] and k [S, K, H] hold the sequences back to back, described by
cu_seqlens-style offsets. Chunks get global ids (sequence by sequence); each token's candidates are
the chunks of its own sequence before its own chunk. Ties between equal gate scores: the lower chunk
index wins (as in `mobajax.moba`).

Shape letters: T tokens, S keys, N query heads, K kv heads, H head dim, C chunks (padded: Cp),
B block size, J slots (top_k).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MAX_CHUNKS = 8192  # chunk ids of a batch: gate tiles shrink as Cp grows (rows x Cp <= max_scores)


def gather_rows(ref, rows, *middle):
    """ref[rows, *middle, :] as [len(rows), H]: a row gather written with integer arrays only
    (pointer arithmetic under Triton; the form interpret mode can discharge)."""
    cols = jnp.arange(ref.shape[-1])[None, :]
    return ref.at[rows[:, None], *middle, cols]


def kv_head_tile(rows: int, group: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The rows of program (token tile i, kv head h) when a row is a (token, query head) pair of
    the tile's rows // group tokens x the `group` query heads of kv head h -> (token [rows], query
    head [rows], whole [rows]: False for the rows past the last whole token)."""
    i, h = pl.program_id(0), pl.program_id(1)
    r = jnp.arange(rows)
    return i * (rows // group) + r // group, h * group + r % group, r < rows // group * group


class MobaLayout(NamedTuple):
    """Where every token and chunk of a flat ragged batch lives (all int32).

    token_pos [T]: position of the query in its sequence (-1: padding token, attends nowhere).
    token_lo [T]: global id of the first chunk of the token's sequence.
    token_own [T]: global id of the token's own chunk (-1 for padding).
    chunk_start [C]: index into k of the chunk's first key; chunk_len [C]: its number of keys
    (0 for unused ids); chunk_pos [C]: position of its first key in its sequence.
    """

    token_pos: jax.Array
    token_lo: jax.Array
    token_own: jax.Array
    chunk_start: jax.Array
    chunk_len: jax.Array
    chunk_pos: jax.Array


def num_chunk_ids(num_keys: int, num_seqs: int, block_size: int) -> int:
    """Static upper bound on the chunks of a flat batch: sum_b ceil(S_b / B)."""
    return max(1, -(-num_keys // block_size) + num_seqs - 1)


def moba_layout(
    cu_seqlens_q: jax.Array,
    cu_seqlens_k: jax.Array,
    q_positions: jax.Array | None,
    num_tokens: int,
    num_keys: int,
    block_size: int,
) -> MobaLayout:
    """Per-token and per-chunk metadata of a flat batch from [B+1] offsets (plain XLA).

    Queries default to the tail of their sequence's keys: position S_b - T_b + i.
    """
    num_seqs = cu_seqlens_q.shape[0] - 1
    cu_q = cu_seqlens_q.astype(jnp.int32)
    cu_k = cu_seqlens_k.astype(jnp.int32)
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(cu_q, t, side="right", method="scan_unrolled") - 1, 0, num_seqs - 1)
    live = (t >= cu_q[0]) & (t < cu_q[-1])
    q_len, k_len = jnp.diff(cu_q), jnp.diff(cu_k)
    if q_positions is None:
        pos = k_len[seq] - q_len[seq] + (t - cu_q[seq])
    else:
        pos = jnp.asarray(q_positions, jnp.int32)
    pos = jnp.where(live, pos, -1)
    per_seq = -(-k_len // block_size)
    ends = jnp.cumsum(per_seq)
    first = ends - per_seq
    c = jnp.arange(num_chunk_ids(num_keys, num_seqs, block_size), dtype=jnp.int32)
    cseq = jnp.clip(jnp.searchsorted(ends, c, side="right", method="scan_unrolled"), 0, num_seqs - 1)
    local = c - first[cseq]
    exists = c < ends[-1]
    return MobaLayout(
        token_pos=pos,
        token_lo=first[seq],
        token_own=jnp.where(live, first[seq] + pos // block_size, -1),
        chunk_start=jnp.where(exists, cu_k[cseq] + local * block_size, 0),
        chunk_len=jnp.where(exists, jnp.minimum(block_size, k_len[cseq] - local * block_size), 0),
        chunk_pos=jnp.where(exists, local * block_size, 0),
    )


def moba_chunk_mean_kernel(
    start_ref,  # [C] int32
    len_ref,  # [C] int32
    k_ref,  # [S, K, H]
    *kbar_refs,  # [K, Cp, H] (out): float32 kbar, or 16-bit hi and lo
    block_k: int,
    num_keys: int,
    num_chunks: int,
):
    c, h = pl.program_id(0), pl.program_id(1)
    real = c < num_chunks
    cc = jnp.minimum(c, num_chunks - 1)
    start = start_ref[cc]
    size = jnp.where(real, len_ref[cc], 0)
    offs = jnp.arange(block_k)

    def body(j, acc):
        idx = j * block_k + offs
        rows = jnp.minimum(start + idx, num_keys - 1)
        kk = plgpu.load(gather_rows(k_ref, rows, h)).astype(jnp.float32)  # [block_k, H]
        return acc + jnp.sum(jnp.where((idx < size)[:, None], kk, 0.0), axis=0)

    acc = jax.lax.fori_loop(
        0, pl.cdiv(size, block_k), body, jnp.zeros((k_ref.shape[-1],), jnp.float32)
    )
    kbar = acc / jnp.maximum(size, 1).astype(jnp.float32)
    if len(kbar_refs) == 1:
        kbar_refs[0][h, c, :] = kbar
    else:  # kbar = hi + lo to about 2**-16 relative; split here, not in XLA, whose excess-precision
        # rewrites may drop the f32 -> 16 bit -> f32 rounding
        hi_ref, lo_ref = kbar_refs
        hi = kbar.astype(hi_ref.dtype)
        hi_ref[h, c, :] = hi
        lo_ref[h, c, :] = (kbar - hi.astype(jnp.float32)).astype(lo_ref.dtype)


def moba_gate_kernel(
    q_ref,  # [T * N, H]
    own_ref,  # [T] int32
    lo_ref,  # [T] int32
    *refs,  # pooled keys [K, Cp, H] (float32 kbar, or 16-bit hi and lo); sel [Tp * N, J'] (out)
    rows: int,
    group: int,
    picks: int,
    block_c: int,
):
    """A tile of `rows // group` tokens x the `group` query heads of kv head h: row r is the
    tile's token r // group, head h * group + r % group (rows past the last whole token: no writes).

    The pooled keys are scored block_c chunks at a time, only the blocks that hold a candidate of
    one of the tile's rows (from its smallest lo to its largest own): a causal tile skips the
    chunks past its own. Each row holds its best P >= picks (score, id) pairs so far, unordered,
    ranked as by one argmax over all chunks (higher score, then lower id): each of a block's best
    `picks`, best first, replaces the worst pair held where it ranks above it. Ties keep the pair
    held, whose id is lower (an earlier block, or an earlier pick of the same block)."""
    *kbar_refs, sel_ref = refs
    h = pl.program_id(1)
    num_tokens = own_ref.shape[0]
    num_heads = q_ref.shape[0] // num_tokens
    num_padded = kbar_refs[0].shape[1]
    tok, head, used = kv_head_tile(rows, group)
    live = tok < num_tokens
    safe = jnp.minimum(tok, num_tokens - 1)
    own = jnp.where(live, plgpu.load(own_ref.at[safe]), -1)
    out = tok * num_heads + head  # row of (token, head) in sel
    plgpu.store(sel_ref.at[out, jnp.int32(0)], own, mask=used)
    if not picks:
        return
    q = plgpu.load(gather_rows(q_ref, safe * num_heads + head))  # [rows, H]
    # float32 q: one dot at full precision; 16-bit q: q . hi + q . lo, accumulated in float32
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    lo = plgpu.load(lo_ref.at[safe])
    has = used & (own > lo)  # rows with candidates: the chunks lo .. own - 1
    first = jnp.min(jnp.where(has, lo, num_padded)) // block_c
    last = pl.cdiv(jnp.max(jnp.where(has, own, 0)), block_c)

    def block(b, held):
        """held (scores [rows, P], ids [rows, P]) with chunks b * block_c + [0, block_c)."""
        scores, ids = held
        c0 = pl.multiple_of(b * block_c, block_c)
        chunks = pl.ds(c0, block_c)
        s = plgpu.dot(q, kbar_refs[0][h, chunks], trans_b=True, precision=precision)
        for ref in kbar_refs[1:]:
            s += plgpu.dot(q, ref[h, chunks], trans_b=True)  # [rows, block_c]
        cid = c0 + jnp.arange(block_c)[None, :]
        s = jnp.where((cid >= lo[:, None]) & (cid < own[:, None]), s, -jnp.inf)
        for _ in range(min(picks, block_c)):
            # the block's best left (the lowest id among equal scores) ...
            top = jnp.max(s, axis=1)
            idx = jnp.min(jnp.where(s == top[:, None], cid, num_padded), axis=1)
            s = jnp.where(cid == idx[:, None], -jnp.inf, s)
            # ... replaces the worst pair held (lowest score, then highest id) if it scores higher
            low = jnp.min(scores, axis=1)
            worst = jnp.max(jnp.where(scores == low[:, None], ids, -1), axis=1)
            swap = (ids == worst[:, None]) & (top > low)[:, None]
            scores = jnp.where(swap, top[:, None], scores)
            ids = jnp.where(swap, idx[:, None], ids)
        return scores, ids

    # no pairs yet: scores -inf, distinct ids past every chunk
    width = pl.next_power_of_2(picks)  # P
    slot = jnp.broadcast_to(jnp.arange(width)[None, :], (rows, width))
    none = (jnp.full((rows, width), -jnp.inf, jnp.float32), num_padded + slot)
    scores, ids = jax.lax.fori_loop(first, last, block, none)
    for j in range(1, picks + 1):  # best first; -1 past the candidates (score -inf)
        top = jnp.max(scores, axis=1)
        idx = jnp.min(jnp.where(scores == top[:, None], ids, num_padded + width), axis=1)
        plgpu.store(sel_ref.at[out, jnp.int32(j)], jnp.where(top > -jnp.inf, idx, -1), mask=used)
        if j < picks:
            scores = jnp.where(ids == idx[:, None], -jnp.inf, scores)


def chunk_means_pallas(
    k: jax.Array,
    layout: MobaLayout,
    *,
    dtype: jnp.dtype,
    block_k: int,
    interpret: bool,
    num_warps: int,
) -> tuple[jax.Array, ...]:
    """Pooled keys, each [K, Cp, H] with Cp = number of chunk ids rounded up to a power of 2:
    (kbar,) float32 for float32 queries, (hi, lo) in `dtype` for 16-bit ones (kbar ~ hi + lo)."""
    num_chunks = layout.chunk_len.shape[0]
    padded = max(16, pl.next_power_of_2(num_chunks))
    shape = (k.shape[1], padded, k.shape[2])
    if dtype in (jnp.bfloat16, jnp.float16):
        out_shape = (jax.ShapeDtypeStruct(shape, dtype),) * 2
    else:
        out_shape = (jax.ShapeDtypeStruct(shape, jnp.float32),)
    kernel = functools.partial(
        moba_chunk_mean_kernel, block_k=block_k, num_keys=k.shape[0], num_chunks=num_chunks
    )
    return pl.pallas_call(
        kernel,
        grid=(padded, k.shape[1]),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="moba_chunk_mean",
    )(layout.chunk_start, layout.chunk_len, k)


def select_chunks_pallas(
    q: jax.Array,
    kbar: tuple[jax.Array, ...],
    layout: MobaLayout,
    *,
    slots: int,
    block_q: int,
    max_scores: int,
    interpret: bool,
    num_warps: int,
    block_c: int = 64,
) -> jax.Array:
    """Global chunk ids [T, N, slots] int32: own chunk, then the best candidates, -1 past them.

    kbar: `chunk_means_pallas` of q's dtype. A program scores block_q tokens x the N / K heads of
    one kv head, fewer tokens where rows x Cp or the [rows, H] query tile would pass max_scores
    elements (at least 16 rows, the smallest dot, and one token), against block_c chunks at a time
    (a power of two >= 16, at most Cp), only the blocks that hold candidates of its tokens.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, padded, _ = kbar[0].shape
    group = num_heads // num_kv_heads
    cap = max_scores // max(padded, head_dim)
    rows = max(16, pl.next_power_of_2(group), min(pl.next_power_of_2(block_q * group), cap))
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        q = q.astype(jnp.float32)
    tiles = pl.cdiv(num_tokens, rows // group)
    kernel = functools.partial(
        moba_gate_kernel, rows=rows, group=group, picks=slots - 1, block_c=min(block_c, padded)
    )
    sel = pl.pallas_call(
        kernel,
        grid=(tiles, num_kv_heads),
        out_shape=jax.ShapeDtypeStruct((tiles * (rows // group) * num_heads, slots), jnp.int32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="moba_gate",
    )(q.reshape(-1, head_dim), layout.token_own, layout.token_lo, *kbar)
    return sel.reshape(-1, num_heads, slots)[:num_tokens]
