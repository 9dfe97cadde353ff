"""Paged decode attention: one new query token per sequence over a paged KV pool (Pallas Triton).

Page pool layout (shared by every kernel of `mobajax.pallas` and by the serving engine):
  k_pages, v_pages [P, G, K, H]: page p, slot g in the page, kv head k, head dim h.
  The token at absolute position s of sequence b is at page page_table[b, s // G], slot s % G.
A token's K * H values are contiguous (the write path stores one row per token, see
`kv_write`); one kv head's [G, H] tile of a page is G rows of H contiguous elements (256 bytes at
H = 128 in bf16), so every tile load is fully coalesced.

Shapes: q [B, N, H], page_table [B, P_max] int32, lengths [B] int32 (tokens in the cache,
the new one included; 0 = inactive row) -> out [B, N, H] (and lse [B, N] float32, NATURAL log).
Page-table entries at or past cdiv(lengths[b], G) are never read, so they may hold anything.

Kernel: one program per (sequence, kv head, split). The N // K query heads of a kv head are
folded into the rows of one tile (GQA), so each K/V tile is read once for all of them. Split-K
cuts a sequence's pages into `num_splits` ranges whose partial (out, lse) are merged exactly
by `merge_states_kernel` (long contexts at small batch).
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
from mobajax.pallas.attention_chunk import HEAD_DIMS
from mobajax.pallas.merge_kernel import merge_states_kernel

PAGE_SIZES = (8, 16, 32, 64, 128)
# Programs to aim for when choosing num_splits automatically (about 8 per SM of an H100; the
# sweep in docs/benchmarks.md put the best split counts between 4 and 10 programs per SM).
TARGET_PROGRAMS = 1024


@dataclasses.dataclass(frozen=True)
class PagedDecodeConfig:
    """Tuning of `paged_decode`.

    block_kv: keys per tile (rounded to whole pages, at least one page).
    num_splits: split-K ranges per sequence; None picks one from B, K and P_max.
    """

    block_kv: int = 64
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self):
        if not (osm.is_power_of_two(self.block_kv) and self.block_kv >= 16):
            raise ValueError(f"block_kv must be a power of two >= 16, got {self.block_kv}")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"num_splits must be >= 1 or None, got {self.num_splits}")


def paged_decode_kernel(
    lengths_ref,  # [B] int32
    page_table_ref,  # [P_max] int32, this sequence's row
    q_ref,  # [N, H], this sequence's query heads
    k_pages_ref,  # [P, G, H], this kv head
    v_pages_ref,  # [P, G, H], this kv head
    o_ref,  # [N, H]
    lse_ref,  # [N] float32
    *,
    scale: float,
    pages_per_block: int,
    num_splits: int,
    group: int,
    rows: int,
):
    """One (sequence, kv head, split): the kv head's `group` query heads, read and written as
    `rows` (a power of two >= 16, what the dot needs) with the rows past the group masked, so
    q and out need no padded copies outside the kernel."""
    b, kv_head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    head_dim = q_ref.shape[1]
    page_size = k_pages_ref.shape[1]
    block_kv = pages_per_block * page_size
    length = lengths_ref[b]
    num_pages = (length + page_size - 1) // page_size
    num_blocks = (num_pages + pages_per_block - 1) // pages_per_block
    per_split = (num_blocks + num_splits - 1) // num_splits
    first = split * per_split
    last = jnp.minimum(first + per_split, num_blocks)
    heads = kv_head * group + jnp.arange(rows)
    in_group = jnp.arange(rows) < group
    tile = (heads[:, None], jnp.arange(head_dim)[None, :])  # [rows, H] indices (masked loads need arrays)
    q = plgpu.load(q_ref.at[tile], mask=in_group[:, None], other=0)

    def body(i, state):
        page_idx = i * pages_per_block + jnp.arange(pages_per_block)
        # Past the last page re-read the last page (an L2 hit) instead of the table's padding.
        pages = page_table_ref[jnp.minimum(page_idx, num_pages - 1)]  # [ppb]
        tok = page_idx[:, None] * page_size + jnp.arange(page_size)[None, :]  # [ppb, G]
        ok = (tok < length).reshape(block_kv)
        k = k_pages_ref[pages].reshape(block_kv, head_dim)
        v = v_pages_ref[pages].reshape(block_kv, head_dim)
        v = jnp.where(ok[:, None], v, 0).astype(v.dtype)  # stale or NaN slots past the length
        s = jnp.where(ok[None, :], osm.qk_logits(q, k, scale), -jnp.inf)
        return osm.update(state, s, v)

    state = lax.fori_loop(first, last, body, osm.init_state(rows, head_dim))
    out, lse = osm.finalize(state)
    plgpu.store(o_ref.at[tile], out.astype(o_ref.dtype), mask=in_group[:, None])
    plgpu.store(lse_ref.at[heads], lse, mask=in_group)


def check_pool(q, k_pages, v_pages, q_shape: str) -> None:
    """Shared input checks of the paged kernels: q `q_shape` ([B, N, H] or [T, N, H]) against the
    pool layout [P, G, K, H]; ValueError naming the bad value and what is allowed."""
    if q.ndim != 3:
        raise ValueError(f"q must be {q_shape}, got shape {q.shape}")
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(
            f"k_pages and v_pages must both be [P, G, K, H], got {k_pages.shape} and {v_pages.shape}"
        )
    _, n, h = q.shape
    _, g, kv_heads, hk = k_pages.shape
    if hk != h or h not in HEAD_DIMS:
        raise ValueError(f"head dim of q ({h}) and pages ({hk}) must match and be in {HEAD_DIMS}")
    if g not in PAGE_SIZES:
        raise ValueError(f"page size G={g} is not supported; allowed: {PAGE_SIZES}")
    if n % kv_heads:
        raise ValueError(f"query heads N={n} must be a multiple of kv heads K={kv_heads}")


def _check(q, k_pages, v_pages, page_table, lengths):
    check_pool(q, k_pages, v_pages, "[B, N, H]")
    b = q.shape[0]
    if page_table.ndim != 2 or page_table.shape[0] != b or page_table.dtype != jnp.int32:
        raise ValueError(
            f"page_table must be int32 [B={b}, P_max], got {page_table.dtype}{page_table.shape}"
        )
    if lengths.shape != (b,) or lengths.dtype != jnp.int32:
        raise ValueError(f"lengths must be int32 [B={b}], got {lengths.dtype}{lengths.shape}")


def kv_tile(block_kv: int, head_dim: int, dtype) -> int:
    """Keys per tile, capped for 4-byte dtypes so that the pipelined K/V tiles fit in shared
    memory (float32 at H = 128 and 128 keys over 3 stages asked for 270 KB on an H100)."""
    if jnp.dtype(dtype).itemsize >= 4:
        return min(block_kv, max(16, 8192 // head_dim))
    return block_kv


def auto_num_splits(batch: int, kv_heads: int, max_blocks: int) -> int:
    """Split-K ranges so that B * K * splits reaches about TARGET_PROGRAMS (at most one block
    of pages per split)."""
    programs = batch * kv_heads
    return max(1, min(max_blocks, -(-TARGET_PROGRAMS // programs)))


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret", "return_lse"))
def paged_decode(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    *,
    scale: float | None = None,
    config: PagedDecodeConfig = PagedDecodeConfig(),
    interpret: bool = False,
    return_lse: bool = False,
):
    """Decode attention of q [B, N, H] to the first lengths[b] tokens of each sequence's pages.

    k_pages/v_pages [P, G, K, H], page_table [B, P_max] int32, lengths [B] int32.
    Returns out [B, N, H] in q's dtype, or (out, lse [B, N] float32, natural log) with
    `return_lse`. A row with length 0 gives out 0, lse -inf. `scale` defaults to H ** -0.5.
    """
    _check(q, k_pages, v_pages, page_table, lengths)
    b, n, h = q.shape
    _, g, kv_heads, _ = k_pages.shape
    scale = h**-0.5 if scale is None else scale
    gq = n // kv_heads
    rows = max(16, osm.next_power_of_two(gq))
    ppb = max(1, kv_tile(config.block_kv, h, q.dtype) // g)
    max_blocks = -(-page_table.shape[1] // ppb)
    splits = config.num_splits or auto_num_splits(b, kv_heads, max_blocks)
    part_dtype = q.dtype if splits == 1 else jnp.float32

    kernel = functools.partial(
        paged_decode_kernel, scale=scale, pages_per_block=ppb, num_splits=splits, group=gq, rows=rows
    )
    pool_spec = pl.BlockSpec((k_pages.shape[0], g, None, h), lambda bi, ki, si: (0, 0, ki, 0))
    out, lse = pl.pallas_call(
        kernel,
        grid=(b, kv_heads, splits),
        in_specs=[
            pl.BlockSpec((b,), lambda bi, ki, si: (0,)),
            pl.BlockSpec((None, page_table.shape[1]), lambda bi, ki, si: (bi, 0)),
            pl.BlockSpec((None, n, h), lambda bi, ki, si: (bi, 0, 0)),
            pool_spec,
            pool_spec,
        ],
        out_specs=[  # every kv head's program writes its own rows of the sequence's block
            pl.BlockSpec((None, None, n, h), lambda bi, ki, si: (si, bi, 0, 0)),
            pl.BlockSpec((None, None, n), lambda bi, ki, si: (si, bi, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((splits, b, n, h), part_dtype),
            jax.ShapeDtypeStruct((splits, b, n), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="paged_decode",
    )(lengths, page_table, q, k_pages, v_pages)
    if splits == 1:
        out, lse = out[0].astype(q.dtype), lse[0]
    else:
        out, lse = merge_states_kernel(out.reshape(splits, b * n, h), lse.reshape(splits, b * n),
                                       out_dtype=q.dtype, interpret=interpret)
        out, lse = out.reshape(b, n, h), lse.reshape(b, n)
    return (out, lse) if return_lse else out


def gather_pages(pages: jax.Array, page_table: jax.Array, lengths: jax.Array) -> jax.Array:
    """Reference gather: pages [P, G, K, H] -> contiguous [B, P_max * G, K, H]; slots at or past
    lengths[b] are zero (whatever the pool or the page table holds there)."""
    _, g, kv_heads, h = pages.shape
    b, p_max = page_table.shape
    slot = jnp.arange(p_max * g)
    ok = slot[None, :] < lengths[:, None]  # [B, S]
    page_ok = jnp.arange(p_max)[None, :] * g < lengths[:, None]
    ids = jnp.where(page_ok, page_table, 0)
    dense = pages[ids].reshape(b, p_max * g, kv_heads, h)
    return jnp.where(ok[:, :, None, None], dense, 0).astype(pages.dtype)


def paged_decode_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    *,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Pure-jnp `paged_decode` (gather the pages, masked softmax in float32)."""
    b, n, h = q.shape
    kv_heads = k_pages.shape[2]
    scale = h**-0.5 if scale is None else scale
    k = gather_pages(k_pages, page_table, lengths).astype(jnp.float32)
    v = gather_pages(v_pages, page_table, lengths).astype(jnp.float32)
    qg = q.astype(jnp.float32).reshape(b, kv_heads, n // kv_heads, h)
    exact = jax.lax.Precision.HIGHEST  # no TF32 on GPU: the reference must be float32-exact
    logits = jnp.einsum("bkgh,bskh->bkgs", qg, k, precision=exact) * scale
    ok = jnp.arange(k.shape[1])[None, None, None, :] < lengths[:, None, None, None]
    logits = jnp.where(ok, logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.where(ok, jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    out = jnp.einsum("bkgs,bskh->bkgh", probs, v, precision=exact).reshape(b, n, h).astype(q.dtype)
    return (out, lse.reshape(b, n)) if return_lse else out
