"""Rotary embedding of q and k, with their RMSNorm first (Qwen3's q/k norm), in one kernel.

XLA runs the model's norm + rope as separate kernels per layer (a reduction per norm, a
rotate-half concatenation per rope); at a few decode tokens each is a launch of 1-2 us for a few
KB. Here one program per token loads its q [N, H] and k [K, H] heads, normalises (optionally)
and rotates them in registers, and writes both. The rotate-half partner of column c is column
(c + H/2) mod H, read with a second (cached) load instead of a register shuffle.

Shapes: q [T, N, H], k [T, K, H], positions [T] int32, inv_freq [H/2] float32 (see
`mobajax.models.rope.inverse_frequencies`), q_scale / k_scale [H] or None -> (q, k) rotated, in
their dtypes. Rounding follows the model path (`norm_rope_reference`): the norm's output is
rounded to the dtype before its scale and before the rotation. Pallas with the Triton lowering;
`interpret=True` runs it on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mobajax.models.norm import rms_norm
from mobajax.models.rope import apply_rope
from mobajax.pallas.online_softmax import next_power_of_two


def norm_rope_reference(x, positions, inv_freq, attention_factor: float, scale=None, eps: float = 1e-6):
    """The model path for one of q or k: x [T, heads, H] (RMSNorm'd first if `scale` [H] is
    given), rotated by positions [T] -> [T, heads, H] in x's dtype."""
    if scale is not None:
        x = rms_norm(x, scale, eps)
    return apply_rope(x[None], positions[None], inv_freq, attention_factor)[0]


def _rotate(x_ref, o_ref, scale_ref, t, angle, *, eps: float, factor: float):
    """Norm (if scale_ref) and rotate token t's heads of x_ref [T, heads, H] into o_ref."""
    heads, h = x_ref.shape[1], x_ref.shape[2]
    half = h // 2
    row = jnp.arange(next_power_of_two(heads))
    col = jnp.arange(h)
    partner = (col + half) % h
    live = (row < heads)[:, None]
    x = plgpu.load(x_ref.at[t, row[:, None], col[None, :]], mask=live, other=0).astype(jnp.float32)
    xp = plgpu.load(x_ref.at[t, row[:, None], partner[None, :]], mask=live, other=0).astype(jnp.float32)
    if scale_ref is not None:
        dtype = x_ref.dtype
        inv_rms = jax.lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) / h + eps)
        x = ((x * inv_rms).astype(dtype) * scale_ref[col][None, :]).astype(jnp.float32)
        xp = ((xp * inv_rms).astype(dtype) * scale_ref[partner][None, :]).astype(jnp.float32)
    x = x.astype(x_ref.dtype).astype(jnp.float32)  # the model rounds the norm's output
    xp = xp.astype(x_ref.dtype).astype(jnp.float32)
    rotated = jnp.where((col < half)[None, :], -xp, xp)
    out = x * (jnp.cos(angle) * factor)[None, :] + rotated * (jnp.sin(angle) * factor)[None, :]
    plgpu.store(o_ref.at[t, row[:, None], col[None, :]], out.astype(o_ref.dtype), mask=live)


def _kernel(*refs, has_scale: bool, eps: float, factor: float):
    if has_scale:
        pos_ref, freq_ref, q_ref, k_ref, qs_ref, ks_ref, qo_ref, ko_ref = refs
    else:
        (pos_ref, freq_ref, q_ref, k_ref, qo_ref, ko_ref), qs_ref, ks_ref = refs, None, None
    t = pl.program_id(0)
    h = q_ref.shape[2]
    angle = pos_ref[t].astype(jnp.float32) * freq_ref[jnp.arange(h) % (h // 2)]  # [H]: cos/sin repeat per half
    _rotate(q_ref, qo_ref, qs_ref, t, angle, eps=eps, factor=factor)
    _rotate(k_ref, ko_ref, ks_ref, t, angle, eps=eps, factor=factor)


@functools.partial(jax.jit, static_argnames=("attention_factor", "eps", "interpret"))
def qk_norm_rope(
    q: jax.Array,
    k: jax.Array,
    positions: jax.Array,
    inv_freq: jax.Array,
    *,
    attention_factor: float = 1.0,
    q_scale: jax.Array | None = None,
    k_scale: jax.Array | None = None,
    eps: float = 1e-6,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """`norm_rope_reference` of q [T, N, H] and of k [T, K, H] in one kernel -> (q, k)."""
    if q.ndim != 3 or k.ndim != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q [T, N, H] and k [T, K, H] must share T and H, got {q.shape} and {k.shape}")
    t, _, h = q.shape
    if h % 2 or not np.log2(h).is_integer():
        raise ValueError(f"head dim must be a power of two, got {h}")
    if positions.shape != (t,) or inv_freq.shape != (h // 2,):
        raise ValueError(f"positions must be [{t}] and inv_freq [{h // 2}], got {positions.shape} and {inv_freq.shape}")
    if (q_scale is None) != (k_scale is None) or (q_scale is not None and (q_scale.shape, k_scale.shape) != ((h,),) * 2):
        raise ValueError(f"q_scale and k_scale must both be [{h}] or both None")
    has_scale = q_scale is not None
    whole = lambda x: pl.BlockSpec(x.shape, lambda i: (0,) * x.ndim)  # noqa: E731 (the kernel indexes by token)
    inputs = [positions.astype(jnp.int32), jnp.asarray(inv_freq, jnp.float32), q, k]
    if has_scale:
        inputs += [q_scale.astype(q.dtype), k_scale.astype(k.dtype)]
    return pl.pallas_call(
        functools.partial(_kernel, has_scale=has_scale, eps=eps, factor=attention_factor),
        grid=(t,),
        in_specs=[whole(x) for x in inputs],
        out_specs=[whole(q), whole(k)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="qk_norm_rope",
    )(*inputs)
