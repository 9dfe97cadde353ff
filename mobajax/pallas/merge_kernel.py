"""`merge_states` as one kernel, for split-K decode.

XLA runs the merge of C partial states as three small kernels (the max of the lses, the weights,
the weighted sum); at batch 1 each is a ~1.2 us launch for a few hundred KB. Here one program per
row streams its C parts in chunks of CHUNK, keeping a running maximum, weight sum and weighted
sum (the online merge), and writes out and lse once.

Shapes: outs [C, M, H] (any float dtype), lses [C, M] float32 natural log -> (out [M, H] in
`out_dtype`, lse [M] float32), equal to `mobajax.pallas.attention_chunk.merge_states`: a part
with lse = -inf contributes nothing (its out is ignored, even if NaN); all parts -inf gives out 0,
lse -inf. Pallas with the Triton lowering; `interpret=True` runs it on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mobajax.pallas.online_softmax import next_power_of_two

CHUNK = 32  # parts merged per step: a [CHUNK, H] float32 tile


def _kernel(lse_ref, o_ref, out_ref, lse_out_ref, *, parts: int, chunk: int):
    head_dim = o_ref.shape[1]
    offsets = jnp.arange(chunk)
    col = jnp.arange(head_dim)

    def body(i, state):
        m, denom, acc = state
        part = i * chunk + offsets
        live = part < parts
        part = jnp.minimum(part, parts - 1)
        lse = plgpu.load(lse_ref.at[part], mask=live, other=-jnp.inf)  # [chunk]
        o = plgpu.load(o_ref.at[part[:, None], col[None, :]], mask=live[:, None], other=0).astype(jnp.float32)
        m_new = jnp.maximum(m, jnp.max(lse))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        w = jnp.exp(lse - m_safe)  # 0 for empty parts
        o = jnp.where(w[:, None] > 0, o, 0.0)  # an empty part's out may be NaN
        alpha = jnp.exp(m - m_safe)  # 0 while m is -inf
        return m_new, denom * alpha + jnp.sum(w), acc * alpha + jnp.sum(w[:, None] * o, axis=0)

    init = (jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.zeros((head_dim,), jnp.float32))
    m, denom, acc = lax.fori_loop(0, pl.cdiv(parts, chunk), body, init)
    empty = denom == 0
    out_ref[...] = (acc / jnp.where(empty, 1.0, denom)).astype(out_ref.dtype)
    lse_out_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, denom)))


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret"))
def merge_states_kernel(
    outs: jax.Array, lses: jax.Array, *, out_dtype=None, interpret: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Exact merge of partial states outs [C, M, H], lses [C, M] -> (out [M, H], lse [M])."""
    if outs.ndim != 3 or lses.shape != outs.shape[:2]:
        raise ValueError(f"outs must be [C, M, H] and lses [C, M], got {outs.shape} and {lses.shape}")
    parts, m, h = outs.shape
    if h & (h - 1) or h < 16:
        raise ValueError(f"head dim must be a power of two >= 16, got {h}")
    out_dtype = outs.dtype if out_dtype is None else out_dtype
    return pl.pallas_call(
        functools.partial(_kernel, parts=parts, chunk=min(CHUNK, next_power_of_two(parts))),
        grid=(m,),
        in_specs=[pl.BlockSpec((parts, None), lambda r: (0, r)), pl.BlockSpec((parts, None, h), lambda r: (0, r, 0))],
        out_specs=[pl.BlockSpec((None, h), lambda r: (r, 0)), pl.BlockSpec((None,), lambda r: (r,))],
        out_shape=[jax.ShapeDtypeStruct((m, h), out_dtype), jax.ShapeDtypeStruct((m,), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="merge_states",
    )(lses.astype(jnp.float32), outs)
