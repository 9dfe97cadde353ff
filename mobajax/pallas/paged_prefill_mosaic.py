"""Ragged paged prefill on Hopper: Pallas Mosaic GPU (TMA loads, wgmma, warp specialization).

The contract of `mobajax.pallas.paged_prefill` (same arguments, same semantics; out only, no
lse), for bf16/f16 with head dim a multiple of 64 and whole pages of at least 8 tokens.

Kernel: the wrapper cuts every sequence's new rows into blocks of 2 * block_q tokens (the same
static schedule as the Triton kernel); one CTA per (query head, block) runs three warpgroups:
- two compute warpgroups, each owning block_q of the block's rows: S = Q K^T on the tensor cores
  (wgmma, accumulator in registers), causal mask by absolute position only on the tiles that
  cross the diagonal, online softmax in base 2, then O += P V (wgmma with P from registers);
- one memory warpgroup streaming K/V tiles of block_kv keys into a ring of `stages` SMEM slots:
  each tile is block_kv / G page copies (TMA boxes [G, H] of one kv head) arriving on the slot's
  barrier; a slot is refilled once both compute warpgroups have released it. Both compute
  warpgroups pass through every tile in order (waiting for tiles they do not need too), which
  keeps each slot's barrier phases in step.
Pages past a sequence's last one (garbage in the page table) are never read: their copies take
page 0 instead and the keys they hold are masked. Whole pages are read, so every slot of the
pages read must hold finite values (a masked key's probability is 0, and 0 x inf is NaN): the
engine's pool does, holding zeros or written K/V.

Shapes: q [T, N, H]; k_pages, v_pages [P, G, K, H]; page_table [B, P_max]; cu_q_lens [B + 1];
kv_lens [B] -> out [T, N, H]. Rows past cu_q_lens[B] are unspecified (the Triton kernel zeroes
them; the engine never reads them).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mobajax.pallas import mosaic_softmax
from mobajax.pallas import online_softmax as osm
from mobajax.pallas.paged_prefill import block_schedule, check_inputs


@dataclasses.dataclass(frozen=True)
class PagedPrefillMosaicConfig:
    """block_q: rows per compute warpgroup (64: one wgmma M tile); block_kv: keys per tile (a
    multiple of the page size and of 64); stages: K/V tiles in flight."""

    block_q: int = 64  # default tiles: best of 4 on the H100 at S = 8K and 32K (docs/benchmarks.md)
    block_kv: int = 128
    stages: int = 2

    def __post_init__(self):
        if self.block_q != 64:
            raise ValueError(f"block_q must be 64 (one wgmma M tile per warpgroup), got {self.block_q}")
        if self.block_kv % 64 or self.block_kv < 64:
            raise ValueError(f"block_kv must be a positive multiple of 64, got {self.block_kv}")
        if self.stages < 2:
            raise ValueError(f"stages must be >= 2, got {self.stages}")


def fits(q: jax.Array, k_pages: jax.Array, config: PagedPrefillMosaicConfig = PagedPrefillMosaicConfig()) -> bool:
    """Whether this kernel takes these shapes and dtypes on this machine (a Hopper GPU, bf16/f16,
    head dim a multiple of 64, pages of a multiple of 8 tokens dividing block_kv)."""
    g, h = k_pages.shape[1], q.shape[-1]
    shapes = q.dtype in (jnp.bfloat16, jnp.float16) and h % 64 == 0 and g % 8 == 0 and config.block_kv % g == 0
    return shapes and mosaic_softmax.on_hopper()


def tile_counts(rows, pos0, kv_len, w: int, block_q: int, block_kv: int):
    """(KV tiles warpgroup w reads, how many of them need no causal mask) for a block of `rows`
    valid rows whose first row sits at absolute position pos0 in a sequence of kv_len keys.

    Warpgroup w owns rows w * block_q ... (w + 1) * block_q - 1 of the block; it reads the tiles
    up to its last valid row's position, and tiles wholly at or below its first row's position
    need no mask. An unused block (rows 0) reads nothing; its pos0 can be anything, negative
    included. Traced int32 scalars in, int32 scalars out."""
    valid = jnp.clip(rows - w * block_q, 0, block_q)
    first = pos0 + w * block_q
    last = jnp.minimum(first + valid, kv_len)  # one past the last valid row's position
    steps = jnp.where(valid > 0, lax.div(last + block_kv - 1, jnp.int32(block_kv)), 0)
    unmasked = jnp.clip(lax.div(jnp.maximum(first + 1, 0), jnp.int32(block_kv)), 0, steps)
    return steps, unmasked


def _store_rows(smem, dst, count: jax.Array, block: int):
    """Copy the first `count` (traced, <= block) rows of smem [block, H] to dst(offset, rows),
    a GMEM view of `rows` rows, as static power-of-two copies (TMA boxes have static shapes)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    offset = 0  # static until the first traced term joins it
    step = block
    while step >= 1:
        @pl.when(count & step != 0)
        def _(offset=offset, step=step):
            plgpu.copy_smem_to_gmem(smem.at[pl.ds(offset, step)], dst(offset, step))

        offset = offset + (count & step)
        step //= 2


