"""RMSNorm of a few rows in one kernel (Pallas Triton).

XLA runs an RMSNorm as two kernels, the row reduction and the scaling; at one decode token each
is a ~1.2-1.5 us launch for a few KB (docs/benchmarks.md). Here one program per block of ROWS
rows loads them whole, reduces and scales in registers.

Semantics are `mobajax.models.layers.RMSNorm`'s: x / rms(x) over the last axis in float32, cast
to x's dtype, times the scale (in x's dtype). Shapes: x [M, D], scale [D] -> [M, D] in x's
dtype; D a power of two (`fits`). `interpret=True` runs it on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mobajax.pallas import online_softmax as osm

ROWS = 4  # rows per program (fewer when there are fewer rows)
MAX_DIM = 16384  # a [ROWS, D] float32 tile in registers


def fits(dim: int) -> bool:
    """Whether the kernel takes rows of `dim` elements (a power of two, at most MAX_DIM)."""
    return osm.is_power_of_two(dim) and 16 <= dim <= MAX_DIM


def _kernel(x_ref, scale_ref, out_ref, *, rows: int, eps: float):
    m, d = x_ref.shape
    row = pl.program_id(0) * rows + jnp.arange(rows)
    live = (row < m)[:, None]
    tile = (jnp.minimum(row, m - 1)[:, None], jnp.arange(d)[None, :])
    x = plgpu.load(x_ref.at[tile], mask=live, other=0).astype(jnp.float32)
    normed = (x * lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) / d + eps)).astype(out_ref.dtype)
    store = (row[:, None], jnp.arange(d)[None, :])  # masked, not clamped
    plgpu.store(out_ref.at[store], scale_ref[...][None, :] * normed, mask=live)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def rms_norm(x: jax.Array, scale: jax.Array, *, eps: float, interpret: bool = False) -> jax.Array:
    """x [M, D] / rms over D (float32, cast to x's dtype) times scale [D] -> [M, D] in x's dtype."""
    if x.ndim != 2 or scale.shape != (x.shape[1],):
        raise ValueError(f"x must be [M, D] and scale [D], got {x.shape} and {scale.shape}")
    m, d = x.shape
    if not fits(d):
        raise ValueError(f"D={d}: rms_norm needs a power of two in 16..{MAX_DIM}")
    rows = min(ROWS, osm.next_power_of_two(max(m, 1)))
    whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731
    return pl.pallas_call(
        functools.partial(_kernel, rows=rows, eps=eps),
        grid=(pl.cdiv(m, rows),),
        in_specs=[whole((m, d)), whole((d,))],
        out_specs=whole((m, d)),
        out_shape=jax.ShapeDtypeStruct((m, d), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="rms_norm",
    )(x, scale.astype(x.dtype))
