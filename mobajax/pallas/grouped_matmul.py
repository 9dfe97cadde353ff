"""Grouped matmul for MoE experts: rows sorted by group, each group times its own matrix.

Contract (the semantics of `jax.lax.ragged_dot`):
  lhs [M, K], rhs [G, K, N], group_sizes [G] int32 -> out [M, N] in lhs's dtype, where group g
  owns rows [sum(group_sizes[:g]), sum(group_sizes[:g + 1])) and out[rows of g] = lhs[rows] @ rhs[g]
  (float32 accumulation). Rows past sum(group_sizes) are 0 (`grouped_matmul`, the references) or
  left unspecified (`grouped_matmul_mosaic`); sum(group_sizes) must not exceed M.

Kernels:
- `grouped_matmul`: Pallas with the Triton lowering (Ampere and later; CPU tests with
  `interpret=True`). A work list made in the wrapper holds one item per (group, row tile) pair that
  the group touches (at most cdiv(M, block_m) + G of them, the tail past the groups included);
  program (n tile, item) accumulates lhs[tile] @ rhs[group] over K and stores the item's rows only.
- `grouped_matmul_mosaic`: Pallas Mosaic GPU (Hopper: TMA + wgmma, persistent over the SMs, a
  software pipeline over K). Row tiles map to groups as in `grouped_matmul`; partial tiles are
  stored with a ladder of power-of-two TMA row counts. Shaped after JAX's
  `pallas/ops/gpu/ragged_dot_mgpu.py`.
References: `grouped_matmul_reference` (per-group masked einsum, pure jax.numpy) and
`capacity_matmul_reference` (the fixed-capacity dense einsum [G, C, K] x [G, K, N] of
capacity-based MoE, with its overflow count).

Shape letters: M rows, K contraction, N output columns, G groups, W work items, C capacity.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mobajax.pallas import online_softmax as osm


@dataclasses.dataclass(frozen=True)
class GroupedMatmulConfig:
    """Tuning of `grouped_matmul` (Triton). Blocks are powers of two >= 16; block_k and block_n
    shrink to the largest power of two dividing K and N."""

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")


@dataclasses.dataclass(frozen=True)
class GroupedMatmulMosaicConfig:
    """Tuning of `grouped_matmul_mosaic` (Hopper). N must divide by block_n * grid_block_n and K by
    block_k; num_sms: persistent programs (132 on an H100 SXM)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    max_concurrent_steps: int = 4
    grid_block_n: int = 2
    num_sms: int = 132
    skip_empty: bool = True  # items of no group (decode: most of them) skip their loads and wgmma


def mosaic_config_for(k: int, n: int, config: GroupedMatmulMosaicConfig = GroupedMatmulMosaicConfig()):
    """`config`, with grid_block_n lowered to 1 if N needs it, when the Mosaic kernel takes K and
    N (K % block_k == 0, N % block_n == 0); None when it does not (use the Triton kernel)."""
    if k % config.block_k or n % config.block_n:
        return None
    if n % (config.block_n * config.grid_block_n):
        return dataclasses.replace(config, grid_block_n=1)
    return config