@functools.partial(jax.jit, static_argnames=("scale", "config"))
def paged_prefill_mosaic(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    cu_q_lens: jax.Array,
    kv_lens: jax.Array,
    *,
    scale: float | None = None,
    config: PagedPrefillMosaicConfig = PagedPrefillMosaicConfig(),
) -> jax.Array:
    """Causal attention of the ragged new tokens q [T, N, H] to their sequences' cached K/V
    -> out [T, N, H] (see `mobajax.pallas.paged_prefill` for the contract)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    check_inputs(q, k_pages, v_pages, page_table, cu_q_lens, kv_lens)
    t, n, h = q.shape
    _, g, kv_heads, _ = k_pages.shape
    b, p_max = page_table.shape
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"the Mosaic kernel takes bf16 or f16, got {q.dtype}")
    if h % 64:
        raise ValueError(f"head dim must be a multiple of 64 for the Mosaic kernel, got {h}")
    if config.block_kv % g or g % 8:
        raise ValueError(f"page size {g} must be a multiple of 8 dividing block_kv={config.block_kv}")
    scale = h**-0.5 if scale is None else scale
    bq, bkv, stages = config.block_q, config.block_kv, config.stages
    ppb = bkv // g
    gq = n // kv_heads
    num_blocks = -(-t // (2 * bq)) + b
    seq, start, count = block_schedule(cu_q_lens, 2 * bq, num_blocks)
    t_pad = -(-t // 8) * 8
    qp = jnp.pad(q, ((0, t_pad - t), (0, 0), (0, 0)))
    dtype = q.dtype

    def kernel(seq_ref, start_ref, count_ref, cu_ref, kv_lens_ref, table_ref, q_ref, k_ref, v_ref, o_ref, scoped):
        (k_smem, v_smem, o_smem), (k_ready, v_ready, q_ready), (k_free, v_free) = scoped
        head, blk = lax.axis_index("head"), lax.axis_index("block")
        wg = lax.axis_index("wg")
        kv_head = lax.div(head, jnp.int32(gq))
        s = seq_ref[blk]
        row0 = start_ref[blk]
        rows = count_ref[blk]
        kv_len = kv_lens_ref[s]
        # absolute position of the block's first row: its sequence's new tokens end at kv_len
        pos0 = kv_len - (cu_ref[s + 1] - cu_ref[s]) + (row0 - cu_ref[s])

        total_steps = jnp.maximum(*(tile_counts(rows, pos0, kv_len, w, bq, bkv)[0] for w in (0, 1)))

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            # a sequence's rows start anywhere and a TMA into tiled SMEM needs 8-row alignment, so
            # Q lands in untiled SMEM (shared with the output rows) and goes on to registers,
            # from where wgmma takes its A operand
            my_o = o_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(row0 + wg * bq, bq), head], my_o, q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])
            q_rows = plgpu.load(my_o, layout=plgpu.Layout.WGMMA, optimized=False)
            first = pos0 + wg * bq  # position of this warpgroup's first row
            valid = jnp.clip(rows - wg * bq, 0, bq)
            steps, unmasked = tile_counts(rows, pos0, kv_len, wg, bq, bkv)
            def step(j, state, masked: bool):
                slot = lax.rem(j, jnp.int32(stages))

                def seen():  # causal: key position <= row position
                    qi = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 0, layout=plgpu.Layout.WGMMA)
                    ki = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1, layout=plgpu.Layout.WGMMA)
                    return ki + j * bkv <= qi + first

                barriers = (k_ready.at[slot], k_free.at[slot], v_ready.at[slot], v_free.at[slot])
                return mosaic_softmax.attention_step(
                    state, q_rows, k_smem.at[slot], v_smem.at[slot], barriers,
                    log2_scale=scale * osm.LOG2E, seen=seen if masked else None, empty_rows=True,
                )  # fmt: skip

            state = mosaic_softmax.initial_state(bq, h)
            state = lax.fori_loop(0, unmasked, functools.partial(step, masked=False), state)
            acc, m, l = lax.fori_loop(unmasked, steps, functools.partial(step, masked=True), state)

            @pl.loop(steps, total_steps)
            def _pass(j):
                # Tiles only the other warpgroup needs: wait for each before releasing it. An
                # early release could complete a slot's phase with two arrivals of this warpgroup
                # alone; the slot would then be refilled under the other one, whose parity wait
                # on a barrier two phases ahead never returns.
                slot = lax.rem(j, jnp.int32(stages))
                plgpu.barrier_wait(k_ready.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])

            out = acc / lax.broadcast_in_dim(jnp.where(l == 0.0, 1.0, l), acc.shape, [0])
            my_o[...] = out.astype(dtype)
            plgpu.commit_smem()
            out_row = row0 + wg * bq
            _store_rows(my_o, lambda off, n_rows: o_ref.at[pl.ds(out_row + off, n_rows), head], valid, bq)
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            num_seq_pages = lax.div(kv_len + g - 1, jnp.int32(g))

            @pl.loop(0, total_steps)
            def _load(j):
                slot = lax.rem(j, jnp.int32(stages))

                def copies(ref, smem, barrier):
                    for i in range(ppb):
                        idx = j * ppb + i
                        page = jnp.where(idx < num_seq_pages, table_ref[s, jnp.minimum(idx, p_max - 1)], 0)
                        plgpu.copy_gmem_to_smem(ref.at[page, :, kv_head], smem.at[slot, pl.ds(i * g, g)], barrier)

                @pl.when(j >= stages)
                def _():
                    plgpu.barrier_wait(k_free.at[slot])

                copies(k_ref, k_smem, k_ready.at[slot])

                @pl.when(j >= stages)
                def _():
                    plgpu.barrier_wait(v_free.at[slot])

                copies(v_ref, v_smem, v_ready.at[slot])

    def entry(seq_ref, start_ref, count_ref, cu_ref, kv_lens_ref, table_ref, q_ref, k_ref, v_ref, o_ref):
        transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        pl.run_scoped(
            lambda *scoped: kernel(
                seq_ref, start_ref, count_ref, cu_ref, kv_lens_ref, table_ref, q_ref, k_ref, v_ref, o_ref, scoped
            ),
            (
                plgpu.SMEM((stages, bkv, h), dtype, transforms=transforms),
                plgpu.SMEM((stages, bkv, h), dtype, transforms=transforms),
                plgpu.SMEM((2, bq, h), dtype),  # Q in, out rows out: untiled, so any row offset or count works
            ),
            (plgpu.Barrier(num_arrivals=ppb, num_barriers=stages),) * 2  # a slot's page copies landed
            + (plgpu.Barrier(num_barriers=2),),  # each warpgroup's Q rows landed
            (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,  # both compute warpgroups done
            collective_axes="wg",
        )

    out = plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((t_pad, n, h), dtype),
        grid=(n, num_blocks),
        grid_names=("head", "block"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(seq, start, count, cu_q_lens, kv_lens, page_table, qp, k_pages, v_pages)
    return out[:t]
