"""Ragged paged prefill: a flat batch of new query tokens of many sequences attends causally,
by absolute position, to the KV already in the page pool (Pallas Triton).

One call covers plain prefill, chunked prefill, prefix-cache hits and a mixed batch of prefills
and decodes (a decode is a sequence with one new token). The new tokens' K/V must already be in
the pool (`kv_write` first), so a sequence's keys are its first kv_lens[b] cached tokens.

Shapes: q [T, N, H] (the new tokens of all sequences, back to back), page pool
k_pages/v_pages [P, G, K, H] (layout in `mobajax.pallas.paged_decode`), page_table [B, P_max],
cu_q_lens [B + 1] int32 (sequence b owns rows cu_q_lens[b]:cu_q_lens[b+1]; cu_q_lens[0] = 0,
non-decreasing, cu_q_lens[B] <= T), kv_lens [B] int32 (>= that sequence's new-token count).
The i-th new token of sequence b is at absolute position kv_lens[b] - q_len[b] + i and sees keys
at positions <= its own. Rows past cu_q_lens[B] are padding: out 0, lse -inf.
Returns out [T, N, H] (and lse [T, N] float32, NATURAL log).

Kernel: the wrapper cuts every sequence's rows into blocks of block_q tokens (at most
cdiv(T, block_q) + B blocks, a static bound); one program per (block, kv head), heaviest first.
The N // K query heads of a kv head are folded into the block's rows (M = block_q * N / K) so
each K/V tile read serves all of them; tiles below the block's first position skip masking.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mobajax.pallas import online_softmax as osm
from mobajax.pallas.attention_chunk import attention_chunk_reference, merge_states
from mobajax.pallas.paged_decode import check_pool, gather_pages, kv_tile


@dataclasses.dataclass(frozen=True)
class PagedPrefillConfig:
    """Tuning of `paged_prefill`: block_m query rows (tokens x folded heads) per program,
    block_kv keys per tile (rounded to whole pages); powers of two >= 16."""

    block_m: int = 128
    block_kv: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_kv"):
            value = getattr(self, name)
            if not (osm.is_power_of_two(value) and value >= 16):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")


def paged_prefill_kernel(
    blk_seq_ref,  # [NB] int32: sequence of each query block
    blk_start_ref,  # [NB] int32: first row of the block in q
    blk_count_ref,  # [NB] int32: valid rows of the block (0 = unused block)
    cu_q_lens_ref,  # [B + 1] int32
    kv_lens_ref,  # [B] int32
    page_table_ref,  # [B, P_max] int32
    q_ref,  # [T_pad, Gq_pad, H], this kv head
    k_pages_ref,  # [P, G, H], this kv head
    v_pages_ref,  # [P, G, H], this kv head
    o_in_ref,  # [T_pad, Gq_pad, H], aliased to o_ref (zeros)
    lse_in_ref,  # [T_pad, Gq_pad] float32, aliased to lse_ref (-inf)
    o_ref,  # [T_pad, Gq_pad, H]
    lse_ref,  # [T_pad, Gq_pad] float32
    *,
    scale: float,
    block_q: int,
    pages_per_block: int,
):
    del o_in_ref, lse_in_ref
    blk = pl.num_programs(0) - 1 - pl.program_id(0)  # the last blocks are the heaviest
    _, gq, head_dim = q_ref.shape
    page_size = k_pages_ref.shape[1]
    block_kv = pages_per_block * page_size
    rows = block_q * gq
    seq = blk_seq_ref[blk]
    start = blk_start_ref[blk]
    count = blk_count_ref[blk]
    seq_start = cu_q_lens_ref[seq]
    q_len = cu_q_lens_ref[seq + 1] - seq_start
    pos0 = jnp.maximum(kv_lens_ref[seq] - q_len, 0) + (start - seq_start)
    n_kv = jnp.where(count > 0, pos0 + count, 0)  # keys [0, n_kv) can be visible
    n_pages = (n_kv + page_size - 1) // page_size
    n_full = jnp.where(count > 0, pos0 // block_kv, 0)  # tiles visible to every row
    n_tiles = (n_kv + block_kv - 1) // block_kv

    q = q_ref[pl.ds(start, block_q)].reshape(rows, head_dim)
    row_tok = jnp.arange(rows) // gq
    q_pos = pos0 + row_tok

    def load_tile(j):
        page_idx = jnp.minimum(j * pages_per_block + jnp.arange(pages_per_block), n_pages - 1)
        pages = page_table_ref[seq, page_idx]  # [ppb]
        k = k_pages_ref[pages].reshape(block_kv, head_dim)
        v = v_pages_ref[pages].reshape(block_kv, head_dim)
        return k, v

    def full_body(j, state):
        k, v = load_tile(j)
        return osm.update(state, osm.qk_logits(q, k, scale), v)

    def masked_body(j, state):
        k, v = load_tile(j)
        tok = j * block_kv + jnp.arange(block_kv)
        key_ok = tok < n_kv
        v = jnp.where(key_ok[:, None], v, 0).astype(v.dtype)  # stale or NaN slots
        visible = key_ok[None, :] & (tok[None, :] <= q_pos[:, None])
        s = jnp.where(visible, osm.qk_logits(q, k, scale), -jnp.inf)
        return osm.update(state, s, v)

    state = lax.fori_loop(0, n_full, full_body, osm.init_state(rows, head_dim))
    state = lax.fori_loop(n_full, n_tiles, masked_body, state)
    out, lse = osm.finalize(state)
    row_ok = jnp.arange(block_q) < count
    plgpu.store(
        o_ref.at[pl.ds(start, block_q)],
        out.reshape(block_q, gq, head_dim).astype(o_ref.dtype),
        mask=row_ok[:, None, None],
    )
    plgpu.store(lse_ref.at[pl.ds(start, block_q)], lse.reshape(block_q, gq), mask=row_ok[:, None])


def check_inputs(q, k_pages, v_pages, page_table, cu_q_lens, kv_lens):
    check_pool(q, k_pages, v_pages, "[T, N, H]")
    if page_table.ndim != 2 or page_table.dtype != jnp.int32:
        raise ValueError(f"page_table must be int32 [B, P_max], got {page_table.dtype}{page_table.shape}")
    b = page_table.shape[0]
    if cu_q_lens.shape != (b + 1,) or cu_q_lens.dtype != jnp.int32:
        raise ValueError(f"cu_q_lens must be int32 [B + 1={b + 1}], got {cu_q_lens.dtype}{cu_q_lens.shape}")
    if kv_lens.shape != (b,) or kv_lens.dtype != jnp.int32:
        raise ValueError(f"kv_lens must be int32 [B={b}], got {kv_lens.dtype}{kv_lens.shape}")


def block_schedule(cu_q_lens: jax.Array, block_q: int, num_blocks: int):
    """Cut each sequence's rows into blocks of block_q: (seq, first row, valid rows) per block,
    [num_blocks] int32 each; blocks past the last hold 0 valid rows."""
    b = cu_q_lens.shape[0] - 1
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    per_seq = (q_lens + block_q - 1) // block_q
    ends = jnp.cumsum(per_seq)
    j = jnp.arange(num_blocks, dtype=jnp.int32)
    seq = jnp.searchsorted(ends, j, side="right", method="scan_unrolled").astype(jnp.int32)
    used = seq < b
    seq = jnp.minimum(seq, b - 1)
    local = j - (ends[seq] - per_seq[seq])
    start = cu_q_lens[seq] + local * block_q
    count = jnp.where(used, jnp.clip(q_lens[seq] - local * block_q, 0, block_q), 0)
    return seq, jnp.where(used, start, 0), count.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret", "return_lse"))
def paged_prefill(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    cu_q_lens: jax.Array,
    kv_lens: jax.Array,
    *,
    scale: float | None = None,
    config: PagedPrefillConfig = PagedPrefillConfig(),
    interpret: bool = False,
    return_lse: bool = False,
):
    """Causal attention of the ragged new tokens q [T, N, H] to their sequences' cached K/V.

    Returns out [T, N, H] in q's dtype, or (out, lse [T, N] float32, natural log) with
    `return_lse`. `scale` defaults to H ** -0.5. See the module docstring for the contract.
    """
    check_inputs(q, k_pages, v_pages, page_table, cu_q_lens, kv_lens)
    t, n, h = q.shape
    num_pages, g, kv_heads, _ = k_pages.shape
    b = page_table.shape[0]
    scale = h**-0.5 if scale is None else scale
    gq = n // kv_heads
    gq_pad = osm.next_power_of_two(gq)
    block_q = max(1, config.block_m // gq_pad, 16 // gq_pad)
    ppb = max(1, kv_tile(config.block_kv, h, q.dtype) // g)
    num_blocks = -(-t // block_q) + b
    t_pad = t + block_q
    q4 = jnp.pad(q.reshape(t, kv_heads, gq, h), ((0, block_q), (0, 0), (0, gq_pad - gq), (0, 0)))
    seq, start, count = block_schedule(cu_q_lens, block_q, num_blocks)
    o_init = jnp.zeros(q4.shape, q.dtype)
    lse_init = jnp.full(q4.shape[:-1], -jnp.inf, jnp.float32)

    def full(shape):
        return pl.BlockSpec(shape, lambda i, k: (0,) * len(shape))

    per_head = pl.BlockSpec((t_pad, None, gq_pad, h), lambda i, k: (0, k, 0, 0))
    pool = pl.BlockSpec((num_pages, g, None, h), lambda i, k: (0, 0, k, 0))
    lse_spec = pl.BlockSpec((t_pad, None, gq_pad), lambda i, k: (0, k, 0))
    kernel = functools.partial(
        paged_prefill_kernel, scale=scale, block_q=block_q, pages_per_block=ppb
    )
    out, lse = pl.pallas_call(
        kernel,
        grid=(num_blocks, kv_heads),
        in_specs=[
            full((num_blocks,)),
            full((num_blocks,)),
            full((num_blocks,)),
            full((b + 1,)),
            full((b,)),
            full(page_table.shape),
            per_head,
            pool,
            pool,
            per_head,
            lse_spec,
        ],
        out_specs=[per_head, lse_spec],
        out_shape=[
            jax.ShapeDtypeStruct(q4.shape, q.dtype),
            jax.ShapeDtypeStruct(q4.shape[:-1], jnp.float32),
        ],
        input_output_aliases={9: 0, 10: 1},
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="paged_prefill",
    )(seq, start, count, cu_q_lens, kv_lens, page_table, q4, k_pages, v_pages, o_init, lse_init)
    out = out[:t, :, :gq].reshape(t, n, h)
    lse = lse[:t, :, :gq].reshape(t, n)
    return (out, lse) if return_lse else out


def paged_prefill_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    cu_q_lens: jax.Array,
    kv_lens: jax.Array,
    *,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Pure-jnp `paged_prefill`: every sequence's pages are gathered, each sequence attends with
    only its own rows visible (the others get position -1), and the B states are merged."""
    t = q.shape[0]
    b, p_max = page_table.shape
    g = k_pages.shape[1]
    k = gather_pages(k_pages, page_table, kv_lens)  # [B, S, K, H]
    v = gather_pages(v_pages, page_table, kv_lens)
    slot = jnp.arange(p_max * g, dtype=jnp.int32)
    k_pos = jnp.where(slot[None, :] < kv_lens[:, None], slot[None, :], -1)
    row = jnp.arange(t, dtype=jnp.int32)
    mine = (row[None, :] >= cu_q_lens[:-1, None]) & (row[None, :] < cu_q_lens[1:, None])
    q_len = cu_q_lens[1:] - cu_q_lens[:-1]
    pos = (kv_lens - q_len - cu_q_lens[:-1])[:, None] + row[None, :]
    q_pos = jnp.where(mine, pos, -1)  # [B, T]
    qb = jnp.broadcast_to(q[None], (b, *q.shape))
    outs, lses = attention_chunk_reference(qb, k, v, q_pos, k_pos, scale=scale)
    out, lse = merge_states(outs, lses)
    return (out, lse) if return_lse else out
