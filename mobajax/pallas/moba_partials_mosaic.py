"""MoBA past-chunk partials on Hopper: a persistent Pallas Mosaic GPU kernel (TMA, wgmma, warp
specialization).

The same work as `moba_attention.attention_partials` (per row (token, head, past slot): the
normalised attention output over the row's past chunk and its log-sum-exp), for bf16/f16, head
dim 128, one sequence and block sizes that are a multiple of 64. The work list's tiles
(`work_list` with `ROWS` rows) each hold rows that read one past chunk of one kv head; a past
chunk is always whole (block_size keys), so every step is a full [64, BLOCK_KV] tile, no mask.

Kernel: `num_programs` persistent CTAs; CTA c takes tiles c, c + P, c + 2P, ... of the live
tiles. Each CTA runs four warpgroups:
- a query warpgroup copies a tile's 128 query-row indices into SMEM, then gathers those rows
  with one-row TMA copies into the tile's Q slot (two slots: the next tile's rows arrive while
  this tile computes);
- a key warpgroup streams the chunk's K/V tiles into a ring of `stages` SMEM slots;
- two compute warpgroups, each owning 64 rows of a tile: Q to registers, S = Q K^T (wgmma),
  online softmax in base 2, O += P V (wgmma), then the normalised rows and their natural
  log-sum-exps go out through the Q slot with one TMA store each, in tile order.
Outputs are in tile order (row w * ROWS + r for row r of tile w); `partials_index` maps the
finish kernel's `partial_row` order onto them.

Shapes: q [T * N, H]; K/V pages [S / BLOCK_KV, BLOCK_KV, K, H] -> o [W * ROWS, H] (q's dtype),
lse [W * ROWS] float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mobajax.pallas import mosaic_softmax

ROWS = 128  # rows per tile: two compute warpgroups of 64 rows (one wgmma M tile each)
HALF = ROWS // 2
# keys per K/V tile, read as pages of k viewed as [S / BLOCK_KV, BLOCK_KV, K, H] (a free
# reshape) so that a copy starts at a whole page. On the H100 (jax 0.11.2) this kernel's scores
# came out wrong whenever the K tile was square: 128 keys at head dim 128, 64 keys at head dim 64
# (docs/benchmarks.md). So it takes head dim 128 with 64-key tiles only, the one verified shape.
BLOCK_KV = 64
HEAD_DIM = 128
# largest block size MobaConfig(partials="auto") sends here. On the H100 this kernel beat the
# Triton one at block 512 (8 key steps per tile: the gathers overlap the work of the tile before)
# and lost at block 4096 on 1M tokens (64 steps: its 128-row tiles read each K/V tile twice as
# often as Triton's 256-row ones).
AUTO_MAX_BLOCK = 512


@dataclasses.dataclass(frozen=True)
class MobaMosaicConfig:
    """stages: K/V tiles in flight; num_programs: persistent CTAs (the H100's 132 SMs)."""

    stages: int = 3  # best of 2/3/4 at S = 128K, block 512 on the H100
    num_programs: int = 132

    def __post_init__(self):
        if self.stages < 2:
            raise ValueError(f"stages must be >= 2, got {self.stages}")
        if self.num_programs < 1:
            raise ValueError(f"num_programs must be >= 1, got {self.num_programs}")


def fits(q: jax.Array, block_size: int) -> bool:
    """Whether this kernel takes these inputs on this machine: a Hopper GPU, bf16/f16, head dim 128
    and chunks of whole K/V tiles."""
    return (
        mosaic_softmax.on_hopper()
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and q.shape[-1] == HEAD_DIM
        and block_size % BLOCK_KV == 0
    )


def tile_rows(work, slots: int):
    """Per tile-order row p = w * ROWS + r: its (token, head) row tn in q (0 for rows past the
    tile's live rows) and its row = tn * slots + slot in the flat selection (-1 there).
    work: `work_list(..., ROWS)`."""
    _, start, size, order = work
    r = jnp.arange(ROWS, dtype=jnp.int32)[None, :]
    live = r < size[:, None]
    row = jnp.where(live, order[jnp.where(live, start[:, None] + r, 0)], -1).reshape(-1)
    return jnp.maximum(row, 0) // slots, row


def partials_index(row, partial_row_of, num_rows: int):
    """int32 [num_rows]: for each `partial_row` position, the tile-order row of o/lse holding it
    (0 where no tile writes one: empty slots and the spare rows)."""
    dest = jnp.where(row >= 0, partial_row_of(row), num_rows)
    p = jnp.arange(row.shape[0], dtype=jnp.int32)
    return jnp.zeros((num_rows,), jnp.int32).at[dest].set(p, mode="drop")


@functools.partial(jax.jit, static_argnames=("steps", "scale", "config"))
def attention_partials_mosaic(q, k_pages, v_pages, src, kpage, kvh, live_tiles, *, steps, scale, config):
    """q [T * N, H]; k_pages, v_pages [S / BLOCK_KV, BLOCK_KV, K, H]; src [W * ROWS] int32
    (query row of each tile-order row); kpage, kvh [W] int32 (the page of the tile's chunk's
    first key, and its kv head); live_tiles [1] int32
    (tiles 0 .. live_tiles - 1 hold rows); steps = block_size // BLOCK_KV (static)
    -> o [W * ROWS, H] q's dtype, lse [W * ROWS] float32 natural log-sum-exps."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    rows_out, h = src.shape[0], q.shape[-1]
    dtype = q.dtype
    bkv, stages, programs = BLOCK_KV, config.stages, config.num_programs
    log2_scale = scale / math.log(2.0)

    def kernel(n_ref, kpage_ref, kvh_ref, src_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, scoped):
        (k_smem, v_smem, q_smem, idx_smem, lse_smem), ready, free = scoped
        k_ready, v_ready, q_ready, idx_ready = ready
        k_free, v_free, q_free = free
        cta, wg = lax.axis_index("cta"), lax.axis_index("wg")
        tiles = jnp.maximum(lax.div(n_ref[0] - cta + programs - 1, jnp.int32(programs)), 0)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")

            @pl.loop(0, tiles)
            def _tile(i):
                qs = lax.rem(i, 2)
                my_q = q_smem.at[qs, wg]
                plgpu.barrier_wait(q_ready.at[qs * 2 + wg])
                q_rows = plgpu.load(my_q, layout=plgpu.Layout.WGMMA, optimized=False)
                def step(j, state):
                    slot = lax.rem(i * steps + j, jnp.int32(stages))
                    barriers = (k_ready.at[slot], k_free.at[slot], v_ready.at[slot], v_free.at[slot])
                    return mosaic_softmax.attention_step(
                        state, q_rows, k_smem.at[slot], v_smem.at[slot], barriers, log2_scale=log2_scale
                    )

                acc, m, l = lax.fori_loop(0, steps, step, mosaic_softmax.initial_state(HALF, h))
                my_q[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
                lse_smem.at[wg][...] = (m + jnp.log2(l)) * math.log(2.0)
                plgpu.commit_smem()
                base = (cta + i * programs) * ROWS + wg * HALF
                plgpu.copy_smem_to_gmem(my_q, o_ref.at[pl.ds(base, HALF)])
                plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[pl.ds(base, HALF)])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the slot and lse_smem reusable
                plgpu.barrier_arrive(q_free.at[qs])

            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _keys():
            plgpu.set_max_registers(24, action="decrease")

            @pl.loop(0, tiles)
            def _tile(i):
                w = cta + i * programs
                first, head = kpage_ref[w], kvh_ref[w]

                @pl.loop(0, steps)
                def _step(j):
                    g = i * steps + j
                    slot = lax.rem(g, jnp.int32(stages))

                    for ref, smem, ready, free in ((k_ref, k_smem, k_ready, k_free), (v_ref, v_smem, v_ready, v_free)):

                        @pl.when(g >= stages)
                        def _(free=free):
                            plgpu.barrier_wait(free.at[slot])

                        plgpu.copy_gmem_to_smem(ref.at[first + j, :, head], smem.at[slot], ready.at[slot])

        @pl.when(wg == 3)
        def _queries():
            plgpu.set_max_registers(24, action="decrease")

            @pl.loop(0, tiles)
            def _tile(i):
                w = cta + i * programs
                qs = lax.rem(i, 2)

                @pl.when(i >= 2)
                def _():
                    plgpu.barrier_wait(q_free.at[qs])

                plgpu.copy_gmem_to_smem(src_ref.at[pl.ds(w * ROWS, ROWS)], idx_smem.at[qs], idx_ready.at[qs])
                plgpu.barrier_wait(idx_ready.at[qs])
                for half in range(2):

                    @pl.loop(0, HALF)
                    def _row(r, half=half):
                        row = idx_smem[qs, half * HALF + r]
                        dst = q_smem.at[qs, half, pl.ds(r, 1)]
                        plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(row, 1)], dst, q_ready.at[qs * 2 + half])

    def entry(*refs):
        transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        pl.run_scoped(
            lambda *scoped: kernel(*refs, scoped),
            (
                plgpu.SMEM((stages, bkv, h), dtype, transforms=transforms),
                plgpu.SMEM((stages, bkv, h), dtype, transforms=transforms),
                plgpu.SMEM((2, 2, HALF, h), dtype),  # Q rows in, output rows out: untiled
                plgpu.SMEM((2, ROWS), jnp.int32),  # the tile's query-row indices
                plgpu.SMEM((2, HALF), jnp.float32),  # each warpgroup's log-sum-exps out
            ),
            (
                plgpu.Barrier(num_barriers=stages),  # a K tile landed
                plgpu.Barrier(num_barriers=stages),  # a V tile landed
                plgpu.Barrier(num_arrivals=HALF, num_barriers=4),  # (Q slot, warpgroup) rows landed
                plgpu.Barrier(num_barriers=2),  # a tile's query-row indices landed
            ),
            (
                plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # K slot free
                plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # V slot free
                plgpu.Barrier(num_arrivals=2, num_barriers=2),  # Q slot free (outputs read out)
            ),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=(
            jax.ShapeDtypeStruct((rows_out, h), dtype),
            jax.ShapeDtypeStruct((rows_out,), jnp.float32),
        ),
        grid=(programs,),
        grid_names=("cta",),
        num_threads=4,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(live_tiles, kpage, kvh, src, q, k_pages, v_pages)
