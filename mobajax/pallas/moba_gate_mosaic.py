"""MoBA gate selection on Hopper: a persistent Pallas Mosaic GPU kernel (wgmma scores, picks in
registers).

The same selection as `moba_gate.moba_gate_kernel` for one sequence of contiguous positions,
bf16/f16 and head dim 128: per (token, head), the `picks` past chunks with the highest gate
scores q . kbar (kbar = hi + lo, the pooled keys to about 2**-16), best first, ties to the lower
chunk id (for finite scores of magnitude 0 or at least 2**-96: `block_pick`), -1 past the
candidates (the chunks before the token's own).

A tile is W * HALF // G tokens x the G query heads of one kv head (row r: token t0 + r // G, as
in `moba_finish_mosaic`), W the compute warpgroups: four up to MAX_PICKS_MANY picks, else two
(`compute_warpgroups`: the picks' lists need the registers). `num_programs` persistent CTAs take
tiles c, c + P, ...; each runs W + 2 warpgroups:
- a row warpgroup gathers the tile's query rows into its Q slot (two slots, in the layout wgmma
  reads its operand in) by per-thread copies (`mosaic_rows`);
- a key warpgroup streams the kv head's pooled keys, BLOCK_C chunks at a time (hi and lo), into
  a ring, up to the block of the tile's last token's own chunk;
- W compute warpgroups of HALF rows: per block, S = Q hi^T + Q lo^T in one float32 wgmma
  accumulator, the chunks at or past each row's own masked (only in the blocks from the
  warpgroup's first row's own chunk on: the blocks before it are candidates for every row), then
  `picks` rounds of (the block's best score, its lowest chunk id among equals: `block_pick`),
  each inserted into a best-first list of `picks` (score, id) row vectors that it ranks above
  (a later block's chunk never wins a tie, its id is higher); the list's ids go out through SMEM
  by TMA, as the work list's keys (`moba_attention.work_keys`). A block's wgmma is
  issued before the previous block's picks, which run while it is on the tensor cores (FA3's
  intra-warpgroup overlap). The last block is picked from only its first WIDTHS places, the
  least that hold every candidate of the warpgroup's rows.

Shapes: q [T', N, H] (T' >= T, T' >= `tile_tokens`); hi, lo [K, Cp, H] (Cp a multiple of
BLOCK_C); base [1] int32 (position of token 0) -> the work list's keys [R + pad], R =
N * picks * `key_tokens(T, G)` (`picks_of_keys` reads the picks [T, N, picks] back).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mobajax.pallas import moba_finish_mosaic as finish_mosaic
from mobajax.pallas import mosaic_rows
from mobajax.pallas.moba_finish_mosaic import HALF

BLOCK_C = 64  # chunks scored per step: one wgmma N tile
WIDTHS = (16, 32, 48, 64)  # places of a tile's last block picked from: the least past every candidate
# compute warpgroups per CTA: four while their picks' lists fit in the registers four leave
# (more warps to hide the picks' latencies: docs/benchmarks.md, session 24), else two
MANY_COMPUTE, FEW_COMPUTE, MAX_PICKS_MANY = 4, 2, 4
NO_CHUNK = float(2**24)  # an id past every chunk, exact in float32
# a score gap of at least 2**-121 times this is at least 64, past every place in a block
TIE_SCALE = float(2**127)


def fits(q: jax.Array, num_kv_heads: int) -> bool:
    """Whether this kernel takes these queries: what `moba_finish_mosaic.fits` asks of them (a
    Hopper GPU, bf16/f16, head dim 128, query heads per kv head dividing HALF)."""
    return finish_mosaic.fits(q, num_kv_heads, finish_mosaic.BLOCK_KV)


def pad_chunks(x: jax.Array) -> jax.Array:
    """Pooled keys [K, Cp, H] with Cp padded with zeros to a multiple of BLOCK_C (no token sees
    the padding: it lies past the last chunk)."""
    pad = -x.shape[1] % BLOCK_C
    return jnp.pad(x, ((0, 0), (0, pad), (0, 0))) if pad else x


def block_pick(s, place):
    """The best of raw scores s [rows, BLOCK_C] in each row -> (its score [rows], its place
    [rows]: the lowest among equals, s with that place dropped to -inf). place [rows, BLOCK_C]:
    each column's place in its block, float32.

    The place is the least of place + (best - s) * TIE_SCALE, which is the place itself where s
    equals the best and at least 64 elsewhere: a lower score trails the best by at least 2**-121
    wherever the best is 0 or at least 2**-96 in magnitude (scores of 16-bit inputs are 0 or far
    above that unless their products fall below about 2**-80) and finite. The subtraction and the
    multiply-add run on the FMA pipe, where `where(s == best, place, none)` took two more of the
    ALU instructions that bound the kernel (docs/benchmarks.md, session 20). A row with no
    candidate (best -inf) gets place NaN, which `_insert` never takes."""
    top = s.max(axis=1)
    idx = (place + (lax.broadcast_in_dim(top, s.shape, [0]) - s) * TIE_SCALE).min(axis=1)
    return top, idx, jnp.where(place == lax.broadcast_in_dim(idx, s.shape, [0]), -jnp.inf, s)


def compute_warpgroups(picks: int) -> int:
    """Compute warpgroups (HALF rows of a tile each) of a kernel with this many picks."""
    return MANY_COMPUTE if picks <= MAX_PICKS_MANY else FEW_COMPUTE


def tile_tokens(group: int, compute: int = MANY_COMPUTE) -> int:
    """Tokens per tile of `compute` warpgroups of HALF rows (`group` query heads per token); by
    default the largest tile, to which `key_tokens` rounds."""
    return compute * HALF // group


def key_tokens(num_tokens: int, group: int) -> int:
    """Tokens of the gate's work-list rows: num_tokens rounded up to whole tiles of the largest
    size (every kernel's tiles cover them; the rows of tokens past the last hold the last chunk,
    as empty slots do)."""
    tokens = tile_tokens(group)
    return -(-num_tokens // tokens) * tokens


def _stages_and_registers(compute: int) -> tuple[int, int]:
    """(K/V ring stages, registers per compute thread) of a kernel with `compute` compute
    warpgroups and two data warpgroups: what the data warpgroups (24 registers each) leave of
    the CTA's pool (65536 / threads per thread, rounded down to a multiple of 8), up to 232;
    three stages where SMEM has room beside the Q slots."""
    threads = (compute + 2) * 128
    pool = 65536 // threads // 8 * 8 * threads
    return (3 if compute == FEW_COMPUTE else 2), min(232, (pool - 2 * 128 * 24) // (compute * 128) // 8 * 8)


def picks_of_keys(keys, num_tokens, num_heads, num_kv_heads, picks, num_chunks):
    """The picks [T, N, picks] int32 (-1: empty) in work-list keys [R + pad] (`work_keys`'
    layout over `key_tokens` tokens; the last chunk marks an empty slot)."""
    group = num_heads // num_kv_heads
    padded = key_tokens(num_tokens, group)
    ids = keys[: num_heads * picks * padded].astype(jnp.int32).reshape(num_kv_heads, picks, padded, group)
    ids = ids.transpose(2, 0, 3, 1).reshape(padded, num_heads, picks)[:num_tokens]
    return jnp.where(ids == num_chunks - 1, -1, ids)


def _insert(held, top, idx):
    """held (scores, ids): tuples of row vectors, best first; (top, idx) placed where it ranks
    above (strictly higher score), the worst pair dropped."""
    scores, ids = held
    beats = [top > s for s in scores]
    new_scores, new_ids = [], []
    for j, (s, i) in enumerate(zip(scores, ids)):
        s_here, i_here = jnp.where(beats[j], top, s), jnp.where(beats[j], idx, i)
        if j:  # shifted down from above where the new pair ranks above that one too
            s_here = jnp.where(beats[j - 1], scores[j - 1], s_here)
            i_here = jnp.where(beats[j - 1], ids[j - 1], i_here)
        new_scores.append(s_here)
        new_ids.append(i_here)
    return tuple(new_scores), tuple(new_ids)


@functools.partial(
    jax.jit, static_argnames=("num_tokens", "block_size", "picks", "num_chunks", "pad", "key_dtype", "num_programs")
)
def select_chunks_mosaic(q, hi, lo, base, *, num_tokens, block_size, picks, num_chunks, pad, key_dtype,
                         num_programs=132):  # fmt: skip
    """The picks of T = num_tokens tokens at positions base[0] + t, as the work list's keys:
    keys [R + P] key_dtype in `moba_attention.work_keys`' layout over `key_tokens(T, G)` tokens
    (R = N * picks * that), P = pad rounded up to a multiple of HALF; the last of num_chunks
    chunks marks an empty slot, a token past the last and a pad row.

    q [T', N, H] (T' >= T and T' >= `tile_tokens`); hi, lo [K, Cp, H] q's dtype, Cp a multiple of
    BLOCK_C past the last chunk; base [1] int32."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    _, num_heads, h = q.shape
    num_kv_heads = hi.shape[0]
    group = num_heads // num_kv_heads
    compute = compute_warpgroups(picks)
    stages, registers = _stages_and_registers(compute)
    tokens, half_tokens = tile_tokens(group, compute), HALF // group
    padded = key_tokens(num_tokens, group)
    num_tiles = padded // tokens * num_kv_heads
    programs = num_programs
    rows_of = finish_mosaic.tile_rows_of(
        group=group, num_heads=num_heads, padded_tokens=q.shape[0], num_tokens=num_tokens
    )
    gather, _, _ = mosaic_rows.row_copies(row_bytes=h * q.dtype.itemsize, rows_of=rows_of, rows=compute * HALF)
    tile_desc = finish_mosaic.tile_descriptors(num_tiles, num_kv_heads, tokens)
    row = plgpu.Layout.WGMMA.reduce(1)
    num_rows, pad_rows = num_heads * picks * padded, -(-pad // HALF) * HALF
    last = float(num_chunks - 1)

    def kernel(base_ref, desc_ref, q_ref, hi_ref, lo_ref, keys_ref, scoped):
        (hi_smem, lo_smem, q_smem, keys_smem, rows_smem), (c_ready, q_ready), (c_free, q_free) = scoped
        cta, wg = lax.axis_index("cta"), lax.axis_index("wg")
        tiles = jnp.maximum(lax.div(num_tiles - cta + programs - 1, programs), 0)
        pos_base = base_ref[0]

        def tile_of(i):
            """(tile, first token, kv head, chunk blocks) of this CTA's tile i: the blocks up to
            the one holding the last candidate of the tile's last token, at least one (a tile in
            chunk 0 scores block 0 to find no candidate)."""
            w = cta + i * programs
            t0 = lax.div(w, num_kv_heads) * tokens
            own_last = lax.div(pos_base + jnp.minimum(t0 + tokens, num_tokens) - 1, block_size)
            return w, t0, lax.rem(w, num_kv_heads), jnp.maximum(lax.div(own_last + BLOCK_C - 1, BLOCK_C), 1)

        @pl.when(wg < compute)
        def _compute():
            plgpu.set_max_registers(registers, action="increase")
            ri = plgpu.broadcasted_iota(jnp.int32, (HALF,), 0, layout=row)
            # a chunk's place in its block: ids are kept as float32 (exact below 2**24)
            cid = plgpu.broadcasted_iota(jnp.int32, (HALF, BLOCK_C), 1, layout=plgpu.Layout.WGMMA).astype(jnp.float32)

            def write_rows(first_row, ids, j=0):
                """ids [HALF] (float32 chunk ids) as the keys of rows first_row + r, through the
                warpgroup's pick-j staging slot."""
                keys_smem.at[wg, j][...] = ids.astype(jnp.int32).astype(key_dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(keys_smem.at[wg, j], keys_ref.at[pl.ds(first_row, HALF)])

            @pl.when((cta == 0) & (wg == 0))
            def _pad():  # the pad rows, by the first CTA
                lasts = plgpu.layout_cast(jnp.full((HALF,), last, jnp.float32), row)
                for p in range(0, pad_rows, HALF):
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    write_rows(num_rows + p, lasts)

            def tile(i, g0):
                _, t0, head, blocks = tile_of(i)
                qs = lax.rem(i, 2)
                my_q = q_smem.at[qs, wg]
                plgpu.barrier_wait(q_ready.at[qs])
                own = lax.div(pos_base + t0 + wg * half_tokens + lax.div(ri, group), block_size)  # [HALF]

                def fold(held, s, b, masked):
                    """held with block b's raw scores s [HALF, width] (its first places) folded
                    in; masked: the chunks at or past each row's own dropped first (a no-op
                    before them)."""
                    place = cid[:, : s.shape[1]]
                    first = (b * BLOCK_C).astype(jnp.float32)  # the block's first chunk id
                    if masked:
                        left = lax.broadcast_in_dim((own - b * BLOCK_C).astype(jnp.float32), s.shape, [0])
                        s = jnp.where(place < left, s, -jnp.inf)
                    for _ in range(min(picks, s.shape[1])):
                        top, idx, s = block_pick(s, place)
                        held = _insert(held, top, idx + first)
                    return held

                def scores(b, meanwhile=lambda: None):
                    """(block b's raw scores, meanwhile()): meanwhile runs while its wgmma is on
                    the tensor cores."""
                    slot = lax.rem(g0 + b, stages)
                    plgpu.barrier_wait(c_ready.at[slot])

                    def score(acc_ref):
                        plgpu.wgmma(acc_ref, my_q, hi_smem.at[slot].transpose((1, 0)))
                        plgpu.wgmma(acc_ref, my_q, lo_smem.at[slot].transpose((1, 0)))
                        done = meanwhile()
                        return acc_ref[...], done

                    out = pl.run_scoped(score, plgpu.ACC((HALF, BLOCK_C), jnp.float32))
                    plgpu.barrier_arrive(c_free.at[slot])
                    return out

                def step(b, carry, masked):
                    """Block b's scores issued, block b - 1's folded in meanwhile."""
                    held, previous = carry
                    s, held = scores(b, lambda: fold(held, previous, b - 1, masked))
                    return held, s

                empty = plgpu.layout_cast(jnp.full((HALF,), -jnp.inf, jnp.float32), row)
                none = plgpu.layout_cast(jnp.full((HALF,), NO_CHUNK, jnp.float32), row)
                # blocks before this warpgroup's first row's own chunk are candidates for every row
                whole = jnp.minimum(lax.div(lax.div(pos_base + t0 + wg * half_tokens, block_size), BLOCK_C), blocks)
                carry = ((empty,) * picks, (none,) * picks), scores(0)[0]
                carry = lax.fori_loop(1, whole, functools.partial(step, masked=False), carry)
                carry = lax.fori_loop(jnp.maximum(whole, 1), blocks, functools.partial(step, masked=True), carry)
                # the last block picked from its first WIDTHS[w] places, the least past every
                # candidate of this warpgroup's rows (its last row's own chunk comes last)
                held, last_scores = carry
                rest = lax.div(pos_base + t0 + (wg + 1) * half_tokens - 1, block_size) - (blocks - 1) * BLOCK_C
                w = jnp.clip(lax.div(rest + WIDTHS[0] - 1, WIDTHS[0]), 1, len(WIDTHS)) - 1
                folds = [functools.partial(fold, held, last_scores[:, :width], blocks - 1, True) for width in WIDTHS]
                best, ids = lax.switch(w, folds)
                plgpu.barrier_arrive(q_free.at[qs])  # the slot's last wgmma read is done
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's keys are out
                live = t0 + wg * half_tokens + lax.div(ri, group) < num_tokens
                for j in range(picks):
                    first_row = ((head * picks + j) * padded + t0 + wg * half_tokens) * group
                    write_rows(first_row, jnp.where(live & (best[j] > -jnp.inf), ids[j], last), j)
                return g0 + blocks

            lax.fori_loop(0, tiles, tile, jnp.int32(0))
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == compute)
        def _keys():
            plgpu.set_max_registers(24, action="decrease")

            def tile(i, g0):
                _, _, head, blocks = tile_of(i)

                @pl.loop(0, blocks)
                def _block(b):
                    g = g0 + b
                    slot = lax.rem(g, stages)

                    @pl.when(g >= stages)
                    def _():
                        plgpu.barrier_wait(c_free.at[slot])

                    chunks = pl.ds(b * BLOCK_C, BLOCK_C)
                    plgpu.copy_gmem_to_smem(hi_ref.at[head, chunks], hi_smem.at[slot], c_ready.at[slot])
                    plgpu.copy_gmem_to_smem(lo_ref.at[head, chunks], lo_smem.at[slot], c_ready.at[slot])

                return g0 + blocks

            lax.fori_loop(0, tiles, tile, jnp.int32(0))

        @pl.when(wg == compute + 1)
        def _rows():
            plgpu.set_max_registers(24, action="decrease")

            @pl.loop(0, tiles)
            def _tile(i):
                qs = lax.rem(i, 2)

                @pl.when(i >= 2)
                def _():
                    plgpu.barrier_wait(q_free.at[qs])  # tile i - 2 is scored

                gather(desc_ref.at[cta + i * programs], q_ref, q_smem.at[qs], rows_smem.at[qs])
                plgpu.barrier_arrive(q_ready.at[qs])  # every thread: its copies have landed

    def entry(*refs):
        transforms = mosaic_rows.slot_transforms()
        pl.run_scoped(
            lambda *scoped: kernel(*refs, scoped),
            (
                plgpu.SMEM((stages, BLOCK_C, h), q.dtype, transforms=transforms),
                plgpu.SMEM((stages, BLOCK_C, h), q.dtype, transforms=transforms),
                plgpu.SMEM((2, compute, HALF, h), q.dtype, transforms=transforms),  # Q rows
                plgpu.SMEM((compute, picks, HALF), key_dtype),  # a tile's picks as keys, per compute warpgroup
                plgpu.SMEM((2, 2, compute * HALF), jnp.int32),  # the tile's rows in q
            ),
            (
                plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # a block's hi and lo landed
                plgpu.Barrier(num_barriers=2),  # a Q slot's rows landed
            ),
            (
                plgpu.Barrier(num_arrivals=compute, num_barriers=stages),  # a block's slot free
                plgpu.Barrier(num_arrivals=compute, num_barriers=2),  # a Q slot free
            ),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((num_rows + pad_rows,), key_dtype),
        grid=(programs,),
        grid_names=("cta",),
        num_threads=compute + 2,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(base, tile_desc, q, hi, lo)

