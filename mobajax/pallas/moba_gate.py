"""MoBA gate in Pallas (Triton lowering): pooled keys and per-token top-k chunk selection.

The gate never writes a [tokens, chunks] score tensor: each program scores one tile of queries of
one head against every pooled key in registers and writes only the chosen chunk ids, so HBM holds
[T, N, top_k] int32 indices and the pooled keys [K, C, H] (float32).

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

MAX_CHUNKS = 8192  # the gate keeps one [tile, Cp] score block in registers


def gather_rows(ref, rows, *middle):
    """ref[rows, *middle, :] as [len(rows), H]: a row gather written with integer arrays only
    (pointer arithmetic under Triton; the form interpret mode can discharge)."""
    cols = jnp.arange(ref.shape[-1])[None, :]
    return ref.at[rows[:, None], *middle, cols]


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
    kbar_ref,  # [K, Cp, H] float32 (out)
    *,
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
    kbar_ref[h, c, :] = acc / jnp.maximum(size, 1).astype(jnp.float32)


def moba_gate_kernel(
    q_ref,  # [T, N, H]
    kbar_ref,  # [K, Cp, H] float32
    own_ref,  # [T] int32
    lo_ref,  # [T] int32
    sel_ref,  # [Tp, N, J'] int32 (out), Tp = T rounded up to block_q
    *,
    block_q: int,
    group: int,
    picks: int,
):
    i, n = pl.program_id(0), pl.program_id(1)
    num_tokens = q_ref.shape[0]
    num_padded = kbar_ref.shape[1]
    rows = i * block_q + jnp.arange(block_q)
    live = rows < num_tokens
    safe = jnp.minimum(rows, num_tokens - 1)
    q = plgpu.load(gather_rows(q_ref, safe, n))  # [block_q, H]
    h = n // group
    kbar = kbar_ref[h]  # [Cp, H] float32
    if q.dtype == jnp.float32:
        s = plgpu.dot(q, kbar, trans_b=True, precision=jax.lax.Precision.HIGHEST)
    else:  # 16-bit q is exact; kbar = hi + lo to about 2**-16 relative, split here (not in XLA,
        # whose excess-precision rewrites may drop the f32 -> 16 bit -> f32 rounding)
        hi = kbar.astype(q.dtype)
        lo = (kbar - hi.astype(jnp.float32)).astype(q.dtype)
        s = plgpu.dot(q, hi, trans_b=True) + plgpu.dot(q, lo, trans_b=True)
    own = jnp.where(live, plgpu.load(own_ref.at[safe]), -1)
    lo = plgpu.load(lo_ref.at[safe])
    cid = jnp.arange(num_padded)[None, :]
    s = jnp.where((cid >= lo[:, None]) & (cid < own[:, None]), s, -jnp.inf)  # [block_q, Cp]
    tile = pl.ds(i * block_q, block_q)
    plgpu.store(sel_ref.at[tile, n, jnp.int32(0)], own)
    for j in range(1, picks + 1):
        best = jnp.max(s, axis=1)
        idx = jnp.min(jnp.where(s == best[:, None], cid, num_padded), axis=1)
        idx = jnp.where(best == -jnp.inf, -1, idx)
        plgpu.store(sel_ref.at[tile, n, jnp.int32(j)], idx.astype(jnp.int32))
        s = jnp.where(cid == idx[:, None], -jnp.inf, s)


def chunk_means_pallas(
    k: jax.Array, layout: MobaLayout, *, block_k: int, interpret: bool, num_warps: int
) -> jax.Array:
    """Pooled keys [K, Cp, H] float32; Cp = number of chunk ids rounded up to a power of 2."""
    num_chunks = layout.chunk_len.shape[0]
    padded = max(16, pl.next_power_of_2(num_chunks))
    kernel = functools.partial(
        moba_chunk_mean_kernel, block_k=block_k, num_keys=k.shape[0], num_chunks=num_chunks
    )
    return pl.pallas_call(
        kernel,
        grid=(padded, k.shape[1]),
        out_shape=jax.ShapeDtypeStruct((k.shape[1], padded, k.shape[2]), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="moba_chunk_mean",
    )(layout.chunk_start, layout.chunk_len, k)


def select_chunks_pallas(
    q: jax.Array,
    kbar: jax.Array,
    layout: MobaLayout,
    *,
    slots: int,
    block_q: int,
    interpret: bool,
    num_warps: int,
) -> jax.Array:
    """Global chunk ids [T, N, slots] int32: own chunk, then the best candidates, -1 past them."""
    num_tokens, num_heads, _ = q.shape
    group = num_heads // kbar.shape[0]
    padded = kbar.shape[1]
    block_q = max(16, min(block_q, pl.next_power_of_2(max(1, 16384 // padded))))
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        q = q.astype(jnp.float32)
    tiles = pl.cdiv(num_tokens, block_q)
    kernel = functools.partial(moba_gate_kernel, block_q=block_q, group=group, picks=slots - 1)
    sel = pl.pallas_call(
        kernel,
        grid=(tiles, num_heads),
        out_shape=jax.ShapeDtypeStruct((tiles * block_q, num_heads, slots), jnp.int32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="moba_gate",
    )(q, kbar, layout.token_own, layout.token_lo)
    return sel[:num_tokens]
