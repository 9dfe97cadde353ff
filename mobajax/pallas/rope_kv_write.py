"""The prologue of paged attention in one kernel: q/k RMSNorm (optional), RoPE of q and k, and the
write of k and v into the page pool, in place (Pallas Triton).

XLA runs these steps as about six kernels per layer (the two per-head norm reductions, a rope
fusion each for q and k, a slice of v, `kv_write`): 7.4 us per layer at one decode token of the
Qwen3-30B-A3B-shaped model on an H100 (docs/benchmarks.md), for a few KB of data. The kernel
reads the token's q, k and v heads from one [T, N + 2K, H] array: the concatenated projections,
which XLA computes as one merged GEMM whose output is that array (three separate operands would
each be a slice kernel). Programs per token: N / HEADS_PER_PROGRAM for the query heads, one for
k and v, so a single token still runs on several SMs. Heads are loaded as two halves of the head
dim, normalised and rotated in float32.

Semantics are the model's: `mobajax.models.layers.RMSNorm` (x / rms(x) over the head dim in
float32, cast to x's dtype, times the scale), then `mobajax.models.rope.apply_rope` (rotate-half
in float32, cast back); the pool write is `kv_write`'s (a negative slot is padding, not written).
The pools are aliased to the outputs, so under donation only the new rows are written.

Shapes: qkv [T' >= T, N + 2K, H] (q heads, then k, then v), positions [T] int32, slots [T] int32,
k_pages, v_pages [P, G, K, H], scales [H] -> (q rotated [T, N, H] in qkv's dtype, k_pages,
v_pages). N, K and H powers of two (`fits`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mobajax.pallas import online_softmax as osm

HEADS_PER_PROGRAM = 8  # query heads per program (fewer if N is smaller)


def fits(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel takes these head counts and head dim (powers of two, H >= 32)."""
    return all(osm.is_power_of_two(x) for x in (num_heads, num_kv_heads, head_dim)) and head_dim >= 32


def _kernel(pos_ref, slots_ref, inv_freq_ref, qkv_ref, *refs, num_heads, num_kv_heads, per_program, eps,
            attention_factor, qk_norm):
    if qk_norm:
        q_scale_ref, k_scale_ref, *refs = refs
    k_pool_in, v_pool_in, q_out_ref, k_pool_ref, v_pool_ref = refs
    del k_pool_in, v_pool_in
    t, j = pl.program_id(0), pl.program_id(1)
    half = qkv_ref.shape[-1] // 2
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    angles = pos_ref[t].astype(jnp.float32) * inv_freq_ref[...]  # [H/2]
    cos, sin = jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor

    def prepare(first, count, scale_ref):  # heads first..first+count-1 -> normalised, rotated halves
        dtype = qkv_ref.dtype
        heads = pl.ds(first, count)
        x1, x2 = qkv_ref[t, heads, lo].astype(jnp.float32), qkv_ref[t, heads, hi].astype(jnp.float32)
        if qk_norm:
            inv = lax.rsqrt((jnp.sum(x1 * x1, axis=1) + jnp.sum(x2 * x2, axis=1)) / (2 * half) + eps)[:, None]
            x1 = (scale_ref[lo][None, :] * (x1 * inv).astype(dtype)).astype(jnp.float32)
            x2 = (scale_ref[hi][None, :] * (x2 * inv).astype(dtype)).astype(jnp.float32)
        return x1 * cos - x2 * sin, x2 * cos + x1 * sin

    q_programs = num_heads // per_program

    @pl.when(j < q_programs)
    def _():
        first = j * per_program
        q1, q2 = prepare(first, per_program, q_scale_ref if qk_norm else None)
        q_out_ref[pl.ds(first, per_program), lo] = q1.astype(q_out_ref.dtype)
        q_out_ref[pl.ds(first, per_program), hi] = q2.astype(q_out_ref.dtype)

    slot = slots_ref[t]

    @pl.when((j == q_programs) & (slot >= 0))
    def _():
        k1, k2 = prepare(num_heads, num_kv_heads, k_scale_ref if qk_norm else None)
        k_pool_ref[slot, :, lo] = k1.astype(k_pool_ref.dtype)
        k_pool_ref[slot, :, hi] = k2.astype(k_pool_ref.dtype)
        v_pool_ref[slot, :, :] = qkv_ref[t, pl.ds(num_heads + num_kv_heads, num_kv_heads), :].astype(v_pool_ref.dtype)


