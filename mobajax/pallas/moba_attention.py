"""MoBA prefill attention in Pallas (Triton lowering), ragged batches, with a custom VJP.

Pipeline (one jit):
1. `moba_gate`: pooled keys per chunk, then per (token, query head) the own chunk plus the top_k - 1
   best past chunks -> sel [T, N, top_k] int32 (the only selection state in HBM). On Hopper,
   for one sequence of 16-bit inputs, `moba_gate_mosaic` picks the chunks (MobaConfig.gate).
2. Work list (XLA): every (token, head, past slot) row goes to the bucket (chunk, kv head) it
   reads; one stable sort by chunk of the rows numbered kv head first, then tiles of `block_q`
   rows that all read the same chunk of one kv head. The Mosaic gate writes the sort's keys
   itself; with the Mosaic past-chunk kernel, `moba_work_mosaic` builds the work list by a
   counting sort instead (no order within a bucket).
3. `moba_attention_kernel`: per tile, gather the query rows, stream the chunk's keys (blocks that
   every row sees whole as contiguous loads without a mask, the chunk's tail masked), write a
   normalised partial output and its log-sum-exp per row. On Hopper, for one sequence of 16-bit
   inputs, `moba_partials_mosaic` does this step instead (MobaConfig.partials).
4. `moba_finish_kernel`: per tile of consecutive tokens x the query heads of one kv head, the
   row's past-chunk partials merged by their log-sum-exps, then causal attention over the row's
   own chunk folded in; writes the output. On Hopper, for one sequence of 16-bit inputs,
   `moba_finish_mosaic` does this step instead (MobaConfig.finish).
Rows of all the query heads of one kv head share a tile, so K/V are read per kv head (GQA-native)
and every matmul is a dense [block_q, H] x [H, block_k] tile, whatever each token selected.

Log-sum-exps here are natural (base e). Backward: a custom VJP through the selected chunks
(`mobajax.moba.chunk_attention`, plain XLA, rematerialised per query tile); the selection itself is
not differentiable.

Shape letters: T tokens, S keys, N query heads, K kv heads, H head dim, J slots (top_k),
R = (J - 1) * N * `moba_finish_mosaic.token_stride(T)` rows of past-chunk partials (`partial_row`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mobajax import moba as moba_ref
from mobajax.pallas import moba_finish_mosaic as mosaic
from mobajax.pallas import moba_gate_mosaic as mosaic_gate
from mobajax.pallas import moba_partials_mosaic as mosaic_partials
from mobajax.pallas import moba_work_mosaic as mosaic_work
from mobajax.pallas import online_softmax as osm
from mobajax.pallas.moba_gate import (
    MAX_CHUNKS,
    chunk_means_pallas,
    gather_rows,
    kv_head_tile,
    moba_layout,
    num_chunk_ids,
    select_chunks_pallas,
)


def _pow2(x: int) -> bool:
    return x >= 16 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class MobaConfig:
    """Tuning knobs (hashable; all powers of two >= 16 except the counts).

    block_q: rows (token, head, slot) per attention program. block_k: keys per inner step.
    gate_block_q: tokens per gate program (shrunk for many chunks). gate_scores: elements of a gate
    program's [rows, chunks] score tile (and [rows, H] query tile) at most, past the 16-row
    minimum. num_warps / num_stages / gate_num_warps: Triton settings of the attention and gate
    kernels. The defaults are the best
    of the H100 sweeps in docs/benchmarks.md at block sizes 512 and 4096. max_partial_bytes: partial
    outputs (q's dtype) held at once; longer inputs run in several passes over the tokens.
    finish: the kernel of the own chunk plus the merge: "triton", "mosaic" (`moba_finish_mosaic`:
    a Hopper GPU, one sequence at its default positions, 16-bit inputs, head dim 128, query
    heads per kv head dividing 64, block sizes a multiple of 64), or "auto" (mosaic where it
    runs, else triton). partials: the past-chunk kernel, "triton", "mosaic"
    (`moba_partials_mosaic`: where the Mosaic finish runs and the block size is a multiple of
    128) or "auto" (mosaic where it runs, else triton). gate: the selection kernel, "triton",
    "mosaic" (`moba_gate_mosaic`: a Hopper GPU, one sequence at its default positions, 16-bit
    inputs, head dim 128, query heads per kv head dividing 64) or "auto" (mosaic where it runs
    and top_k <= 5, else triton).
    """

    block_q: int = 256
    block_k: int = 64
    gate_block_q: int = 64
    num_warps: int = 8
    num_stages: int = 3
    gate_num_warps: int = 4
    gate_scores: int = 16384
    max_partial_bytes: int = 2**33
    finish: str = "auto"
    partials: str = "auto"
    gate: str = "auto"

    def __post_init__(self):
        for name in ("block_q", "block_k", "gate_block_q", "gate_scores"):
            value = getattr(self, name)
            if not _pow2(value):
                raise ValueError(f"MobaConfig.{name}={value}: must be a power of two >= 16")
        for name in ("num_warps", "gate_num_warps"):
            if getattr(self, name) not in (1, 2, 4, 8, 16):
                raise ValueError(
                    f"MobaConfig.{name}={getattr(self, name)}: must be 1, 2, 4, 8 or 16"
                )
        for name in ("finish", "partials", "gate"):
            if getattr(self, name) not in ("auto", "triton", "mosaic"):
                raise ValueError(
                    f"MobaConfig.{name}={getattr(self, name)!r}: must be 'auto', 'triton' or 'mosaic'"
                )
        if self.num_stages < 1 or self.max_partial_bytes < 1:
            raise ValueError(
                f"num_stages={self.num_stages}, max_partial_bytes={self.max_partial_bytes}:"
                " must be >= 1"
            )


# Shared memory of an attention program, estimated as the query tile plus num_stages K and V
# tiles: the default config at head dim 128 in bf16 (and the former default in float32) uses
# exactly this much; larger ones fail to compile on the H100.
SHARED_MEMORY_BUDGET = 160 * 1024


def fit_shared_memory(config: MobaConfig, head_dim: int, itemsize: int) -> MobaConfig:
    """Halve block_q (with num_warps, down to 4), then block_k, down to 16, until the
    attention program's tiles fit `SHARED_MEMORY_BUDGET` (wider heads, float32)."""

    def size(c):
        return (c.block_q + 2 * c.num_stages * c.block_k) * head_dim * itemsize

    while size(config) > SHARED_MEMORY_BUDGET:
        if config.block_q > 128:
            config = dataclasses.replace(
                config, block_q=config.block_q // 2, num_warps=max(4, config.num_warps // 2)
            )
        elif config.block_k > 16:
            config = dataclasses.replace(config, block_k=config.block_k // 2)
        elif config.block_q > 16:
            config = dataclasses.replace(config, block_q=config.block_q // 2)
        else:
            break
    return config


def attend_keys(state, q, kk, vv, seen, scale):
    """Fold keys kk and values vv [block_k, H] into the online-softmax state of query rows
    q [rows, H]; seen [rows, block_k] bool, or None where every row sees every key."""
    s = osm.qk_logits(q, kk, scale)
    return osm.update(state, s if seen is None else jnp.where(seen, s, -jnp.inf), vv)


def moba_attention_kernel(
    tile_bucket_ref,  # [W] int32: bucket = chunk * K + kv head
    tile_start_ref,  # [W] int32: first entry of the tile in order_ref
    tile_len_ref,  # [W] int32: live rows of the tile (0: nothing to do)
    order_ref,  # [R + block_q] int32: rows sorted by bucket
    q_ref,  # [T * N, H]
    k_ref,  # [S, K, H]
    v_ref,  # [S, K, H]
    chunk_start_ref,  # [C] int32
    chunk_len_ref,  # [C] int32
    o_ref,  # [R + P, H] q's dtype (out, rows in `partial_row` order; row R: a dump for dead lanes)
    lse_ref,  # [R + P] float32 (out), natural log
    *,
    block_q: int,
    block_k: int,
    num_heads: int,
    num_kv_heads: int,
    slots: int,
    key_tokens: int,
    scale: float,
):
    """A tile of rows (`work_list` rows: kv head, past slot, token, head within the group, over
    key_tokens tokens) that all read one past chunk of one kv head: every row sees the whole
    chunk (its tokens are later), so only the chunk's last block is masked."""
    i = pl.program_id(0)
    live_rows = tile_len_ref[i]

    @pl.when(live_rows > 0)
    def _():
        bucket = tile_bucket_ref[i]
        c, h = bucket // num_kv_heads, bucket % num_kv_heads
        live = jnp.arange(block_q) < live_rows
        rows = jnp.where(live, plgpu.load(order_ref.at[pl.ds(tile_start_ref[i], block_q)]), 0)
        num_tokens = q_ref.shape[0] // num_heads
        tn, slot = work_row_query(rows, slots, key_tokens, num_heads, num_kv_heads)
        q = plgpu.load(gather_rows(q_ref, tn))  # [block_q, H]
        start, size = chunk_start_ref[c], chunk_len_ref[c]
        offs = jnp.arange(block_k)

        def clear_step(j, carry):  # contiguous loads, no mask
            keys = pl.ds(start + j * block_k, block_k)
            kk, vv = plgpu.load(k_ref.at[keys, h, :]), plgpu.load(v_ref.at[keys, h, :])
            return attend_keys(carry, q, kk, vv, None, scale)

        def tail_step(j, carry):  # the chunk's partial last block
            idx = j * block_k + offs
            keys = jnp.minimum(start + idx, k_ref.shape[0] - 1)
            kk, vv = plgpu.load(gather_rows(k_ref, keys, h)), plgpu.load(gather_rows(v_ref, keys, h))
            return attend_keys(carry, q, kk, vv, (idx < size)[None, :], scale)

        state = jax.lax.fori_loop(0, size // block_k, clear_step, osm.init_state(block_q, q.shape[-1]))
        out, lse = osm.finalize(jax.lax.fori_loop(size // block_k, pl.cdiv(size, block_k), tail_step, state))
        dest = partial_row(tn, slot, num_tokens, num_heads, num_kv_heads)
        dump = jnp.where(live, dest, slots * num_heads * mosaic.token_stride(num_tokens))  # row R
        plgpu.store(gather_rows(o_ref, dump), out.astype(o_ref.dtype))
        plgpu.store(lse_ref.at[dump], lse)


def partial_row(tn, slot, num_tokens, num_heads, num_kv_heads):
    """Row of the past-chunk partial of (token, head) row tn = token * N + head and past slot
    `slot`, in (slot, kv head, token, head within the group) order, tokens at a stride of
    `moba_finish_mosaic.token_stride(T)`: the partials that one finish tile merges for one slot
    are consecutive rows."""
    group = num_heads // num_kv_heads
    tok, head = tn // num_heads, tn % num_heads
    stride = mosaic.token_stride(num_tokens)
    return ((slot * num_kv_heads + head // group) * stride + tok) * group + head % group


def finish_rows(config, group: int) -> int:
    """Rows (token, head) of a `moba_finish_kernel` tile: rows // group tokens x `group` heads."""
    return max(config.block_q, pl.next_power_of_2(group))


def work_row_query(e, slots, key_tokens, num_heads, num_kv_heads):
    """Row e of the `work_keys` order (kv head, past slot, token, head within the group; tokens
    0 .. key_tokens - 1) -> (tn = token * N + head: its query row, slot)."""
    group = num_heads // num_kv_heads
    head_in_group, e = e % group, e // group
    token, e = e % key_tokens, e // key_tokens
    slot, kv_head = e % slots, e // slots
    return token * num_heads + kv_head * group + head_in_group, slot


def key_dtype(num_chunks: int):
    """The sort keys' dtype: 8 bits up to 256 chunks (one radix pass), 16 up to 2**16."""
    return jnp.uint8 if num_chunks <= 2**8 else jnp.uint16 if num_chunks <= 2**16 else jnp.int32


def work_keys(past, num_kv_heads, num_chunks, pad):
    """The work list's keys for past picks [T, N, P] (global chunk ids, -1: empty): keys [R + pad]
    (`key_dtype`) of R = T * N * P rows numbered kv head first (kv head, slot, token, head within
    the group: `work_row_query` with key_tokens T). Empty slots, and the pad rows past R, get the
    last chunk, which no token has in its past. `moba_gate_mosaic` writes the same layout (over
    its tile-padded tokens)."""
    num_tokens, num_heads, slots = past.shape
    empty = num_chunks - 1
    keys = jnp.where(past >= 0, past, empty).reshape(num_tokens, num_kv_heads, num_heads // num_kv_heads, slots)
    keys = jnp.pad(keys.transpose(1, 3, 0, 2).reshape(-1), (0, pad), constant_values=empty)
    return keys.astype(key_dtype(num_chunks))


def work_list(keys, num_rows, num_kv_heads, num_chunks, block_q):
    """Sort rows by bucket (chunk, kv head) and cut them into tiles of one bucket each.

    keys [num_rows + pad] (`work_keys`' layout, pad >= block_q) -> per tile (bucket,
    start, live rows) [W] and the sorted rows [num_rows + pad] (the pad rows sort last, so a
    tile's slice never runs off the end). Rows are numbered kv head first, so a stable sort by
    chunk alone leaves each chunk's rows in kv-head order: the buckets in order, with keys of 8
    bits up to 256 chunks (one radix pass). Empty slots sort into the last chunk, which no token
    has in its past, and its buckets get no tiles.
    """
    num_buckets = num_chunks * num_kv_heads
    empty = num_chunks - 1
    keys, order = jax.lax.sort((keys, jnp.arange(keys.shape[0], dtype=jnp.int32)), num_keys=1)
    # (chunk, kv head) of each sorted row: sorted too (the pad rows' kv head is past the last)
    bucket = keys.astype(jnp.int32) * num_kv_heads + order // (num_rows // num_kv_heads)
    bucket_ids = jnp.arange(num_buckets + 1, dtype=jnp.int32)
    edges = jnp.searchsorted(bucket, bucket_ids, method="scan_unrolled").astype(jnp.int32)
    first, counts = edges[:-1], jnp.diff(edges)
    counts = jnp.where(bucket_ids[:-1] // num_kv_heads == empty, 0, counts)
    tiles = -(-counts // block_q)
    tile_end = jnp.cumsum(tiles)
    num_tiles = -(-num_rows // block_q) + num_buckets  # static bound
    w = jnp.arange(num_tiles, dtype=jnp.int32)
    b = jnp.searchsorted(tile_end, w, side="right", method="scan_unrolled")
    b = jnp.minimum(b, num_buckets - 1).astype(jnp.int32)
    local = w - (tile_end[b] - tiles[b])
    size = jnp.clip(counts[b] - local * block_q, 0, block_q)
    size = jnp.where(w < tile_end[-1], size, 0)
    start = jnp.where(size > 0, first[b] + local * block_q, 0)
    return b, start, size, order


def attention_partials(q, k, v, work, layout, *, slots, key_tokens, scale, config, interpret):
    """Per row (token, head, past slot): normalised output [R + P, H] (q's dtype) and its natural
    log-sum-exp [R + P] float32 over the row's past chunk, at `partial_row`; rows of empty slots
    are not written. P: the spare rows of `partial_rows`."""
    num_tokens, num_heads, head_dim = q.shape
    bucket, start, size, order = work
    rows = partial_rows(num_tokens, num_heads, slots, config, num_heads // k.shape[1])
    kernel = functools.partial(
        moba_attention_kernel,
        block_q=config.block_q,
        block_k=config.block_k,
        num_heads=num_heads,
        num_kv_heads=k.shape[1],
        slots=slots,
        key_tokens=key_tokens,
        scale=scale,
    )
    return pl.pallas_call(
        kernel,
        grid=(bucket.shape[0],),
        out_shape=(
            jax.ShapeDtypeStruct((rows, head_dim), q.dtype),
            jax.ShapeDtypeStruct((rows,), jnp.float32),
        ),
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="moba_attention",
    )(
        bucket, start, size, order, q.reshape(-1, head_dim), k, v, layout.chunk_start, layout.chunk_len,
    )  # fmt: skip


def moba_finish_kernel(
    q_ref,  # [T * N, H]
    first_ref,  # [T] int32: index in k of the token's first own-chunk key (padding: int32 max)
    last_ref,  # [T] int32: index in k of the last key the token sees (padding: -1)
    sel_ref,  # [T * N, J] int32: slot 0 the own chunk, 1.. the past chunks (-1: empty)
    o_ref,  # [R + P, H]: normalised past-chunk partials in `partial_row` order
    lse_ref,  # [R + P] float32, natural log
    k_ref,  # [S, K, H]
    v_ref,  # [S, K, H]
    out_ref,  # [T * N, H] (out)
    *,
    rows: int,
    group: int,
    block_k: int,
    scale: float,
):
    """A tile of rows // group tokens x the `group` query heads of kv head h (row r: token
    r // group, head h * group + r % group): attention over each row's own chunk up to its
    position, starting from the row's past-chunk partials merged by their log-sum-exps."""
    i, h = pl.program_id(0), pl.program_id(1)
    num_tokens = first_ref.shape[0]
    num_heads = q_ref.shape[0] // num_tokens
    past_slots = sel_ref.shape[1] - 1
    num_keys = k_ref.shape[0]
    tok, head, whole = kv_head_tile(rows, group)
    used = whole & (tok < num_tokens)
    safe = jnp.minimum(tok, num_tokens - 1)
    tn = safe * num_heads + head  # row of (token, head) in q, sel and out
    q = plgpu.load(gather_rows(q_ref, tn))  # [rows, H]
    first, last = plgpu.load(first_ref.at[safe]), plgpu.load(last_ref.at[safe])
    live = used & (first <= last)
    big = jnp.iinfo(jnp.int32).max
    first = jnp.where(live, first, big)
    last = jnp.where(live, last, -1)
    # blocks of block_k keys from the tile's first own-chunk key k_lo up to `end` (none without a
    # live row); those in [clear_lo, clear_hi) every live row sees whole, the others are masked
    k_lo = jnp.minimum(jnp.min(first), num_keys)
    end = jnp.maximum(pl.cdiv(jnp.max(last) + 1 - k_lo, block_k), 0)
    clear_lo = jnp.minimum(pl.cdiv(jnp.max(jnp.where(live, first, k_lo)) - k_lo, block_k), end)
    clear_hi = jnp.clip((jnp.min(jnp.where(live, last, big - block_k)) + 1 - k_lo) // block_k, clear_lo, end)
    offs = jnp.arange(block_k)

    def clear_step(j, carry):
        keys = pl.ds(k_lo + j * block_k, block_k)
        kk, vv = plgpu.load(k_ref.at[keys, h, :]), plgpu.load(v_ref.at[keys, h, :])
        return attend_keys(carry, q, kk, vv, None, scale)

    def masked_step(j, carry):
        idx = k_lo + j * block_k + offs
        keys = jnp.minimum(idx, num_keys - 1)
        kk, vv = plgpu.load(gather_rows(k_ref, keys, h)), plgpu.load(gather_rows(v_ref, keys, h))
        seen = (idx[None, :] >= first[:, None]) & (idx[None, :] <= last[:, None])
        return attend_keys(carry, q, kk, vv, seen, scale)

    # the past chunks first: their normalised partials merged in the layout they are loaded in,
    # the own chunk's keys then folded into that state (one layout change, at the loop's entry)
    state = osm.init_state(rows, q.shape[-1])
    first_tn = i * (rows // group) * num_heads + h * group  # the tile's row 0
    for j in range(past_slots):  # natural log-sum-exps
        valid = live & (plgpu.load(sel_ref.at[tn, j + 1]) >= 0)
        # this tile's rows of slot j are consecutive (`partial_row`); rows of empty slots and
        # past the last token were never written, so they are masked after the load
        base = partial_row(first_tn, j, num_tokens, num_heads, k_ref.shape[1])
        part = plgpu.load(o_ref.at[pl.ds(base, rows), :]).astype(jnp.float32)
        lse = plgpu.load(lse_ref.at[pl.ds(base, rows)])
        state = osm.merge(state, jnp.where(valid[:, None], part, 0.0), jnp.where(valid, lse, -jnp.inf))
    state = jax.lax.fori_loop(0, clear_lo, masked_step, state)
    state = jax.lax.fori_loop(clear_lo, clear_hi, clear_step, state)
    state = jax.lax.fori_loop(clear_hi, end, masked_step, state)
    out = jnp.where(live[:, None], osm.finalize(state)[0], 0.0)  # padding tokens: 0
    dest = tok * num_heads + head  # masked, not clamped: a clamped duplicate would write too
    plgpu.store(gather_rows(out_ref, dest), out.astype(out_ref.dtype), mask=used[:, None])


def own_key_range(pos, own, layout):
    """Per token (positions pos [T], own chunk ids own [T], -1 for padding), the indices in k of
    the first own-chunk key and of the last key it sees -> (first [T], last [T]) int32; padding
    tokens get (int32 max, -1)."""
    chunk = jnp.clip(own, 0, layout.chunk_len.shape[0] - 1)
    live = own >= 0
    first = layout.chunk_start[chunk]
    last = first + jnp.minimum(pos - layout.chunk_pos[chunk], layout.chunk_len[chunk] - 1)
    return jnp.where(live, first, jnp.iinfo(jnp.int32).max), jnp.where(live, last, -1)


def finish(q, k, v, pos, own, sel, layout, partials, *, scale, config, interpret):
    """Own-chunk attention plus the merge of the past-chunk partials (`attention_partials` over
    sel[..., 1:]) -> out [T, N, H] in q's dtype; pos, own [T]: the tokens' positions and own
    chunk ids."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    rows = finish_rows(config, group)
    kernel = functools.partial(
        moba_finish_kernel, rows=rows, group=group, block_k=config.block_k, scale=scale
    )
    out = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(num_tokens, rows // group), num_kv_heads),
        out_shape=jax.ShapeDtypeStruct((num_tokens * num_heads, head_dim), q.dtype),
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="moba_finish",
    )(
        q.reshape(-1, head_dim), *own_key_range(pos, own, layout), sel.reshape(-1, sel.shape[-1]),
        *partials, k, v,
    )  # fmt: skip
    return out.reshape(num_tokens, num_heads, head_dim)


def partial_rows(num_tokens, num_heads, slots, config, group):
    """Rows of the partial arrays: `partial_row`'s range, then spare rows so that a finish tile
    (Triton: `finish_rows`; Mosaic: `moba_finish_mosaic.ROWS`) reads whole row blocks."""
    return slots * num_heads * mosaic.token_stride(num_tokens) + max(finish_rows(config, group), mosaic.ROWS)


def finish_mosaic(q, k, v, pos, partials, *, past_slots, block_size, scale):
    """`finish` by `moba_finish_mosaic` for one sequence's tokens q [T, N, H] at consecutive
    positions pos [T] (k/v: every key they see) -> out [T, N, H]."""
    num_tokens, num_heads, _ = q.shape
    short = mosaic.tile_tokens(num_heads // k.shape[1]) - num_tokens
    out = mosaic.own_chunk_and_merge_mosaic(
        jnp.pad(q, ((0, short), (0, 0), (0, 0))) if short > 0 else q, mosaic.key_pages(k),
        mosaic.key_pages(v), *partials, pos[:1], num_tokens=num_tokens, block_size=block_size,
        past_slots=past_slots, scale=scale, config=mosaic.MobaMosaicConfig(),
    )  # fmt: skip
    return out[:num_tokens]


def work_rows(st, config: MobaConfig) -> int:
    """Rows per work-list tile: the past-chunk kernel's tile (`moba_partials_mosaic` or Triton)."""
    return mosaic.ROWS if st.mosaic_partials else config.block_q


def _attend_pass(q, k, v, pos, own, sel, layout, *, st, config, keys=None):
    """Attention of a run of tokens q [T, N, H] (positions pos [T], own chunks own [T]) over
    their selected chunks -> [T, N, H]: the past chunks bucketed into partials, then the own
    chunk and the merge in one kernel. keys: the work list's keys as the Mosaic gate wrote them
    for these tokens (else `work_keys` of sel)."""
    past = sel[..., 1:]
    if past.shape[-1]:
        work = past_work(past, k.shape[1], layout, keys, st=st, config=config)
        key_tokens = work_key_tokens(q.shape[0], q.shape[1] // k.shape[1], keys is not None)
        partials = past_partials(q, k, v, work, past, layout, key_tokens=key_tokens, st=st, config=config)
    else:  # top_k 1: the own chunk only
        partials = jnp.zeros((1, q.shape[-1]), q.dtype), jnp.zeros((1,), jnp.float32)
    return own_and_merge(q, k, v, pos, own, sel, layout, partials, st=st, config=config)


def work_key_tokens(num_tokens: int, group: int, from_gate: bool) -> int:
    """Tokens of the work list's rows: the Mosaic gate's (`moba_gate_mosaic.key_tokens`) or
    num_tokens (`work_keys`)."""
    return mosaic_gate.key_tokens(num_tokens, group) if from_gate else num_tokens


def past_work(past, num_kv_heads, layout, keys, *, st, config):
    """The work list of `work_rows` rows of past = sel[..., 1:] [T, N, P], of keys (the Mosaic
    gate's) or, where None, of `work_keys`: for the Mosaic partials kernel, (bucket,
    tile, tiles_live, order) (`moba_work_mosaic`, or `work_list`'s in that form where its counters
    do not fit); else `work_list`'s (bucket, start, size, order)."""
    num_tokens, num_heads, slots = past.shape
    block_q, num_chunks = work_rows(st, config), layout.chunk_len.shape[0]
    key_tokens = work_key_tokens(num_tokens, num_heads // num_kv_heads, keys is not None)
    if keys is None:
        keys = work_keys(past, num_kv_heads, num_chunks, block_q)
    num_rows = num_heads * slots * key_tokens
    if st.mosaic_partials and mosaic_work.fits(num_chunks, num_kv_heads):
        return mosaic_work.work_list_mosaic(keys, num_rows=num_rows, num_kv_heads=num_kv_heads, num_chunks=num_chunks)
    work = work_list(keys, num_rows, num_kv_heads, num_chunks, block_q)
    return mosaic_partials.live_tiles(*work) if st.mosaic_partials else work


def past_partials(q, k, v, work, past, layout, *, key_tokens, st, config):
    """The past-chunk partials of `work` (the `work_list` of past = sel[..., 1:], `work_rows`
    rows, its rows over key_tokens tokens), by the kernel st chose: (o, lse) at `partial_row`,
    rows of empty slots not written."""
    if st.mosaic_partials:
        num_tokens, num_heads, head_dim = q.shape
        o, lse = mosaic_partials.attention_partials_mosaic(
            q.reshape(-1, head_dim), mosaic_partials.key_pages(k), mosaic_partials.key_pages(v), *work,
            num_rows=partial_rows(num_tokens, num_heads, past.shape[-1], config, num_heads // k.shape[1]),
            num_tokens=num_tokens, key_tokens=key_tokens, block_size=st.block_size, slots=past.shape[-1],
            scale=st.scale, config=mosaic_partials.MobaPartialsConfig(),
        )  # fmt: skip
    else:
        o, lse = attention_partials(
            q, k, v, work, layout, slots=past.shape[-1], key_tokens=key_tokens, scale=st.scale, config=config,
            interpret=st.interpret,
        )
    return o, lse


def own_and_merge(q, k, v, pos, own, sel, layout, partials, *, st, config):
    """The own chunk's attention and the merge of the past partials, by the Mosaic kernel where
    st.mosaic_finish, else by `finish` -> out [T, N, H]."""
    if st.mosaic_finish:
        return finish_mosaic(
            q, k, v, pos, partials, past_slots=sel.shape[-1] - 1, block_size=st.block_size, scale=st.scale
        )
    return finish(q, k, v, pos, own, sel, layout, partials, scale=st.scale, config=config, interpret=st.interpret)


@dataclasses.dataclass(frozen=True)
class _Static:
    block_size: int
    top_k: int
    scale: float
    config: MobaConfig
    interpret: bool
    mosaic_finish: bool = False  # the own chunk and the merge by `moba_finish_mosaic`
    mosaic_partials: bool = False  # the past-chunk partials by `moba_partials_mosaic`
    mosaic_gate: bool = False  # the selection by `moba_gate_mosaic`


def num_slots(top_k: int, num_keys: int, block_size: int) -> int:
    """Selection slots per (token, head): top_k, at most the chunks S keys can fill."""
    return min(top_k, -(-num_keys // block_size))


def key_block(config: MobaConfig, block_size: int) -> int:
    """Keys per kernel step: config.block_k, at most the chunk size rounded up to a power of
    two (>= 16)."""
    return min(config.block_k, max(16, pl.next_power_of_2(block_size)))


def _select(st: _Static, q, k, layout):
    """sel [T, N, slots]: the own chunk, then the past picks (-1: empty)."""
    return _selection(st, q, k, layout)[0]


def _selection(st: _Static, q, k, layout):
    """(sel [T, N, slots], the work list's keys as the Mosaic gate wrote them: None for the
    other gate, or with no past slot)."""
    slots = num_slots(st.top_k, k.shape[0], st.block_size)
    kbar = chunk_means_pallas(
        k, layout, dtype=q.dtype, block_k=key_block(st.config, st.block_size), interpret=st.interpret,
        num_warps=4
    )
    if st.mosaic_gate:
        pad = work_rows(st, tile_config(st.config, st.block_size, q.shape[2], q.dtype.itemsize))
        return select_mosaic(q, kbar, layout, slots=slots, block_size=st.block_size, pad=pad)
    sel = select_chunks_pallas(
        q, kbar, layout, slots=slots, block_q=st.config.gate_block_q, max_scores=st.config.gate_scores,
        interpret=st.interpret, num_warps=st.config.gate_num_warps,
    )  # fmt: skip
    return sel, None


def select_mosaic(q, kbar, layout, *, slots, block_size, pad):
    """`select_chunks_pallas` by `moba_gate_mosaic` for one sequence's tokens q [T, N, H] at
    consecutive positions (kbar: the hi and lo pooled keys) -> (sel [T, N, slots], the work
    list's keys: `work_keys`' layout over `moba_gate_mosaic.key_tokens` tokens, at least pad
    rows of padding; None for slots 1)."""
    num_tokens, num_heads, _ = q.shape
    own = jnp.broadcast_to(layout.token_own[:, None, None], (num_tokens, num_heads, 1))
    if slots == 1:
        return own, None
    num_kv_heads, num_chunks = kbar[0].shape[0], layout.chunk_len.shape[0]
    short = mosaic_gate.tile_tokens(num_heads // num_kv_heads) - num_tokens
    keys = mosaic_gate.select_chunks_mosaic(
        jnp.pad(q, ((0, short), (0, 0), (0, 0))) if short > 0 else q,
        *(mosaic_gate.pad_chunks(x) for x in kbar), layout.token_pos[:1], num_tokens=num_tokens,
        block_size=block_size, picks=slots - 1, num_chunks=num_chunks, pad=pad, key_dtype=key_dtype(num_chunks),
    )  # fmt: skip
    picks = mosaic_gate.picks_of_keys(keys, num_tokens, num_heads, num_kv_heads, slots - 1, num_chunks)
    return jnp.concatenate([own, picks], axis=-1), keys


def tile_config(config: MobaConfig, block_size: int, head_dim: int, itemsize: int) -> MobaConfig:
    """The attention kernels' config: block_k capped by `key_block`, then `fit_shared_memory`."""
    return fit_shared_memory(
        dataclasses.replace(config, block_k=key_block(config, block_size)), head_dim, itemsize
    )


def pass_tokens(config: MobaConfig, num_heads: int, slots: int, head_dim: int, itemsize: int) -> int:
    """Tokens per pass: as many as keep the past-chunk partials of `slots` selected chunks
    (own included) within `config.max_partial_bytes` (at least one gate tile)."""
    per_token = num_heads * max(1, slots - 1) * head_dim * itemsize
    return max(config.gate_block_q, config.max_partial_bytes // per_token)


def _forward(st: _Static, q, k, v, layout):
    sel, keys = _selection(st, q, k, layout)
    config = tile_config(st.config, st.block_size, q.shape[2], q.dtype.itemsize)
    step = pass_tokens(config, q.shape[1], sel.shape[-1], q.shape[2], q.dtype.itemsize)
    if step < q.shape[0]:  # passes: each builds its own work list from its part of sel
        keys = None
    outs = []
    for t0 in range(0, q.shape[0], step):
        t1 = min(q.shape[0], t0 + step)
        if outs:  # run the passes one after another so their partials are never live together
            _, q = jax.lax.optimization_barrier((outs[-1], q))
        outs.append(
            _attend_pass(
                q[t0:t1], k, v, layout.token_pos[t0:t1], layout.token_own[t0:t1], sel[t0:t1], layout,
                st=st, config=config, keys=keys,
            )  # fmt: skip
        )
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)
    return out, sel


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _moba(st: _Static, q, k, v, layout):
    return _forward(st, q, k, v, layout)[0]


def _moba_fwd(st, q, k, v, layout):
    out, sel = _forward(st, q, k, v, layout)
    return out, (q, k, v, layout, sel)


def _moba_bwd(st, res, g):
    q, k, v, layout, sel = res
    elems = q.shape[1] * sel.shape[-1] * st.block_size * q.shape[2]

    def f(q, k, v):
        return moba_ref.chunk_attention(
            q, k, v, layout.token_pos, sel, layout.chunk_start, layout.chunk_len,
            layout.chunk_pos, block_size=st.block_size, scale=st.scale,
            query_tile=max(1, 2**24 // elems),
        )  # fmt: skip

    _, vjp = jax.vjp(f, q, k, v)
    dq, dk, dv = vjp(g.astype(q.dtype))
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jax.dtypes.float0), layout)
    return dq, dk, dv, zeros


_moba.defvjp(_moba_fwd, _moba_bwd)


def _prepare(q, k, v, block_size, top_k, cu_seqlens_q, cu_seqlens_k, q_positions, check_v=True):
    if q.ndim != 3 or k.ndim != 3 or (check_v and v.shape != k.shape):
        raise ValueError(
            f"want q [T, N, H] and k, v [S, K, H]; got {q.shape}, {k.shape}, "
            f"{None if v is None else v.shape}"
        )
    if q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"head dims must match and N must be a multiple of K; got q {q.shape}, k {k.shape}"
        )
    if not _pow2(q.shape[2]) or q.shape[2] > 256:
        raise ValueError(f"head dim {q.shape[2]}: must be a power of two in 16..256")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r}: must be an int >= 1")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k={top_k!r}: must be an int >= 1")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("give both cu_seqlens_q and cu_seqlens_k, or neither")
    if cu_seqlens_q is None:
        cu_seqlens_q = jnp.array([0, q.shape[0]], jnp.int32)
        cu_seqlens_k = jnp.array([0, k.shape[0]], jnp.int32)
    if cu_seqlens_q.ndim != 1 or cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_q {cu_seqlens_q.shape} and cu_seqlens_k {cu_seqlens_k.shape}:"
            " want the same shape [B + 1]"
        )
    if q_positions is not None and q_positions.shape != (q.shape[0],):
        raise ValueError(f"q_positions {q_positions.shape}: want [T] = ({q.shape[0]},)")
    chunks = num_chunk_ids(k.shape[0], cu_seqlens_q.shape[0] - 1, block_size)
    if chunks > MAX_CHUNKS:
        raise ValueError(f"{chunks} chunks (S={k.shape[0]}, block_size={block_size}): at most "
                         f"{MAX_CHUNKS} are supported; use a larger block_size")  # fmt: skip
    return moba_layout(cu_seqlens_q, cu_seqlens_k, q_positions, q.shape[0], k.shape[0], block_size)


@functools.partial(
    jax.jit, static_argnames=("block_size", "top_k", "scale", "config", "interpret")
)
def moba_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    block_size: int,
    top_k: int,
    cu_seqlens_q: jax.Array | None = None,
    cu_seqlens_k: jax.Array | None = None,
    q_positions: jax.Array | None = None,
    scale: float | None = None,
    config: MobaConfig = MobaConfig(),
    interpret: bool = False,
) -> jax.Array:
    """MoBA attention of a flat ragged batch: q [T, N, H], k/v [S, K, H] -> [T, N, H].

    Sequence b owns queries cu_seqlens_q[b]:cu_seqlens_q[b+1] and keys cu_seqlens_k[b]:
    cu_seqlens_k[b+1] (int32 [B+1]; both None: one sequence). Its queries sit at positions
    S_b - T_b + i (the tail of its keys) unless q_positions [T] gives them. Tokens past
    cu_seqlens_q[-1] are padding and return zeros. Semantics of `mobajax.moba`
    (ties between gate scores: lower chunk index wins). Differentiable in q, k, v.
    """
    layout = _prepare(q, k, v, block_size, top_k, cu_seqlens_q, cu_seqlens_k, q_positions)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    st = _Static(block_size, top_k, scale, config, interpret)
    one_sequence = cu_seqlens_k is None and q_positions is None
    st = with_kernels(st, q, k.shape[1], one_sequence=one_sequence)
    return _moba(st, q, k, v, layout)


AUTO_MAX_PICKS = 4  # MobaConfig(gate="auto") takes the Mosaic gate up to top_k 5


def with_gate(st: _Static, q: jax.Array, num_kv_heads: int, *, one_sequence: bool) -> _Static:
    """st with the selection kernel config.gate chooses ("mosaic" where it cannot run is an
    error). one_sequence: no cu_seqlens and no q_positions."""
    runs = one_sequence and not st.interpret and mosaic_gate.fits(q, num_kv_heads)
    if st.config.gate == "mosaic" and not runs:
        raise ValueError(
            "MobaConfig.gate='mosaic' needs a Hopper GPU, one sequence at its default positions"
            " (no cu_seqlens, no q_positions), bf16 or f16, head dim 128 and query heads per kv"
            f" head dividing {mosaic.HALF}; got {q.dtype}, head dim {q.shape[-1]}, {q.shape[1]}"
            f" query heads over {num_kv_heads} kv heads, one sequence: {one_sequence},"
            f" interpret: {st.interpret}. Use gate='auto' or 'triton'."
        )
    # auto: Mosaic up to AUTO_MAX_PICKS picks (measured faster at top-k 2-5, slower at 9:
    # its picks cost more per chunk than the Triton kernel's, docs/benchmarks.md)
    auto = runs and st.top_k - 1 <= AUTO_MAX_PICKS
    return dataclasses.replace(st, mosaic_gate=st.config.gate == "mosaic" or (st.config.gate == "auto" and auto))


def with_kernels(st: _Static, q: jax.Array, num_kv_heads: int, *, one_sequence: bool) -> _Static:
    """st with the finish kernel config.finish chooses ("mosaic" where it cannot run is an
    error). one_sequence: no cu_seqlens and no q_positions."""
    runs = one_sequence and not st.interpret and mosaic.fits(q, num_kv_heads, st.block_size)
    if st.config.finish == "mosaic" and not runs:
        raise ValueError(
            "MobaConfig.finish='mosaic' needs a Hopper GPU, one sequence at its default positions"
            " (no cu_seqlens, no q_positions), bf16 or f16, head dim 128, query heads per kv head"
            f" dividing {mosaic.HALF} and a block size that is a multiple of 64; got {q.dtype},"
            f" head dim {q.shape[-1]}, {q.shape[1]} query heads over {num_kv_heads} kv heads,"
            f" block size {st.block_size}, one sequence: {one_sequence},"
            f" interpret: {st.interpret}. Use finish='auto' or 'triton'."
        )
    runs_partials = runs and mosaic_partials.fits(st.block_size)
    if st.config.partials == "mosaic" and not runs_partials:
        raise ValueError(
            "MobaConfig.partials='mosaic' needs what finish='mosaic' needs (a Hopper GPU, one"
            " sequence at its default positions, bf16 or f16, head dim 128, query heads per kv"
            f" head dividing {mosaic.HALF}) and a block size that is a multiple of"
            f" {mosaic_partials.BLOCK_KV}; got {q.dtype},"
            f" head dim {q.shape[-1]}, {q.shape[1]} query heads over {num_kv_heads} kv heads,"
            f" block size {st.block_size}, one sequence: {one_sequence},"
            f" interpret: {st.interpret}. Use partials='auto' or 'triton'."
        )
    # auto: Mosaic wherever it runs (both kernels measured faster at blocks 512 and 4096,
    # docs/benchmarks.md)
    return dataclasses.replace(
        with_gate(st, q, num_kv_heads, one_sequence=one_sequence),
        mosaic_finish=st.config.finish == "mosaic" or (st.config.finish == "auto" and runs),
        mosaic_partials=st.config.partials == "mosaic" or (st.config.partials == "auto" and runs_partials),
    )


@functools.partial(jax.jit, static_argnames=("block_size", "top_k", "config", "interpret"))
def moba_select(
    q: jax.Array,
    k: jax.Array,
    *,
    block_size: int,
    top_k: int,
    cu_seqlens_q: jax.Array | None = None,
    cu_seqlens_k: jax.Array | None = None,
    q_positions: jax.Array | None = None,
    config: MobaConfig = MobaConfig(),
    interpret: bool = False,
) -> jax.Array:
    """The kernel's selection [T, N, top_k] int32 in chunk ids local to each sequence.

    Same layout as `mobajax.moba.moba_selected_chunks` (own chunk, then by decreasing gate
    score, -1 past the candidates); padding tokens get -1 everywhere.
    """
    layout = _prepare(q, k, None, block_size, top_k, cu_seqlens_q, cu_seqlens_k, q_positions,
                      check_v=False)  # fmt: skip
    st = _Static(block_size, top_k, 1.0, config, interpret)
    one_sequence = cu_seqlens_k is None and q_positions is None
    sel = _select(with_gate(st, q, k.shape[1], one_sequence=one_sequence), q, k, layout)
    sel = jnp.where(sel >= 0, sel - layout.token_lo[:, None, None], -1)
    pad = top_k - sel.shape[-1]
    return jnp.pad(sel, ((0, 0), (0, 0), (0, pad)), constant_values=-1) if pad else sel


def moba_attention_reference(
    q, k, v, *, block_size, top_k, cu_seqlens_q=None, cu_seqlens_k=None, q_positions=None,
    scale=None,
):  # fmt: skip
    """`moba_attention` in plain jax.numpy, sequence by sequence (offsets must be concrete)."""
    if cu_seqlens_q is None:
        return moba_ref.moba_attention_reference(
            q, k, v, block_size=block_size, top_k=top_k, q_positions=q_positions, scale=scale
        )
    outs = []
    cq, ck = [int(x) for x in cu_seqlens_q], [int(x) for x in cu_seqlens_k]
    for b in range(len(cq) - 1):
        pos = None if q_positions is None else q_positions[cq[b] : cq[b + 1]]
        outs.append(
            moba_ref.moba_attention_reference(
                q[cq[b] : cq[b + 1]], k[ck[b] : ck[b + 1]], v[ck[b] : ck[b + 1]],
                block_size=block_size, top_k=top_k, q_positions=pos, scale=scale,
            )  # fmt: skip
        )
    head = jnp.zeros((cq[0], *q.shape[1:]), q.dtype)
    tail = jnp.zeros((q.shape[0] - cq[-1], *q.shape[1:]), q.dtype)
    return jnp.concatenate([head, *outs, tail])
