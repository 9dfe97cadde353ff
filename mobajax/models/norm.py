"""RMSNorm as a function: the math of `layers.RMSNorm`, also the reference of the fused kernel
`mobajax.pallas.qk_norm_rope`."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) * scale over the last axis: the rms in float32, the normalised x rounded to x's
    dtype before the scale multiplies it (as Hugging Face's Llama RMSNorm does)."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale * normed.astype(x.dtype)