def _check(qkv, num_heads, positions, slots, k_pages, v_pages, q_scale, k_scale):
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages and v_pages must both be [P, G, K, H], got {k_pages.shape}, {v_pages.shape}")
    kv_heads, h = k_pages.shape[2:]
    t = positions.shape[0] if positions.ndim == 1 else -1
    if qkv.ndim != 3 or qkv.shape[1:] != (num_heads + 2 * kv_heads, h) or qkv.shape[0] < t:
        raise ValueError(f"qkv must be [T' >= T = {t}, N + 2K = {num_heads + 2 * kv_heads}, H = {h}] (N={num_heads} "
                         f"query heads, K={kv_heads} kv heads of the pool), got {qkv.shape}")
    if not fits(num_heads, kv_heads, h):
        raise ValueError(f"N={num_heads}, K={kv_heads}, H={h}: must be powers of two with H >= 32 for rope_kv_write")
    for name, x in (("positions", positions), ("slots", slots)):
        if x.shape != (t,) or x.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32 [T={t}], got {x.dtype}{x.shape}")
    if (q_scale is None) != (k_scale is None):
        raise ValueError("give both q_scale and k_scale (q/k RMSNorm), or neither")
    if q_scale is not None and (q_scale.shape != (h,) or k_scale.shape != (h,)):
        raise ValueError(f"q_scale and k_scale must be [H={h}], got {q_scale.shape}, {k_scale.shape}")


@functools.partial(jax.jit, static_argnames=("num_heads", "attention_factor", "eps", "interpret"))
def rope_kv_write(
    qkv: jax.Array,
    positions: jax.Array,
    slots: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    inv_freq: np.ndarray | jax.Array,
    *,
    num_heads: int,
    attention_factor: float = 1.0,
    q_scale: jax.Array | None = None,
    k_scale: jax.Array | None = None,
    eps: float = 1e-6,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The q heads (the first num_heads of qkv) and k heads (the next K) normalised, if q_scale /
    k_scale [H] are given, and rotated at `positions` [T]; k and v (the last K heads) stored at
    `slots` [T] of the pools -> (q [T, N, H], k_pages, v_pages). qkv may have rows past T (a
    one-token GEMM's second row): they are not read. inv_freq [H/2]: the rope's inverse
    frequencies (`mobajax.models.rope.inverse_frequencies`)."""
    _check(qkv, num_heads, positions, slots, k_pages, v_pages, q_scale, k_scale)
    t, h = positions.shape[0], qkv.shape[2]
    num_pages, g, kv_heads, _ = k_pages.shape
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    if inv_freq.shape != (h // 2,):
        raise ValueError(f"inv_freq must be [H/2={h // 2}], got {inv_freq.shape}")
    qk_norm = q_scale is not None
    per_program = min(num_heads, HEADS_PER_PROGRAM)
    k_pool = k_pages.reshape(num_pages * g, kv_heads, h)  # a bitcast: same buffer
    v_pool = v_pages.reshape(num_pages * g, kv_heads, h)
    whole = lambda shape: pl.BlockSpec(shape, lambda i, j: (0,) * len(shape))  # noqa: E731
    scales = [whole((h,)), whole((h,))] if qk_norm else []
    first_pool = 4 + len(scales)
    kernel = functools.partial(_kernel, num_heads=num_heads, num_kv_heads=kv_heads, per_program=per_program,
                               eps=eps, attention_factor=attention_factor, qk_norm=qk_norm)
    q_out, k_pool, v_pool = pl.pallas_call(
        kernel,
        grid=(t, num_heads // per_program + 1),
        in_specs=[whole((t,)), whole((t,)), whole((h // 2,)), whole(qkv.shape), *scales,
                  whole(k_pool.shape), whole(v_pool.shape)],
        out_specs=[pl.BlockSpec((None, num_heads, h), lambda i, j: (i, 0, 0)), whole(k_pool.shape),
                   whole(v_pool.shape)],
        out_shape=[jax.ShapeDtypeStruct((t, num_heads, h), qkv.dtype),
                   jax.ShapeDtypeStruct(k_pool.shape, k_pool.dtype), jax.ShapeDtypeStruct(v_pool.shape, v_pool.dtype)],
        input_output_aliases={first_pool: 1, first_pool + 1: 2},
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="rope_kv_write",
    )(positions, slots, inv_freq, qkv, *([q_scale, k_scale] if qk_norm else []), k_pool, v_pool)
    return q_out, k_pool.reshape(k_pages.shape), v_pool.reshape(v_pages.shape)
