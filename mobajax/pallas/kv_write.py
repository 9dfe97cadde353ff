"""Write new K/V into the page pool (the page-table scatter), in place (Pallas Triton).

Pool layout [P, G, K, H] (see `mobajax.pallas.paged_decode`). A token goes to slot
`slots[t] = page * G + offset` (the engine computes it from the page table: for the token at
absolute position s of sequence b, page_table[b, s // G] * G + s % G); a negative slot is padding
and is not written. Shapes: k_pages/v_pages [P, G, K, H], k/v [T, K, H], slots [T] int32.

In place: the pools are aliased to the outputs (`input_output_aliases`), so inside a jitted step
that donates the pools (`jax.jit(step, donate_argnums=...)`) nothing is copied: only the T new
rows are written. Without donation XLA must copy the pools first to keep the caller's arrays.
`kv_write_reference` (an XLA scatter with mode="drop") has the same in-place behaviour under
donation and accepts any K * H.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mobajax.pallas import online_softmax as osm


@dataclasses.dataclass(frozen=True)
class KVWriteConfig:
    """Tuning of `kv_write`: tokens written per program (a power of two)."""

    block_t: int = 8
    num_warps: int = 4

    def __post_init__(self):
        if not osm.is_power_of_two(self.block_t):
            raise ValueError(f"block_t must be a power of two, got {self.block_t}")


def kv_write_kernel(
    slots_ref,  # [T_pad] int32
    k_ref,  # [BT, K * H]
    v_ref,  # [BT, K * H]
    k_pool_in_ref,  # [P * G, K * H], aliased to k_pool_ref
    v_pool_in_ref,  # [P * G, K * H], aliased to v_pool_ref
    k_pool_ref,  # [P * G, K * H]
    v_pool_ref,  # [P * G, K * H]
):
    del k_pool_in_ref, v_pool_in_ref
    block_t, row = k_ref.shape
    first = pl.program_id(0) * block_t
    for i in range(block_t):  # one contiguous K * H row per token
        slot = slots_ref[first + i]
        mask = jnp.broadcast_to(slot >= 0, (row,))
        dst = jnp.maximum(slot, 0)
        plgpu.store(k_pool_ref.at[dst], k_ref[i].astype(k_pool_ref.dtype), mask=mask)
        plgpu.store(v_pool_ref.at[dst], v_ref[i].astype(v_pool_ref.dtype), mask=mask)


def _check(k_pages, v_pages, k, v, slots):
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(
            f"k_pages and v_pages must both be [P, G, K, H], got {k_pages.shape} and {v_pages.shape}"
        )
    if k.ndim != 3 or k.shape != v.shape or k.shape[1:] != k_pages.shape[2:]:
        raise ValueError(
            f"k and v must both be [T, K, H] with (K, H)={k_pages.shape[2:]}, got {k.shape}, {v.shape}"
        )
    if slots.shape != k.shape[:1] or slots.dtype != jnp.int32:
        raise ValueError(f"slots must be int32 [T={k.shape[0]}], got {slots.dtype}{slots.shape}")


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def kv_write(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slots: jax.Array,
    *,
    config: KVWriteConfig = KVWriteConfig(),
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Store k/v [T, K, H] at `slots` [T] of the pools [P, G, K, H]; returns the new pools.

    Several tokens writing one slot is undefined (the engine never does it). K * H must be a power
    of two (use `kv_write_reference` otherwise).
    """
    _check(k_pages, v_pages, k, v, slots)
    num_pages, g, kv_heads, h = k_pages.shape
    row = kv_heads * h
    if not osm.is_power_of_two(row):
        raise ValueError(f"K * H = {row} must be a power of two for kv_write; use kv_write_reference")
    t = k.shape[0]
    block_t = min(config.block_t, osm.next_power_of_two(max(t, 1)))
    t_pad = -(-t // block_t) * block_t
    slots = jnp.pad(slots, (0, t_pad - t), constant_values=-1)
    k2 = jnp.pad(k.reshape(t, row), ((0, t_pad - t), (0, 0)))
    v2 = jnp.pad(v.reshape(t, row), ((0, t_pad - t), (0, 0)))
    k_pool = k_pages.reshape(num_pages * g, row)  # a bitcast: same buffer
    v_pool = v_pages.reshape(num_pages * g, row)
    pool = pl.BlockSpec(k_pool.shape, lambda i: (0, 0))
    tokens = pl.BlockSpec((block_t, row), lambda i: (i, 0))
    k_pool, v_pool = pl.pallas_call(
        kv_write_kernel,
        grid=(t_pad // block_t,),
        in_specs=[pl.BlockSpec((t_pad,), lambda i: (0,)), tokens, tokens, pool, pool],
        out_specs=[pool, pool],
        out_shape=[
            jax.ShapeDtypeStruct(k_pool.shape, k_pool.dtype),
            jax.ShapeDtypeStruct(v_pool.shape, v_pool.dtype),
        ],
        input_output_aliases={3: 0, 4: 1},
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1),
        interpret=interpret,
        name="kv_write",
    )(slots, k2, v2, k_pool, v_pool)
    return k_pool.reshape(k_pages.shape), v_pool.reshape(v_pages.shape)


def kv_write_reference(
    k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array, slots: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """XLA scatter version of `kv_write` (any K, H; in place when the pools are donated)."""
    num_pages, g, kv_heads, h = k_pages.shape
    dropped = jnp.where(slots < 0, num_pages * g, slots)  # out of range -> dropped
    k_pool = k_pages.reshape(num_pages * g, kv_heads, h).at[dropped].set(
        k.astype(k_pages.dtype), mode="drop"
    )
    v_pool = v_pages.reshape(num_pages * g, kv_heads, h).at[dropped].set(
        v.astype(v_pages.dtype), mode="drop"
    )
    return k_pool.reshape(k_pages.shape), v_pool.reshape(v_pages.shape)
