"""What the Mosaic GPU attention kernels share: the Hopper check, the online-softmax update, one
attention step of a compute warpgroup (wgmma), optionally ping-ponged with a second one, and a
pipelined loop over whole tiles.

Used by the Mosaic attention kernels (`paged_prefill_mosaic` and `moba_finish_mosaic` by step,
`moba_partials_mosaic` by the pipelined loop): a warpgroup holds its query rows in registers or
SMEM and a state (acc [rows, H] float32, running max m and sum l [rows], base 2) in the wgmma
layouts, and folds in one K/V tile from SMEM per step.
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


def softmax_update(sc, m, l, *, log2_scale, seen=None, empty_rows=False):
    """The online-softmax update of raw scores sc = Q K^T [rows, block_kv] (wgmma layout) with
    running max m and sum l [rows] (base 2) -> (p [rows, block_kv] float32, new m, new l, alpha:
    the factor that rescales the old accumulator). seen, empty_rows: as in `attention_step`."""
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
    return p, m_new, l * alpha + p.sum(axis=1), alpha


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
    p, m_new, l, alpha = softmax_update(sc, m, l, log2_scale=log2_scale, seen=seen, empty_rows=empty_rows)
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


def pipelined_attention(q_rows, k_tile, v_tile, barriers, steps: int, *, log2_scale, schedule=None):
    """The state after `steps` whole K/V tiles (no mask) from an empty one, with FA3's
    intra-warpgroup overlap: step j's Q K^T and step j - 1's P V are issued together, and step
    j's softmax runs while that P V is still on the tensor cores.

    q_rows [rows, H] (SMEM); k_tile(j), v_tile(j): step j's tiles [block_kv, H] (SMEM refs);
    barriers(j): its (K ready, K free, V ready, V free), as in `attention_step`. schedule: a
    ping-pong barrier of two compute warpgroups, one starting a pass behind (as in
    `attention_step`): each passes it once its matmuls are issued and once its softmax is done.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    rows, head_dim = q_rows.shape
    block_kv = k_tile(0).shape[0]
    dtype = q_rows.dtype

    def handoff(*values):
        """The other warpgroup's turn on the tensor cores, once values are computed."""
        if schedule is None:
            return values
        if values:
            values = lax.optimization_barrier(values)
        pass_barrier(schedule)
        return values

    acc, m, l = initial_state(rows, head_dim)
    k_ready, k_free, _, _ = barriers(0)
    plgpu.barrier_wait(k_ready)

    def qk(s_ref):
        plgpu.wgmma(s_ref, q_rows, k_tile(0).transpose((1, 0)))
        handoff()
        return s_ref[...]

    sc = pl.run_scoped(qk, plgpu.ACC((rows, block_kv), jnp.float32))
    plgpu.barrier_arrive(k_free)
    p, m, l, _ = softmax_update(sc, m, l, log2_scale=log2_scale)
    acc, m, l, p = handoff(acc, m, l, p.astype(dtype))

    def step(j, carry):
        acc, m, l, p = carry
        k_ready, k_free, _, _ = barriers(j)
        _, _, v_ready, v_free = barriers(j - 1)
        plgpu.barrier_wait(k_ready)
        plgpu.barrier_wait(v_ready)

        def both(s_ref, o_ref):
            o_ref[...] = acc
            plgpu.wgmma(s_ref, q_rows, k_tile(j).transpose((1, 0)))
            plgpu.wgmma(o_ref, p, v_tile(j - 1))
            handoff()
            sc = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # Q K^T done, P V in flight
            plgpu.barrier_arrive(k_free)
            p_new, m_new, l_new, alpha = softmax_update(sc, m, l, log2_scale=log2_scale)
            out = o_ref[...]
            plgpu.barrier_arrive(v_free)
            out = out * lax.broadcast_in_dim(alpha, out.shape, [0])
            return handoff(out, m_new, l_new, p_new.astype(dtype))

        return pl.run_scoped(both, plgpu.ACC((rows, block_kv), jnp.float32), plgpu.ACC((rows, head_dim), jnp.float32))

    acc, m, l, p = lax.fori_loop(1, steps, step, (acc, m, l, p))
    _, _, v_ready, v_free = barriers(steps - 1)
    plgpu.barrier_wait(v_ready)

    def pv(acc_ref):
        plgpu.wgmma(acc_ref, p, v_tile(steps - 1))
        handoff()

    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
    plgpu.barrier_arrive(v_free)
    acc, m, l = handoff(acc, m, l)
    return acc, m, l
