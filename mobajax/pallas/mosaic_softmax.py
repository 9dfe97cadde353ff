"""What the Mosaic GPU attention kernels share: the Hopper check and one online-softmax attention
step of a compute warpgroup (wgmma), optionally ping-ponged with a second one.

Used by the Mosaic attention kernels (`paged_prefill_mosaic`, `moba_finish_mosaic`,
`moba_partials_mosaic`): a warpgroup holds its query rows in registers or SMEM and a state
(acc [rows, H] float32, running max m and sum l [rows], base 2) in the wgmma layouts, and folds
in one K/V tile from SMEM per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


def on_hopper() -> bool:
    """Whether the default device is a Hopper GPU (compute capability 9.x)."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


def pass_barrier(barrier):
    """Arrive at and wait on a barrier the compute warpgroups share (a ping-pong schedule)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    plgpu.barrier_arrive(barrier)
    plgpu.barrier_wait(barrier)


def initial_state(rows: int, head_dim: int):
    """An empty state: acc [rows, H] zeros, m [rows] -inf, l [rows] zeros, in the wgmma layouts."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    row = plgpu.Layout.WGMMA.reduce(1)
    return (
        plgpu.layout_cast(jnp.full((rows, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA),
        plgpu.layout_cast(jnp.full((rows,), -jnp.inf, jnp.float32), row),
        plgpu.layout_cast(jnp.full((rows,), 0.0, jnp.float32), row),
    )


def attention_step(state, q_rows, k_tile, v_tile, barriers, *, log2_scale, seen=None, empty_rows=False, schedule=None):
    """Fold K/V tiles k_tile, v_tile [block_kv, H] (SMEM refs) into state.

    S = Q K^T (wgmma), scaled by log2_scale (scale * log2(e)); keys where seen() (a function
    returning a [rows, block_kv] bool mask, called once the scores are in) is False masked;
    online softmax in base 2; O += P V (wgmma with P from registers).
    barriers: the tile's (K ready, K free, V ready, V free); each tile is waited for before its
    matmul and released after it. empty_rows: rows may have seen no key yet (a masked step can
    leave their max at -inf), so the max is taken as 0 there. schedule: a barrier of two compute
    warpgroups (two arrivals) that ping-pong, one starting a pass behind: each passes it once its
    Q K^T is issued and once its softmax is done, so one's softmax overlaps the other's matmuls.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    acc, m, l = state
    k_ready, k_free, v_ready, v_free = barriers
    rows, block_kv = q_rows.shape[0], k_tile.shape[0]
    plgpu.barrier_wait(k_ready)

    def qk(acc_ref):
        plgpu.wgmma(acc_ref, q_rows, k_tile.transpose((1, 0)))
        if schedule is not None:
            pass_barrier(schedule)
        return acc_ref[...]

    sc = pl.run_scoped(qk, plgpu.ACC((rows, block_kv), jnp.float32))
    plgpu.barrier_arrive(k_free)
    if log2_scale > 0:  # the raw scores' max, scaled once: each exponent below is one FMA
        if seen is not None:
            sc = jnp.where(seen(), sc, -jnp.inf)
        m_new = jnp.maximum(m, sc.max(axis=1) * log2_scale)
    else:  # a scale <= 0 reverses (or flattens) the order: scale first, then mask
        sc = sc * log2_scale
        if seen is not None:
            sc = jnp.where(seen(), sc, -jnp.inf)
        m_new = jnp.maximum(m, sc.max(axis=1))
        log2_scale = 1.0
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) if empty_rows else m_new
    alpha = jnp.exp2(m - m_safe)
    p = jnp.exp2(sc * log2_scale - lax.broadcast_in_dim(m_safe, sc.shape, [0]))
    l = l * alpha + p.sum(axis=1)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    p = p.astype(v_tile.dtype)
    if schedule is not None:  # the softmax is done before the barrier lets the other warpgroup on
        acc, l, m_new, p = lax.optimization_barrier((acc, l, m_new, p))
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(v_ready)
        plgpu.barrier_wait(schedule)  # the tensor cores are free
    else:
        plgpu.barrier_wait(v_ready)

    def pv(acc_ref):
        plgpu.wgmma(acc_ref, p, v_tile)

    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
    plgpu.barrier_arrive(v_free)
    return acc, m_new, l
