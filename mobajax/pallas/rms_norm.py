"""RMSNorm of a few rows in one kernel (Pallas Triton).

XLA runs an RMSNorm as two kernels, the row reduction and the scaling; at one decode token each
is a ~1.2-1.5 us launch for a few KB (docs/benchmarks.md). Here one program per block of ROWS
rows loads them whole, reduces and scales in registers.

`add_rms_norm` first adds an update to the residual stream (vLLM's fused add + RMSNorm): the
update may still be split in float32 partial sums (a split-K projection not yet reduced), which
the kernel adds up itself, so the reduction, the residual add and the norm are one launch.

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
ELEMENTS_PER_WARP = 128  # a program's warps: its tile's elements / this, 1 to 16 (H100 sweep: 16
# warps for one 2048-wide row, add_rms_norm 1.55 us against 2.05 at 4 warps)
MAX_DIM = 16384  # a [ROWS, D] float32 tile in registers


def fits(dim: int) -> bool:
    """Whether the kernel takes rows of `dim` elements (a power of two, at most MAX_DIM)."""
    return osm.is_power_of_two(dim) and 16 <= dim <= MAX_DIM


def _kernel(*refs, rows: int, eps: float, add: bool):
    if add:  # update [M * S, D] (S partial sums per row), residual [M, D] -> also the sum [M, D]
        update_ref, x_ref, scale_ref, sum_ref, out_ref = refs
    else:
        x_ref, scale_ref, out_ref = refs
    m, d = x_ref.shape
    row = pl.program_id(0) * rows + jnp.arange(rows)
    live = (row < m)[:, None]
    clamped, cols = jnp.minimum(row, m - 1)[:, None], jnp.arange(d)[None, :]
    x = plgpu.load(x_ref.at[clamped, cols], mask=live, other=0)
    store = (row[:, None], cols)  # masked, not clamped
    if add:
        splits = update_ref.shape[0] // m
        update = sum(plgpu.load(update_ref.at[clamped * splits + s, cols], mask=live, other=0).astype(jnp.float32)
                     for s in range(splits))  # fmt: skip
        x = (x.astype(jnp.float32) + update.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)
        plgpu.store(sum_ref.at[store], x, mask=live)
    x = x.astype(jnp.float32)
    normed = (x * lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) / d + eps)).astype(out_ref.dtype)
    plgpu.store(out_ref.at[store], scale_ref[...][None, :] * normed, mask=live)


def _call(args, m: int, d: int, dtype, eps: float, add: bool, interpret: bool):
    if not fits(d):
        raise ValueError(f"D={d}: rms_norm needs a power of two in 16..{MAX_DIM}")
    rows = min(ROWS, osm.next_power_of_two(max(m, 1)))
    whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731
    out = jax.ShapeDtypeStruct((m, d), dtype)
    warps = min(16, max(1, rows * d // ELEMENTS_PER_WARP))
    return pl.pallas_call(
        functools.partial(_kernel, rows=rows, eps=eps, add=add),
        grid=(pl.cdiv(m, rows),),
        in_specs=[whole(a.shape) for a in args],
        out_specs=[whole((m, d))] * (2 if add else 1),
        out_shape=[out] * (2 if add else 1),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name="add_rms_norm" if add else "rms_norm",
    )(*args)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def rms_norm(x: jax.Array, scale: jax.Array, *, eps: float, interpret: bool = False) -> jax.Array:
    """x [M, D] / rms over D (float32, cast to x's dtype) times scale [D] -> [M, D] in x's dtype."""
    if x.ndim != 2 or scale.shape != (x.shape[1],):
        raise ValueError(f"x must be [M, D] and scale [D], got {x.shape} and {scale.shape}")
    m, d = x.shape
    return _call((x, scale.astype(x.dtype)), m, d, x.dtype, eps, False, interpret)[0]


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def add_rms_norm(
    update: jax.Array, residual: jax.Array, scale: jax.Array, *, eps: float, interpret: bool = False
) -> tuple[jax.Array, jax.Array]:
    """h = residual [M, D] + update, then (h, rms_norm(h) * scale [D]), both [M, D] in residual's
    dtype. update: [M, D], or [M, S, D] partial sums added up in float32; either way rounded to
    residual's dtype before the add (the rounding of the projection that produced it)."""
    if residual.ndim != 2 or scale.shape != (residual.shape[1],):
        raise ValueError(f"residual must be [M, D] and scale [D], got {residual.shape} and {scale.shape}")
    m, d = residual.shape
    if update.shape != (m, d) and not (update.ndim == 3 and update.shape[::2] == (m, d)):
        raise ValueError(f"update must be [M={m}, D={d}] or partial sums [M, S, D], got {update.shape}")
    update = update.reshape(-1, d)  # [M * S, D]: row r's partial sums are rows r * S .. r * S + S - 1
    return tuple(_call((update, residual, scale.astype(residual.dtype)), m, d, residual.dtype, eps, True, interpret))
