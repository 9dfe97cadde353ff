"""MoBA past-chunk partials on Hopper: a persistent Pallas Mosaic GPU kernel (wgmma, warp
specialization, query rows gathered and partials scattered by per-thread copies).

The same work as `moba_attention.attention_partials` (per row (token, head, past slot): the
normalised attention over the row's past chunk and its log-sum-exp, written at its
`partial_row`), for one sequence at its default positions, bf16/f16, head dim 128 and block
sizes that are a multiple of BLOCK_KV. The work list's tiles (`work_list` with ROWS rows) each
hold rows that read one past chunk of one kv head; a past chunk is always whole, so every step is
a full [64, BLOCK_KV] tile, no mask.

Kernel: `num_programs` persistent CTAs; CTA c takes tiles c, c + P, c + 2P, ... of the live
tiles. Each CTA runs four warpgroups:
- a row warpgroup gathers a tile's 128 query rows into one of Q_SLOTS SMEM slots with
  per-thread 16-byte `cp.async` copies (one TMA copy per row costs ~39 ns per SM on the H100,
  as much as the math: docs/benchmarks.md, session 14), and once the tile is computed scatters
  its output rows and log-sum-exps from the slot to their `partial_row` rows with per-thread
  16-byte stores;
- a key warpgroup streams the chunk's K/V tiles into a ring of STAGES SMEM slots (TMA);
- two compute warpgroups, each owning 64 rows of a tile: S = Q K^T (wgmma, Q from its SMEM
  slot), online softmax in base 2, O += P V (wgmma), then the normalised rows into the Q slot
  and their natural log-sum-exps beside them (`mosaic_softmax.pipelined_attention`). Each
  issues a step's Q K^T with the previous step's P V and runs the step's softmax while that
  P V is in flight (FA3's intra-warpgroup overlap), and the two ping-pong (a schedule barrier):
  one's softmax runs while the other's matmuls run.

Shapes: q [T * N, H]; K/V pages [S / BLOCK_KV, BLOCK_KV, K, H]; the work list's bucket, start,
size [W] and order [R' + ROWS] -> o [rows, H] (q's dtype) and lse [rows] float32 in
`partial_row` order (rows of empty slots and spare rows are not written).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mobajax.pallas import moba_finish_mosaic as finish_mosaic
from mobajax.pallas import mosaic_rows, mosaic_softmax
from mobajax.pallas.moba_finish_mosaic import HALF, ROWS, token_stride

# keys per K/V tile: 128 (64-key tiles took 0.5 ms more at 128K on the H100). In this kernel,
# with the query rows as a register operand, 128 x 128 tiles gave wrong scores (as in sessions 12
# and 14); with Q as an SMEM operand, as here, they are right (docs/benchmarks.md, session 15).
BLOCK_KV = 128
STAGES = 2  # K/V tiles in flight: what fits in SMEM beside two Q slots
Q_SLOTS = 2  # tiles whose query rows / outputs are in SMEM: one computing, one being scattered
# out and refilled


@dataclasses.dataclass(frozen=True)
class MobaPartialsConfig:
    """num_programs: persistent CTAs (the H100's 132 SMs)."""

    num_programs: int = 132

    def __post_init__(self):
        if self.num_programs < 1:
            raise ValueError(f"num_programs must be >= 1, got {self.num_programs}")


def fits(block_size: int) -> bool:
    """Whether chunks of block_size keys are whole K/V tiles (the rest of what this kernel
    needs is `moba_finish_mosaic.fits`)."""
    return block_size % BLOCK_KV == 0


def key_pages(x: jax.Array) -> jax.Array:
    """k or v [S, K, H] as pages [ceil(S / BLOCK_KV), BLOCK_KV, K, H] (`moba_finish_mosaic.key_pages`)."""
    return finish_mosaic.key_pages(x, BLOCK_KV)


def _rows_of(*, slots, num_heads, num_kv_heads, num_tokens, key_tokens):
    """`mosaic_rows.row_copies`' rows_of for a work-list tile (descriptor [start, size], ref:
    the sorted rows): entry r's query row (`moba_attention.work_row_query`; 0 past size) and its
    `partial_row` (-1 past size)."""
    from jaxlib.mlir.dialects import arith

    from mobajax.pallas.mosaic_rows import i32, load_i32

    group = num_heads // num_kv_heads
    stride = token_stride(num_tokens)

    def query_and_partial_row(e):  # e = ((kv head * slots + slot) * key_tokens + token) * group + head in group
        head_in_group, e = arith.remsi(e, i32(group)), arith.divsi(e, i32(group))
        tok, e = arith.remsi(e, i32(key_tokens)), arith.divsi(e, i32(key_tokens))
        slot, kv_head = arith.remsi(e, i32(slots)), arith.divsi(e, i32(slots))
        head = arith.addi(arith.muli(kv_head, i32(group)), head_in_group)
        query = arith.addi(arith.muli(tok, i32(num_heads)), head)
        block = arith.addi(arith.muli(slot, i32(num_kv_heads)), kv_head)
        row = arith.addi(arith.muli(block, i32(stride)), tok)
        return query, arith.addi(arith.muli(row, i32(group)), head_in_group)

    def rows_of(tile, refs, r):
        start, size = load_i32(tile, i32(0)), load_i32(tile, i32(1))
        live = arith.cmpi(arith.CmpIPredicate.slt, r, size)
        query, partial = query_and_partial_row(load_i32(refs[0], arith.select(live, arith.addi(start, r), start)))
        return arith.select(live, query, i32(0)), arith.select(live, partial, i32(-1))

    return rows_of


def live_tiles(bucket, start, size, order):
    """`work_list`'s (bucket, start, size, order) as this kernel reads a work list: (bucket, tile
    [W, 2] (start, size), tiles_live [1] (its tiles with rows come first), order)."""
    return bucket, jnp.stack([start, size], axis=1), jnp.count_nonzero(size).astype(jnp.int32)[None], order


@functools.partial(
    jax.jit, static_argnames=("num_rows", "num_tokens", "key_tokens", "block_size", "slots", "scale", "config")
)
def attention_partials_mosaic(q, k_pages, v_pages, bucket, tile, tiles_live, order, *, num_rows, num_tokens,
                              key_tokens, block_size, slots, scale, config):  # fmt: skip
    """q [T * N, H]; k_pages, v_pages [S / BLOCK_KV, BLOCK_KV, K, H] (chunk c starts at key
    c * block_size); bucket [W], tile [W, 2] (first sorted row, live rows), tiles_live [1] and
    order int32: the work list of the past slots in tiles of ROWS rows (`moba_work_mosaic`, or
    `live_tiles` of `work_list`; slots per (token, head); its rows over key_tokens >= num_tokens
    tokens) -> o [num_rows, H] q's dtype and lse [num_rows] float32 (natural), at the rows'
    `partial_row`."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    h = q.shape[-1]
    num_heads = q.shape[0] // num_tokens
    num_kv_heads = k_pages.shape[2]
    dtype = q.dtype
    stages, programs = STAGES, config.num_programs
    steps = block_size // BLOCK_KV
    log2_scale = scale / math.log(2.0)
    rows_of = _rows_of(
        slots=slots, num_heads=num_heads, num_kv_heads=num_kv_heads, num_tokens=num_tokens, key_tokens=key_tokens
    )
    gather, scatter, scatter_words = mosaic_rows.row_copies(row_bytes=h * dtype.itemsize, rows_of=rows_of, num_refs=1)

    def kernel(n_ref, bucket_ref, tile_ref, order_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, scoped):
        (k_smem, v_smem, q_smem, lse_smem, rows_smem), ready, free = scoped
        k_ready, v_ready, q_ready, out_ready = ready
        k_free, v_free, schedule = free
        cta, wg = lax.axis_index("cta"), lax.axis_index("wg")
        tiles = jnp.maximum(lax.div(n_ref[0] - cta + programs - 1, jnp.int32(programs)), 0)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            # ping-pong: warpgroup 1 starts one pass of the schedule barrier behind, so each
            # warpgroup's softmax runs while the other's matmuls have the tensor cores
            pl.when(wg == 1)(functools.partial(mosaic_softmax.pass_barrier, schedule))

            @pl.loop(0, tiles)
            def _tile(i):
                qs = lax.rem(i, Q_SLOTS)
                my_q = q_smem.at[qs, wg]
                plgpu.barrier_wait(q_ready.at[qs])

                def slot_of(j):
                    return lax.rem(i * steps + j, jnp.int32(stages))

                def barriers(j):
                    slot = slot_of(j)
                    return k_ready.at[slot], k_free.at[slot], v_ready.at[slot], v_free.at[slot]

                acc, m, l = mosaic_softmax.pipelined_attention(
                    my_q, lambda j: k_smem.at[slot_of(j)], lambda j: v_smem.at[slot_of(j)], barriers, steps,
                    log2_scale=log2_scale, schedule=schedule,
                )
                my_q[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
                lse_smem.at[qs, wg][...] = (m + jnp.log2(l)) * math.log(2.0)
                plgpu.commit_smem()
                plgpu.barrier_arrive(out_ready.at[qs])  # the row warpgroup writes them out

            pl.when(wg == 0)(functools.partial(mosaic_softmax.pass_barrier, schedule))  # and catches up

        @pl.when(wg == 2)
        def _keys():
            plgpu.set_max_registers(24, action="decrease")

            @pl.loop(0, tiles)
            def _tile(i):
                b = bucket_ref[cta + i * programs]
                first, head = lax.div(b, num_kv_heads) * steps, lax.rem(b, num_kv_heads)

                @pl.loop(0, steps)
                def _step(j):
                    g = i * steps + j
                    slot = lax.rem(g, jnp.int32(stages))

                    kv = ((k_ref, k_smem, k_ready, k_free), (v_ref, v_smem, v_ready, v_free))
                    for ref, smem, ready_, free_ in kv:

                        @pl.when(g >= stages)
                        def _(free_=free_):
                            plgpu.barrier_wait(free_.at[slot])

                        plgpu.copy_gmem_to_smem(ref.at[first + j, :, head], smem.at[slot], ready_.at[slot])

        @pl.when(wg == 3)
        def _rows():
            plgpu.set_max_registers(24, action="decrease")

            def write_out(i):
                qs = lax.rem(i, Q_SLOTS)
                plgpu.barrier_wait(out_ready.at[qs])
                scatter(rows_smem.at[qs], q_smem.at[qs], o_ref)
                scatter_words(rows_smem.at[qs], lse_smem.at[qs], lse_ref)

            @pl.loop(0, tiles)
            def _tile(i):
                qs = lax.rem(i, Q_SLOTS)

                @pl.when(i >= Q_SLOTS)
                def _():
                    write_out(i - Q_SLOTS)  # the slot read out before its refill

                gather(tile_ref.at[cta + i * programs], q_ref, q_smem.at[qs], rows_smem.at[qs], order_ref)
                plgpu.barrier_arrive(q_ready.at[qs])  # every thread: its copies have landed

            @pl.loop(jnp.maximum(tiles - Q_SLOTS, 0), tiles)
            def _last(i):
                write_out(i)

    def entry(*refs):
        transforms = mosaic_rows.slot_transforms()
        pl.run_scoped(
            lambda *scoped: kernel(*refs, scoped),
            (
                plgpu.SMEM((stages, BLOCK_KV, h), dtype, transforms=transforms),
                plgpu.SMEM((stages, BLOCK_KV, h), dtype, transforms=transforms),
                plgpu.SMEM((Q_SLOTS, 2, HALF, h), dtype, transforms=transforms),  # Q rows in, outputs out
                plgpu.SMEM((Q_SLOTS, 2, HALF), jnp.float32),  # the tile's log-sum-exps out
                plgpu.SMEM((Q_SLOTS, 2, ROWS), jnp.int32),  # the tile's query rows and partial rows
            ),
            (
                plgpu.Barrier(num_barriers=stages),  # a K tile landed
                plgpu.Barrier(num_barriers=stages),  # a V tile landed
                plgpu.Barrier(num_barriers=Q_SLOTS),  # a tile's query rows landed
                plgpu.Barrier(num_arrivals=2, num_barriers=Q_SLOTS),  # a tile's outputs are in its slot
            ),
            (
                plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # K slot free
                plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # V slot free
                plgpu.Barrier(num_arrivals=2),  # the compute warpgroups' ping-pong schedule
            ),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=(
            jax.ShapeDtypeStruct((num_rows, h), dtype),
            jax.ShapeDtypeStruct((num_rows,), jnp.float32),
        ),
        grid=(programs,),
        grid_names=("cta",),
        num_threads=4,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(tiles_live, bucket, tile, order, q, k_pages, v_pages)
