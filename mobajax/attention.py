"""Attention dispatch: the one place the models call attention.

Models never compute attention themselves: every decoder layer calls `attend`, which writes the
new keys/values into the layer's KV cache and picks the implementation named by the model's
`AttentionSpec`. Kernels of `mobajax.pallas` plug in here without touching the models.

Shape letters: B batch, T new tokens, S kv length, N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mobajax.moba import moba_attention_reference, moba_selected_chunks  # noqa: F401

IMPLEMENTATIONS = ("xla",)


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """How a model attends (hashable: part of the frozen model config).

    impl: one of `IMPLEMENTATIONS`.
    sliding_window: if set, a query at position p sees keys at positions (p - window, p].
    """

    impl: str = "xla"
    sliding_window: int | None = None

    def __post_init__(self):
        if self.impl not in IMPLEMENTATIONS:
            raise ValueError(f"attention impl {self.impl!r} is not one of {IMPLEMENTATIONS}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")


class KVCache(NamedTuple):
    """Contiguous per-layer KV cache; key slot s holds the token at absolute position s.

    k, v: [B, S_max, K, H]. The serving page pool replaces this with a paged layout behind the
    same `attend` call.
    """

    k: jax.Array
    v: jax.Array


def init_kv_cache(
    num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype
) -> tuple[KVCache, ...]:
    """Zero-filled caches, one per layer, each k/v [B, S_max, K, H]."""
    shape = (batch, max_len, num_kv_heads, head_dim)
    return tuple(KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(num_layers))


def write_kv(cache: KVCache, k: jax.Array, v: jax.Array, positions: jax.Array) -> KVCache:
    """Scatter new k/v [B, T, K, H] into the cache at `positions` [B, T] (int32).

    Tokens with a negative position are padding and are not written.
    """
    max_len = cache.k.shape[1]
    slots = jnp.where(positions < 0, max_len, positions)  # out of range -> dropped
    rows = jnp.arange(k.shape[0])[:, None]
    new_k = cache.k.at[rows, slots].set(k.astype(cache.k.dtype), mode="drop")
    new_v = cache.v.at[rows, slots].set(v.astype(cache.v.dtype), mode="drop")
    return KVCache(new_k, new_v)


def dense_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    k_positions: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
) -> jax.Array:
    """Causal attention by absolute position, GQA-native, softmax in float32.

    q [B, T, N, H], k/v [B, S, K, H], q_positions [B, T], k_positions [B, S] (int32) ->
    [B, T, N, H] in q's dtype. Query i sees key j when 0 <= k_pos[j] <= q_pos[i] (and, with a
    window, k_pos[j] > q_pos[i] - window). A query that sees no key (padding) returns zeros.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    qp = q_positions[:, None, None, :, None]
    kp = k_positions[:, None, None, None, :]
    visible = (kp >= 0) & (kp <= qp)
    if sliding_window is not None:
        visible &= kp > qp - sliding_window
    logits = jnp.where(visible, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(logits - row_max)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    cache: KVCache | None,
    spec: AttentionSpec,
    *,
    scale: float,
) -> tuple[jax.Array, KVCache | None]:
    """Attention of one layer: q [B, T, N, H] and new k/v [B, T, K, H] at positions [B, T].

    With `cache=None` the T tokens attend among themselves (full-sequence forward). With a cache,
    the new k/v are written first and the queries attend to every cached position <= their own.
    Returns (out [B, T, N, H], updated cache or None).
    """
    if cache is None:
        keys, values, k_positions = k, v, positions
    else:
        cache = write_kv(cache, k, v, positions)
        keys, values = cache.k, cache.v
        slots = jnp.arange(keys.shape[1], dtype=jnp.int32)
        k_positions = jnp.broadcast_to(slots, (keys.shape[0], keys.shape[1]))
    out = dense_attention_reference(
        q, keys, values, positions, k_positions, scale=scale, sliding_window=spec.sliding_window
    )
    return out, cache
