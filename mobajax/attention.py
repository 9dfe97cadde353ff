"""Attention dispatch: the one place the models call attention.

Models never compute attention themselves: every decoder layer calls `attend`, which writes the
new keys/values into the layer's KV cache and picks the implementation named by the model's
`AttentionSpec`. Kernels of `mobajax.pallas` plug in here without touching the models.

Shape letters: B batch, T new tokens, S kv length, N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mobajax.moba import moba_attention_reference, moba_selected_chunks  # noqa: F401
from mobajax.moba_masks import (
    MobaSpec,
    dense_key_mask,
    paged_chunk_means,
    selected_chunk_mask,
    update_page_key_sums,
)
from mobajax.pallas.kv_write import kv_write, kv_write_reference
from mobajax.pallas.paged_decode import paged_decode
from mobajax.pallas.paged_prefill import paged_prefill

IMPLEMENTATIONS = ("xla", "pallas")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """How a model attends (hashable: part of the frozen model config).

    impl: one of `IMPLEMENTATIONS`: "xla" (jax.numpy, any backend) or "pallas" (the Pallas
      Triton kernels of `mobajax.pallas` for the paged cache; GPU only, no sliding window).
    sliding_window: if set, a query at position p sees keys at positions (p - window, p].
    moba: if set, MoBA block-sparse attention (see `mobajax.moba_masks.MobaSpec`): for steps that
      compute several tokens of a sequence (prefill, chunked prefill), and for decode steps too
      when `moba.decode`. The XLA paths implement it; the Pallas paged kernels do not.
    """

    impl: str = "xla"
    sliding_window: int | None = None
    moba: MobaSpec | None = None

    def __post_init__(self):
        if self.impl not in IMPLEMENTATIONS:
            raise ValueError(f"attention impl {self.impl!r} is not one of {IMPLEMENTATIONS}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.impl == "pallas" and self.sliding_window is not None:
            raise ValueError("the pallas attention kernels have no sliding window; use impl='xla'")
        if self.impl == "pallas" and self.moba is not None:
            raise ValueError("the pallas paged attention kernels have no MoBA mode; use impl='xla'")


class KVCache(NamedTuple):
    """Contiguous per-layer KV cache; key slot s holds the token at absolute position s.

    k, v: [B, S_max, K, H]. The serving page pool replaces this with a paged layout behind the
    same `attend` call.
    """

    k: jax.Array
    v: jax.Array


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["slots", "page_table", "cu_q_lens", "kv_lens", "token_seq"],
    meta_fields=["decode"],
)
@dataclasses.dataclass(frozen=True)
class PagedMetadata:
    """Where a flat batch's new tokens live in the page pool (one per step, shared by all layers).

    slots [T]: pool slot (page * G + offset) of each new token, -1 for padding.
    page_table [B, P_max]: pages of each sequence in position order.
    cu_q_lens [B + 1]: sequence b owns tokens cu_q_lens[b]:cu_q_lens[b + 1].
    kv_lens [B]: tokens in the cache per sequence, the new ones included.
    token_seq [T]: the sequence row of each token (any row for padding). All int32.
    """

    slots: jax.Array
    page_table: jax.Array
    cu_q_lens: jax.Array
    kv_lens: jax.Array
    token_seq: jax.Array
    decode: bool = False


class PagedKVCache(NamedTuple):
    """One layer's view of the page pool: k/v pages [P, G, K, H] (layout of `mobajax.pallas`).

    k_sums [P, K, H] float32: each page's sum of the keys it holds (see
    `mobajax.moba_masks.update_page_key_sums`), kept up to date by every write; the MoBA gate
    builds its chunk means from them. Needed on MoBA layers only (None elsewhere).
    """

    k_pages: jax.Array
    v_pages: jax.Array
    meta: PagedMetadata
    k_sums: jax.Array | None = None


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
    allowed: jax.Array | None = None,
) -> jax.Array:
    """Causal attention by absolute position, GQA-native, softmax in float32.

    q [B, T, N, H], k/v [B, S, K, H], q_positions [B, T], k_positions [B, S] (int32) ->
    [B, T, N, H] in q's dtype. Query i sees key j when 0 <= k_pos[j] <= q_pos[i] (and, with a
    window, k_pos[j] > q_pos[i] - window; with `allowed` [B, T, N, S], only where it is True). A
    query that sees no key (padding) returns zeros.
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
    if allowed is not None:
        visible &= allowed.reshape(b, t, kv_heads, n // kv_heads, -1).transpose(0, 2, 3, 1, 4)
    logits = jnp.where(visible, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(logits - row_max)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


def paged_attention_xla(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    meta: PagedMetadata,
    q_positions: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    moba: MobaSpec | None = None,
    k_sums: jax.Array | None = None,
) -> jax.Array:
    """Paged causal attention of a flat ragged batch in jax.numpy, memory-bounded.

    q [T, N, H], pools [P, G, K, H], q_positions [T] (-1 = padding) -> [T, N, H]. Loops over
    page columns with an online softmax (natural base), gathering one page per token per
    iteration: memory O(T * G * K * H), no [T, S] score matrix. With `moba`, tokens of sequences
    that compute several tokens in this step (all tokens with `moba.decode`) attend to their
    MoBA-selected chunks only (block_size must be a multiple of G); the gate's chunk means come
    from the pool's page key sums k_sums [P, K, H] float32 (required with `moba`).
    """
    t, n, h = q.shape
    g, kv_heads = k_pages.shape[1], k_pages.shape[2]
    qg = q.reshape(t, kv_heads, n // kv_heads, h)
    pages_of_token = meta.page_table[meta.token_seq]  # [T, P_max]
    num_columns = (jnp.max(meta.kv_lens) + g - 1) // g
    if moba is not None:
        if moba.block_size % g:
            raise ValueError(f"MoBA block_size {moba.block_size} must be a multiple of the page size {g}")
        if k_sums is None:
            raise ValueError("MoBA needs the pool's page key sums (k_sums)")
        kbar = paged_chunk_means(k_sums, meta.page_table, meta.kv_lens, moba.block_size, g)[meta.token_seq]
        selected = selected_chunk_mask(q, kbar, q_positions, moba)  # [T, N, C]
        q_lens = meta.cu_q_lens[1:] - meta.cu_q_lens[:-1]
        uses_moba = (q_lens[meta.token_seq] > 1) | moba.decode
        selected = (selected | ~uses_moba[:, None, None]).reshape(t, kv_heads, n // kv_heads, -1)

    def body(j, state):
        m, denom, acc = state  # [T, K, Gq], [T, K, Gq], [T, K, Gq, H]
        page = pages_of_token[:, j]
        k_pos = j * g + jnp.arange(g, dtype=jnp.int32)
        visible = k_pos[None, :] <= q_positions[:, None]  # [T, G]
        if sliding_window is not None:
            visible &= k_pos[None, :] > q_positions[:, None] - sliding_window
        keys = k_pages[page]  # [T, G, K, H]
        values = jnp.where(visible[:, :, None, None], v_pages[page], 0)
        s = jnp.einsum("tkqh,tgkh->tkqg", qg, keys, preferred_element_type=jnp.float32) * scale
        visible = visible[:, None, None, :]
        if moba is not None:
            visible &= selected[..., (j * g) // moba.block_size][..., None]
        s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        correction = jnp.exp(m - m_safe)
        acc = acc * correction[..., None] + jnp.einsum(
            "tkqg,tgkh->tkqh", p.astype(values.dtype), values, preferred_element_type=jnp.float32
        )
        return m_new, denom * correction + jnp.sum(p, axis=-1), acc

    stats_shape = (t, kv_heads, n // kv_heads)
    init = (
        jnp.full(stats_shape, -jnp.inf, jnp.float32),
        jnp.zeros(stats_shape, jnp.float32),
        jnp.zeros((*stats_shape, h), jnp.float32),
    )
    _, denom, acc = jax.lax.fori_loop(0, num_columns, body, init)
    out = acc / jnp.where(denom == 0.0, 1.0, denom)[..., None]
    return out.reshape(t, n, h).astype(q.dtype)


def _attend_paged(q, k, v, positions, cache: PagedKVCache, spec: AttentionSpec, scale: float):
    """Flat batch: q [1, T, N, H], k/v [1, T, K, H] (None: already in the pool), positions [1, T]."""
    meta = cache.meta
    k_pages, v_pages = cache.k_pages, cache.v_pages
    if k is not None:
        row = k.shape[2] * k.shape[3]
        pallas_write = spec.impl == "pallas" and row & (row - 1) == 0  # the kernel needs K * H = 2^n
        write = kv_write if pallas_write else kv_write_reference
        k_pages, v_pages = write(k_pages, v_pages, k[0], v[0], meta.slots)
    k_sums = cache.k_sums
    if k_sums is not None:
        k_sums = update_page_key_sums(k_sums, k_pages, meta.slots)
    if spec.impl == "pallas":
        if meta.decode:
            out = paged_decode(q[0], k_pages, v_pages, meta.page_table, meta.kv_lens, scale=scale)
        else:
            out = paged_prefill(q[0], k_pages, v_pages, meta.page_table, meta.cu_q_lens, meta.kv_lens, scale=scale)
    else:
        out = paged_attention_xla(
            q[0], k_pages, v_pages, meta, positions[0], scale=scale, sliding_window=spec.sliding_window,
            moba=spec.moba, k_sums=k_sums,
        )
    return out[None], PagedKVCache(k_pages, v_pages, meta, k_sums)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    cache: KVCache | PagedKVCache | None,
    spec: AttentionSpec,
    *,
    scale: float,
) -> tuple[jax.Array, KVCache | PagedKVCache | None]:
    """Attention of one layer: q [B, T, N, H] and new k/v [B, T, K, H] at positions [B, T].

    With `cache=None` the T tokens attend among themselves (full-sequence forward). With a cache,
    the new k/v are written first and the queries attend to every cached position <= their own.
    With a `PagedKVCache`, B == 1 and the T tokens are a flat ragged batch of many sequences
    described by the cache's metadata; k and v may be None when the caller already wrote them
    to the pool (`mobajax.pallas.rope_kv_write`). Returns (out [B, T, N, H], updated cache or None).
    """
    if isinstance(cache, PagedKVCache):
        return _attend_paged(q, k, v, positions, cache, spec, scale)
    if cache is None:
        keys, values, k_positions = k, v, positions
    else:
        cache = write_kv(cache, k, v, positions)
        keys, values = cache.k, cache.v
        slots = jnp.arange(keys.shape[1], dtype=jnp.int32)
        k_positions = jnp.broadcast_to(slots, (keys.shape[0], keys.shape[1]))
    allowed = None
    if spec.moba is not None and (q.shape[1] > 1 or spec.moba.decode):
        allowed = dense_key_mask(q, keys, positions, k_positions, spec.moba)
    out = dense_attention_reference(
        q, keys, values, positions, k_positions, scale=scale, sliding_window=spec.sliding_window, allowed=allowed
    )
    return out, cache