def _check(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> None:
    if lhs.ndim != 2 or rhs.ndim != 3:
        raise ValueError(f"lhs must be [M, K] and rhs [G, K, N], got {lhs.shape} and {rhs.shape}")
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"contraction dims differ: lhs K={lhs.shape[1]}, rhs K={rhs.shape[1]}")
    if group_sizes.shape != (rhs.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be int [G={rhs.shape[0]}], got {group_sizes.dtype}{group_sizes.shape}")
    if lhs.dtype != rhs.dtype:
        raise ValueError(f"lhs and rhs must share a dtype, got {lhs.dtype} and {rhs.dtype}")


def _fit(block: int, dim: int, what: str) -> int:
    """The largest power of two <= block dividing dim (>= 16)."""
    fit = osm.fit_block(block, dim)
    if fit < 16:
        raise ValueError(f"{what}={dim} must be a multiple of 16 for the grouped matmul kernel")
    return fit


def work_list(group_sizes: jax.Array, m: int, block_m: int) -> tuple[jax.Array, ...]:
    """(group, row tile, first row, end row) per work item, [W = cdiv(m, block_m) + G] int32 each.

    Item i covers rows [lo, hi) of row tile `tile`, all in group `group` (G = the tail past the
    groups, computed as zeros); items past the last have lo == hi == 0.
    """
    g = group_sizes.shape[0]
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), ends])
    ends = jnp.concatenate([ends, jnp.full(1, m, jnp.int32)])  # segment G: the tail
    first = starts // block_m
    count = jnp.where(ends > starts, (ends - 1) // block_m - first + 1, 0)
    cum = jnp.cumsum(count)
    w = jnp.arange(pl.cdiv(m, block_m) + g, dtype=jnp.int32)
    # unrolled: the default scan is a while loop, a few launches and copies per step on the GPU
    seg = jnp.minimum(jnp.searchsorted(cum, w, side="right", method="scan_unrolled"), g).astype(jnp.int32)
    used = w < cum[-1]
    tile = first[seg] + w - (cum[seg] - count[seg])
    lo = jnp.where(used, jnp.maximum(starts[seg], tile * block_m), 0)
    hi = jnp.where(used, jnp.minimum(ends[seg], tile * block_m + block_m), 0)
    return seg, jnp.where(used, tile, 0), lo, hi


def grouped_matmul_kernel(
    group_ref,  # [W] int32
    tile_ref,  # [W] int32
    lo_ref,  # [W] int32
    hi_ref,  # [W] int32
    lhs_ref,  # [M_pad, K]
    rhs_ref,  # [G, K, block_n], this n tile
    o_ref,  # [M_pad, block_n], this n tile
    *,
    block_m: int,
    block_k: int,
):
    w = pl.program_id(1)
    num_groups, k, block_n = rhs_ref.shape
    group, lo, hi = group_ref[w], lo_ref[w], hi_ref[w]
    row0 = tile_ref[w] * block_m

    rows = row0 + jnp.arange(block_m)
    mine = (rows >= lo) & (rows < hi)

    @pl.when((hi > lo) & (group < num_groups))
    def _():
        def body(kk, acc):
            x = lhs_ref[pl.ds(row0, block_m), pl.ds(kk * block_k, block_k)]
            y = rhs_ref[group, pl.ds(kk * block_k, block_k), :]
            return acc + jnp.dot(x, y, preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, k // block_k, body, jnp.zeros((block_m, block_n), jnp.float32))
        plgpu.store(o_ref.at[pl.ds(row0, block_m)], acc.astype(o_ref.dtype), mask=mine[:, None])

    @pl.when((hi > lo) & (group == num_groups))  # the tail past the groups
    def _():
        zeros = jnp.zeros((block_m, block_n), o_ref.dtype)
        plgpu.store(o_ref.at[pl.ds(row0, block_m)], zeros, mask=mine[:, None])


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    config: GroupedMatmulConfig = GroupedMatmulConfig(),
    interpret: bool = False,
) -> jax.Array:
    """lhs [M, K] sorted by group @ rhs [G, K, N] per group -> [M, N] (Pallas Triton).

    See the module docstring for the contract. K and N must be multiples of 16.
    """
    _check(lhs, rhs, group_sizes)
    m, k = lhs.shape
    num_groups, _, n = rhs.shape
    bm = config.block_m
    bk, bn = _fit(config.block_k, k, "K"), _fit(config.block_n, n, "N")
    m_pad = pl.cdiv(m, bm) * bm
    x = lhs if m_pad == m else jnp.pad(lhs, ((0, m_pad - m), (0, 0)))
    items = work_list(group_sizes, m, bm)
    num_work = items[0].shape[0]

    def full(shape):
        return pl.BlockSpec(shape, lambda j, w: (0,) * len(shape))

    out = pl.pallas_call(
        functools.partial(grouped_matmul_kernel, block_m=bm, block_k=bk),
        grid=(n // bn, num_work),
        in_specs=[
            *[full((num_work,))] * 4,
            full((m_pad, k)),
            pl.BlockSpec((num_groups, k, bn), lambda j, w: (0, 0, j)),
        ],
        out_specs=pl.BlockSpec((m_pad, bn), lambda j, w: (0, j)),
        out_shape=jax.ShapeDtypeStruct((m_pad, n), lhs.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="grouped_matmul",
    )(*items, x, rhs)
    return out[:m]


def _mosaic_group_of_tile(group_sizes_ref, num_groups: int, block_m: int, item):
    """(group, row tile, first row, row count) of work item `item` (unrolled over the groups)."""
    group = tile = group_start = group_end = end = jnp.int32(0)
    for g in range(num_groups):
        start = end
        end = start + group_sizes_ref[g]
        first_tile = lax.div(start, jnp.int32(block_m))
        last_tile = lax.div(end - 1, jnp.int32(block_m))
        mine = (first_tile + g <= item) & (item <= last_tile + g) & (end > start)
        tile = lax.select(mine, item - g, tile)
        group = lax.select(mine, jnp.int32(g), group)
        group_start = lax.select(mine, start, group_start)
        group_end = lax.select(mine, end, group_end)
    first = jnp.maximum(group_start, tile * block_m)
    size = jnp.maximum(jnp.minimum(group_end, tile * block_m + block_m) - first, 0)
    return group, tile, first, size


TMA_ROW_TILE = 8  # rows of the Mosaic kernel's GMEM operands are padded to a multiple of this


@functools.partial(jax.jit, static_argnames=("config",))
def grouped_matmul_mosaic(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    config: GroupedMatmulMosaicConfig = GroupedMatmulMosaicConfig(),
) -> jax.Array:
    """lhs [M, K] sorted by group @ rhs [G, K, N] per group -> [M, N] (Pallas Mosaic GPU, Hopper).

    bf16/f16 only, any M (padded to a multiple of 8 rows for TMA when needed). Rows past
    sum(group_sizes) are left unspecified. See the module docstring.
    """
    from jax.experimental.pallas import mosaic_gpu as mgpu

    _check(lhs, rhs, group_sizes)
    num_rows = lhs.shape[0]
    lhs = jnp.pad(lhs, ((0, -num_rows % TMA_ROW_TILE), (0, 0)))  # TMA needs whole 8-row tiles in GMEM
    m, k = lhs.shape
    num_groups, _, n = rhs.shape
    c = config
    if k % c.block_k or n % (c.block_n * c.grid_block_n):
        raise ValueError(
            f"K={k} must divide by block_k={c.block_k} and N={n} by block_n * grid_block_n={c.block_n * c.grid_block_n}"
        )
    grid_m, grid_n = pl.cdiv(m, c.block_m) + num_groups - 1, n // c.block_n

    def body(group_sizes_ref, lhs_ref, rhs_ref, o_ref):
        # group_sizes_ref [G] int32, lhs_ref [M, K], rhs_ref [G, K, N], o_ref [M, N] (GMEM)
        @mgpu.nd_loop((grid_m * grid_n,), collective_axes="sm")
        def _(loop):
            mi, ni = mgpu.planar_snake(loop.index[0], (grid_m, grid_n), 1, c.grid_block_n)
            group, tile, first, size = _mosaic_group_of_tile(group_sizes_ref, num_groups, c.block_m, mi)

            def item():
                def acc_scope(acc_ref):  # acc_ref [block_m, block_n] float32 (registers)
                    mgpu.emit_pipeline(
                        lambda _, x_smem, y_smem: mgpu.wgmma(acc_ref, x_smem, y_smem),
                        grid=(k // c.block_k,),
                        in_specs=[
                            mgpu.BlockSpec((c.block_m, c.block_k), lambda kk: (tile, kk), delay_release=1),
                            mgpu.BlockSpec((c.block_k, c.block_n), lambda kk: (kk, ni), delay_release=1),
                        ],
                        max_concurrent_steps=c.max_concurrent_steps,
                    )(lhs_ref, rhs_ref.at[group])
                    return acc_ref[...]

                acc = pl.run_scoped(acc_scope, mgpu.ACC((c.block_m, c.block_n)))

                @functools.partial(pl.run_scoped, o_smem=mgpu.SMEM((c.block_m, c.block_n), dtype=o_ref.dtype))
                def _(o_smem):  # o_smem [block_m, block_n]
                    o_smem[...] = acc.astype(o_smem.dtype)
                    mgpu.commit_smem()
                    offset = first - tile * c.block_m
                    rows = min(c.block_m, m)
                    while rows > 0:  # store `size` rows as a sum of static powers of two
                        step = 1 << int(math.log2(rows))
                        rows //= 2

                        @pl.when(size & step != 0)
                        def _(offset=offset, step=step):  # traced right here: bind this iteration's values
                            mgpu.copy_smem_to_gmem(
                                o_smem.at[pl.ds(offset, step)],
                                o_ref.at[pl.ds(tile * c.block_m + offset, step), pl.ds(ni * c.block_n, c.block_n)],
                            )

                        offset += size & step
                    mgpu.wait_smem_to_gmem(0, wait_read_only=True)

            if c.skip_empty:
                pl.when(size > 0)(item)
            else:
                item()

    kernel = mgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((m, n), lhs.dtype),
        grid=(c.num_sms,),
        grid_names=("sm",),
        compiler_params=mgpu.CompilerParams(lowering_semantics=mgpu.LoweringSemantics.Warpgroup),
    )
    return kernel(group_sizes.astype(jnp.int32), lhs, rhs)[:num_rows]


def grouped_matmul_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """The contract in plain jax.numpy: every group's matmul over all rows, masked to its own."""
    _check(lhs, rhs, group_sizes)
    ends = jnp.cumsum(group_sizes)
    row = jnp.arange(lhs.shape[0])
    group = jnp.searchsorted(ends, row, side="right")  # G for rows past the groups
    onehot = (group[:, None] == jnp.arange(rhs.shape[0])[None, :]).astype(jnp.float32)  # [M, G]
    out = jnp.einsum("mk,gkn,mg->mn", lhs.astype(jnp.float32), rhs.astype(jnp.float32), onehot,
                     precision=lax.Precision.HIGHEST)
    return out.astype(lhs.dtype)


def capacity_matmul_reference(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, capacity: int
) -> tuple[jax.Array, jax.Array]:
    """The fixed-capacity formulation: each group's first `capacity` rows in a [G, C, K] buffer,
    one dense einsum with rhs [G, K, N], scattered back -> (out [M, N], overflow rows int32).

    Rows beyond a group's capacity are not computed (0 in out) and counted in `overflow`;
    with capacity >= max(group_sizes) it equals `grouped_matmul_reference`.
    """
    _check(lhs, rhs, group_sizes)
    m = lhs.shape[0]
    num_groups = rhs.shape[0]
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    row = jnp.arange(m)
    group = jnp.searchsorted(ends, row, side="right")
    slot = row - starts[jnp.minimum(group, num_groups - 1)]
    kept = (group < num_groups) & (slot < capacity)
    flat = jnp.where(kept, group * capacity + slot, num_groups * capacity)  # dropped -> spare slot
    buffer = jnp.zeros((num_groups * capacity + 1, lhs.shape[1]), lhs.dtype).at[flat].set(lhs)
    buffer = buffer[:-1].reshape(num_groups, capacity, -1)
    out = jnp.einsum("gck,gkn->gcn", buffer, rhs, preferred_element_type=jnp.float32)
    out = out.reshape(num_groups * capacity, -1)[jnp.minimum(flat, num_groups * capacity - 1)]
    out = jnp.where(kept[:, None], out, 0).astype(lhs.dtype)
    overflow = jnp.sum((group < num_groups) & ~kept).astype(jnp.int32)
    return out, overflow
