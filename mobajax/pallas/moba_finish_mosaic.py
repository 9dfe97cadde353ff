"""MoBA own chunk plus merge on Hopper: a persistent Pallas Mosaic GPU kernel (TMA, wgmma, warp
specialization).

The same work as `moba_attention.moba_finish_kernel` for one sequence of contiguous positions,
bf16/f16 and head dim 128: per (token, head), causal attention over its own chunk up to its
position, merged with its past-chunk partials (`moba_attention.attention_partials`, in
`partial_row` order) by their log-sum-exps.

A tile is ROWS // G tokens x the G query heads of one kv head (row r: token t0 + r // G, head
h * G + r % G), so its K/V tiles serve all G heads and its rows of each past slot are ROWS
consecutive partial rows. `num_programs` persistent CTAs take tiles c, c + P, ...; each runs
four warpgroups:
- a row warpgroup gathers the tile's query rows into its Q slot (two slots, in the layout wgmma
  reads its operand in) and, once the tile is done, writes the slot's output rows out, both by
  per-thread copies (`mosaic_rows`);
- a key warpgroup streams the tile's K/V pages (from its first token's chunk start to its last
  token) into a ring, then its past slots' partial rows and log-sum-exps into a second ring;
- two compute warpgroups of 64 rows: wgmma QK^T, a masked base-2 online softmax and wgmma PV
  over the own chunk (Q from its SMEM slot), then the merge of each past slot's partial, and
  the normalised output rows into the Q slot.

Shapes: q [T, N, H]; K/V pages [S' / BLOCK_KV, BLOCK_KV, K, H] (every key a token sees); o_part
[R + ROWS, H] and lse_part [R + ROWS] (natural) in `partial_row` order, R = past slots * N *
`token_stride(T)` -> out [T, N, H] in q's dtype. A token's past slot j is empty, and its rows
are never read, where the token's own chunk index is <= j: the gate fills every slot that has a
past chunk to pick (with finite inputs; a NaN score can leave one empty, and its unwritten row
then reaches that token's output).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mobajax.pallas import mosaic_rows, mosaic_softmax

ROWS, HALF = mosaic_rows.ROWS, mosaic_rows.HALF  # rows per tile; per compute warpgroup
# keys per K/V tile, read as pages of k viewed as [S / BLOCK_KV, BLOCK_KV, K, H] so that a copy
# starts at a whole page. 128-key tiles would need one partial slot to fit in SMEM, which cost
# more than they saved (docs/benchmarks.md, session 14).
BLOCK_KV = 64
HEAD_DIM = 128
PARTIAL_SLOTS = 2  # ring of past-slot partials ([ROWS, H] rows + log-sum-exps) per CTA


@dataclasses.dataclass(frozen=True)
class MobaMosaicConfig:
    """stages: K/V tiles in flight (2 leave room in SMEM for the Q and partial rings);
    num_programs: persistent CTAs (the H100's 132 SMs)."""

    stages: int = 2
    num_programs: int = 132

    def __post_init__(self):
        if self.stages < 2:
            raise ValueError(f"stages must be >= 2, got {self.stages}")
        if self.num_programs < 1:
            raise ValueError(f"num_programs must be >= 1, got {self.num_programs}")


def fits(q: jax.Array, num_kv_heads: int, block_size: int) -> bool:
    """Whether this kernel takes these inputs on this machine: a Hopper GPU, bf16/f16, head dim
    128, query heads per kv head dividing HALF (a tile's half is whole tokens) and chunks of
    whole K/V tiles."""
    return (
        HALF % (q.shape[1] // num_kv_heads) == 0
        and mosaic_softmax.on_hopper()
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and q.shape[-1] == HEAD_DIM
        and block_size % BLOCK_KV == 0
    )


def key_pages(x: jax.Array, page: int = BLOCK_KV) -> jax.Array:
    """k or v [S, K, H] as pages [ceil(S / page), page, K, H]: a free reshape when S is a
    multiple of page, else a copy padded with zeros, which no query sees."""
    pad = -x.shape[0] % page
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0), (0, 0)))
    return x.reshape(-1, page, *x.shape[1:])


