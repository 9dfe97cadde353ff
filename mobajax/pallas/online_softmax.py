"""Online-softmax state shared by the attention kernels of `mobajax.pallas` (in-kernel helpers).

Inside a kernel a tile of M query rows keeps the flash-attention state (o, m, l):
  o [M, H] float32: sum over seen keys of exp2(s - m) * v (unnormalised),
  m [M] float32: running row maximum of the logits s, in BASE-2 units (s = q.k * scale * log2(e)),
  l [M] float32: running sum of exp2(s - m).
`finalize` turns it into the normalised output and the NATURAL-log log-sum-exp of the logits
(q.k * scale), which is what every public function of `mobajax.pallas` returns.

A row that has seen no visible key has m = -inf and l = 0: it finalises to out 0, lse -inf.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def is_power_of_two(x: int) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


def next_power_of_two(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def fit_block(block: int, dim: int) -> int:
    """The largest power of two <= block (a power of two) dividing dim: a tile size shrunk to fit."""
    return min(block, dim & -dim)


def init_state(rows: int, head_dim: int):
    """Empty state for `rows` query rows: (o [M, H], m [M], l [M]), all float32."""
    o = jnp.zeros((rows, head_dim), jnp.float32)
    m = jnp.full((rows,), -jnp.inf, jnp.float32)
    l = jnp.zeros((rows,), jnp.float32)
    return o, m, l


def update(state, s: jax.Array, v: jax.Array):
    """Fold one key tile into the state.

    s [M, Kt] float32: logits in base-2 units, -inf where a key is not visible.
    v [Kt, H]: the tile's values (rows of invisible keys must be finite, e.g. zero).
    """
    o, m, l = state
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that saw nothing yet
    alpha = jnp.exp2(m - m_safe)
    p = jnp.exp2(s - m_safe[:, None])
    l = alpha * l + jnp.sum(p, axis=1)
    allow_tf32 = False if v.dtype == jnp.float32 else None
    o = alpha[:, None] * o + plgpu.dot(p.astype(v.dtype), v, allow_tf32=allow_tf32)
    return o, m_new, l


def merge(state, out: jax.Array, lse: jax.Array):
    """Fold a normalised partial state over other keys into the state: out [M, H] float32
    (finite), lse [M] float32 natural log, -inf where that part saw nothing."""
    o, m, l = state
    lse2 = lse * LOG2E
    m_new = jnp.maximum(m, lse2)
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha, w = jnp.exp2(m - m_safe), jnp.exp2(lse2 - m_safe)
    return alpha[:, None] * o + w[:, None] * out, m_new, alpha * l + w


def finalize(state):
    """(out [M, H] float32 normalised, lse [M] float32 natural log; -inf where nothing seen)."""
    o, m, l = state
    empty = l == 0.0
    out = o / jnp.where(empty, 1.0, l)[:, None]
    lse = jnp.where(empty, -jnp.inf, (m + jnp.log2(jnp.where(empty, 1.0, l))) * LN2)
    return out, lse


def qk_logits(q: jax.Array, k: jax.Array, scale: float) -> jax.Array:
    """q [M, H] . k [Kt, H]^T -> [M, Kt] float32 logits in base-2 units."""
    allow_tf32 = False if q.dtype == jnp.float32 else None
    s = plgpu.dot(q, k, trans_b=True, allow_tf32=allow_tf32)
    return s * (scale * LOG2E)