def token_stride(num_tokens: int) -> int:
    """Tokens per (past slot, kv head) block of the `partial_row` order: num_tokens rounded up to
    a multiple of 4, so that every tile's first log-sum-exp starts 16-byte aligned (a TMA copy
    from a misaligned start faults)."""
    return -(-num_tokens // 4) * 4


def tile_tokens(group: int) -> int:
    """Tokens per tile: ROWS rows of `group` query heads each."""
    return ROWS // group


def tile_descriptors(num_tiles: int, num_kv_heads: int, tokens: int) -> jax.Array:
    """[W, 2] int32 (first token, kv head) of tiles w = (token block w // K, kv head w % K), each
    of `tokens` tokens: the descriptors `tile_rows_of` reads."""
    w = jnp.arange(num_tiles, dtype=jnp.int32)
    return jnp.stack([w // num_kv_heads * tokens, w % num_kv_heads], axis=1)


def tile_rows_of(*, group, num_heads, padded_tokens, num_tokens):
    """`mosaic_rows.row_copies`' rows_of for a tile (descriptor [first token, kv head]): row r is
    (token t0 + r // group, head h * group + r % group); read from row min(token, T' - 1) of q,
    written unless the token is past the last."""
    from jaxlib.mlir.dialects import arith

    from mobajax.pallas.mosaic_rows import i32, load_i32

    def rows_of(tile, refs, r):
        del refs
        token = arith.addi(load_i32(tile, i32(0)), arith.divui(r, i32(group)))
        head = arith.addi(arith.muli(load_i32(tile, i32(1)), i32(group)), arith.remui(r, i32(group)))
        src = arith.addi(arith.muli(arith.minsi(token, i32(padded_tokens - 1)), i32(num_heads)), head)
        live = arith.cmpi(arith.CmpIPredicate.slt, token, i32(num_tokens))
        return src, arith.select(live, arith.addi(arith.muli(token, i32(num_heads)), head), i32(-1))

    return rows_of


@functools.partial(jax.jit, static_argnames=("num_tokens", "block_size", "past_slots", "scale", "config"))
def own_chunk_and_merge_mosaic(q, k_pages, v_pages, o_part, lse_part, base, *, num_tokens, block_size,
                               past_slots, scale, config):  # fmt: skip
    """Output of one sequence's T = num_tokens tokens at positions base[0] + t.

    q [T', N, H] (T' >= T and T' >= `tile_tokens`; rows past T are ignored); k_pages, v_pages
    [S' / BLOCK_KV, BLOCK_KV, K, H]; o_part [R + ROWS, H], lse_part [R + ROWS] float32: the past
    slots' partials in `partial_row` order, R = past_slots * N * `token_stride(T)` (rows of empty
    slots, past slot j of a token whose own chunk index is <= j, are ignored, as both are if
    past_slots is 0); base [1] int32
    -> [T', N, H] in q's dtype (rows past T: garbage)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    _, num_heads, h = q.shape
    dtype = q.dtype
    num_kv_heads = k_pages.shape[2]
    group = num_heads // num_kv_heads
    tokens, half_tokens = tile_tokens(group), HALF // group
    num_tiles = -(-num_tokens // tokens) * num_kv_heads
    stages, programs = config.stages, config.num_programs
    stride = token_stride(num_tokens)
    log2_scale = scale / math.log(2.0)
    log2_e = 1.0 / math.log(2.0)
    rows_of = tile_rows_of(group=group, num_heads=num_heads, padded_tokens=q.shape[0], num_tokens=num_tokens)
    gather, scatter, _ = mosaic_rows.row_copies(row_bytes=h * dtype.itemsize, rows_of=rows_of)
    tile_desc = tile_descriptors(num_tiles, num_kv_heads, tokens)

    def kernel(base_ref, desc_ref, q_ref, k_ref, v_ref, o_part_ref, lse_part_ref, out_ref, scoped):
        (k_smem, v_smem, q_smem, p_smem, lse_smem, rows_smem), ready, free = scoped
        k_ready, v_ready, q_ready, p_ready, out_ready = ready
        k_free, v_free, p_free = free
        cta, wg = lax.axis_index("cta"), lax.axis_index("wg")
        tiles = jnp.maximum(lax.div(num_tiles - cta + programs - 1, programs), 0)
        pos_base = base_ref[0]

        def tile_keys(i):
            """(first token, first key, kv head, K/V steps) of this CTA's tile i."""
            w = cta + i * programs
            t0 = lax.div(w, num_kv_heads) * tokens
            last = pos_base + jnp.minimum(t0 + tokens, num_tokens) - 1
            lo = lax.div(pos_base + t0, block_size) * block_size
            return t0, lo, lax.rem(w, num_kv_heads), lax.div(last - lo, BLOCK_KV) + 1

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            qi = plgpu.broadcasted_iota(jnp.int32, (HALF, BLOCK_KV), 0, layout=plgpu.Layout.WGMMA)
            ki = plgpu.broadcasted_iota(jnp.int32, (HALF, BLOCK_KV), 1, layout=plgpu.Layout.WGMMA)

            def merge(state, p, j, own):
                """Fold the partial rows (normalised, natural log-sum-exp) of the p-th past slot
                this warpgroup merges, past slot j of its tile, into state; own [HALF]: each
                row's own chunk index, the number of past chunks it can pick, so slot j is
                empty (never written) where own <= j."""
                acc, m, l = state
                ps = lax.rem(p, PARTIAL_SLOTS)
                plgpu.barrier_wait(p_ready.at[ps])
                rows = pl.ds(wg * HALF, HALF)
                part = plgpu.load(p_smem.at[ps, rows], layout=plgpu.Layout.WGMMA, optimized=False)
                lse = plgpu.load(lse_smem.at[ps, rows], layout=plgpu.Layout.WGMMA.reduce(1))
                lse = jnp.where(own > j, lse * log2_e, -jnp.inf)
                # every thread's reads of the slot done before it is released to the next TMA
                # copy: without this fence and warpgroup barrier, on the H100 some 50 of 4.2M
                # rows per call at 128K came out wrong (docs/benchmarks.md, session 14)
                plgpu.commit_smem()
                plgpu.barrier_arrive(p_free.at[ps])
                m_new = jnp.maximum(m, lse)  # m is finite: every real token's row saw its own key
                alpha, weight = jnp.exp2(m - m_new), jnp.exp2(lse - m_new)  # weight 0: an empty slot
                wide = lax.broadcast_in_dim(weight, acc.shape, [0])
                # rows of empty slots were never written: weight 0 must not meet their garbage
                term = jnp.where(wide > 0.0, part.astype(jnp.float32) * wide, 0.0)
                return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + term, m_new, l * alpha + weight

            def tile(i, counters):
                g0, p0 = counters
                t0, lo, _, steps = tile_keys(i)
                qs = lax.rem(i, 2)
                my_q = q_smem.at[qs, wg]  # the wgmma operand in SMEM, then the output rows
                plgpu.barrier_wait(q_ready.at[qs])
                pos = pos_base + t0 + wg * half_tokens + lax.div(qi, group)  # each row's position
                first = lax.div(pos, block_size) * block_size  # its chunk's first key

                def step(j, state):
                    key = lo + j * BLOCK_KV + ki
                    slot = lax.rem(g0 + j, stages)
                    barriers = (k_ready.at[slot], k_free.at[slot], v_ready.at[slot], v_free.at[slot])
                    return mosaic_softmax.attention_step(
                        state, my_q, k_smem.at[slot], v_smem.at[slot], barriers, log2_scale=log2_scale,
                        seen=lambda: (key >= first) & (key <= pos), empty_rows=True,
                    )  # fmt: skip

                state = lax.fori_loop(0, steps, step, mosaic_softmax.initial_state(HALF, h))
                if past_slots:
                    ri = plgpu.broadcasted_iota(jnp.int32, (HALF,), 0, layout=plgpu.Layout.WGMMA.reduce(1))
                    own = lax.div(pos_base + t0 + wg * half_tokens + lax.div(ri, group), block_size)
                    state = lax.fori_loop(0, past_slots, lambda j, st: merge(st, p0 + j, j, own), state)
                acc, _, l = state
                my_q[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
                plgpu.commit_smem()
                plgpu.barrier_arrive(out_ready.at[qs])  # the row warpgroup writes them out
                return g0 + steps, p0 + past_slots

            lax.fori_loop(0, tiles, tile, (jnp.int32(0), jnp.int32(0)))

        @pl.when(wg == 2)
        def _keys():
            plgpu.set_max_registers(24, action="decrease")

            def tile(i, counters):
                g0, p0 = counters
                t0, lo, head, steps = tile_keys(i)
                first = lax.div(lo, BLOCK_KV)

                @pl.loop(0, steps)
                def _step(j):
                    g = g0 + j
                    slot = lax.rem(g, stages)
                    for ref, smem, ready, free_ in ((k_ref, k_smem, k_ready, k_free), (v_ref, v_smem, v_ready, v_free)):

                        @pl.when(g >= stages)
                        def _(free_=free_):
                            plgpu.barrier_wait(free_.at[slot])

                        plgpu.copy_gmem_to_smem(ref.at[first + j, :, head], smem.at[slot], ready.at[slot])

                if past_slots:
                    @pl.loop(0, past_slots)
                    def _slot(j):  # this tile's rows of past slot j: consecutive
                        p = p0 + j
                        ps = lax.rem(p, PARTIAL_SLOTS)
                        row = ((j * num_kv_heads + head) * stride + t0) * group

                        @pl.when(p >= PARTIAL_SLOTS)
                        def _():
                            plgpu.barrier_wait(p_free.at[ps])

                        plgpu.copy_gmem_to_smem(o_part_ref.at[pl.ds(row, ROWS)], p_smem.at[ps], p_ready.at[ps])
                        plgpu.copy_gmem_to_smem(lse_part_ref.at[pl.ds(row, ROWS)], lse_smem.at[ps], p_ready.at[ps])
                return g0 + steps, p0 + past_slots

            lax.fori_loop(0, tiles, tile, (jnp.int32(0), jnp.int32(0)))

        @pl.when(wg == 3)
        def _rows():
            plgpu.set_max_registers(24, action="decrease")

            def write_out(i):
                qs = lax.rem(i, 2)
                plgpu.barrier_wait(out_ready.at[qs])
                scatter(rows_smem.at[qs], q_smem.at[qs], out_ref)

            @pl.loop(0, tiles)
            def _tile(i):
                qs = lax.rem(i, 2)

                @pl.when(i >= 2)
                def _():
                    write_out(i - 2)  # the slot read out before its refill

                gather(desc_ref.at[cta + i * programs], q_ref, q_smem.at[qs], rows_smem.at[qs])
                plgpu.barrier_arrive(q_ready.at[qs])  # every thread: its copies have landed

            @pl.loop(jnp.maximum(tiles - 2, 0), tiles)
            def _last(i):
                write_out(i)

    def entry(*refs):
        transforms = mosaic_rows.slot_transforms()
        pslots = PARTIAL_SLOTS if past_slots else 1
        pl.run_scoped(
            lambda *scoped: kernel(*refs, scoped),
            (
                plgpu.SMEM((stages, BLOCK_KV, h), dtype, transforms=transforms),
                plgpu.SMEM((stages, BLOCK_KV, h), dtype, transforms=transforms),
                plgpu.SMEM((2, 2, HALF, h), dtype, transforms=transforms),  # Q rows in, output rows out
                plgpu.SMEM((pslots, ROWS if past_slots else 8, h), o_part.dtype),  # past partials
                plgpu.SMEM((pslots, ROWS), jnp.float32),  # their log-sum-exps
                plgpu.SMEM((2, 2, ROWS), jnp.int32),  # the tile's rows in q and in out
            ),
            (
                plgpu.Barrier(num_barriers=stages),  # a K tile landed
                plgpu.Barrier(num_barriers=stages),  # a V tile landed
                plgpu.Barrier(num_barriers=2),  # a Q slot's rows landed
                plgpu.Barrier(num_arrivals=2, num_barriers=pslots),  # a past slot's partials landed
                plgpu.Barrier(num_arrivals=2, num_barriers=2),  # a Q slot holds the tile's outputs
            ),
            (
                plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # K slot free
                plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # V slot free
                plgpu.Barrier(num_arrivals=2, num_barriers=pslots),  # partial slot free
            ),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        grid=(programs,),
        grid_names=("cta",),
        num_threads=4,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(base, tile_desc, q, k_pages, v_pages, o_part, lse_part)
