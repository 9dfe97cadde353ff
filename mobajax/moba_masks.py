"""MoBA selection as key-visibility masks, for the XLA paths of the attention dispatch.

Same rule as `mobajax.moba` (the reference) and the project's MoBA spec: the own chunk p // B is
always selected, and of the complete chunks before it ((c + 1) * B <= p) the top_k - 1 with the
highest gate score <q, mean(k of chunk)> (float32, no scale; ties: lower chunk index). Because
candidates are complete chunks that end at or before the query, their means only ever need keys
that are already in the cache.

Shape letters: X query tokens, N query heads, K kv heads, H head dim, C chunks, B block size.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class MobaSpec:
    """MoBA for one layer. decode: also for single-token (decode) steps; by default those use full
    attention, as the MoBA paper evaluates (MoBA for prefill, full attention for decode)."""

    block_size: int
    top_k: int
    decode: bool = False

    def __post_init__(self):
        if self.block_size < 1 or self.top_k < 1:
            raise ValueError(f"MoBA block_size and top_k must be >= 1, got {self.block_size}, {self.top_k}")


def selected_chunk_mask(q: jax.Array, kbar: jax.Array, q_positions: jax.Array, spec: MobaSpec) -> jax.Array:
    """Chunks each query head attends to, as a mask [X, N, C] (bool).

    q [X, N, H], kbar [X, C, K, H] float32 chunk means as seen by each query (only the complete
    chunks before the query's own chunk are read), q_positions [X] int32.
    """
    x, n, h = q.shape
    c, kv = kbar.shape[1], kbar.shape[2]
    qg = q.astype(jnp.float32).reshape(x, kv, n // kv, h)
    gate = jnp.einsum("xkgh,xckh->xkgc", qg, kbar, precision=_HIGHEST).reshape(x, n, c)
    chunk = jnp.arange(c, dtype=jnp.int32)
    own = (q_positions // spec.block_size)[:, None, None]
    selected = jnp.broadcast_to(chunk[None, None, :] == own, (x, n, c))
    picks = min(spec.top_k - 1, c)
    if picks > 0:
        candidate = ((chunk[None, :] + 1) * spec.block_size <= q_positions[:, None])[:, None, :]
        scores, idx = jax.lax.top_k(jnp.where(candidate, gate, -jnp.inf), picks)
        hits = (idx[..., None] == chunk) & jnp.isfinite(scores)[..., None]  # [X, N, picks, C]
        selected |= jnp.any(hits, axis=2)
    return selected


def contiguous_chunk_means(keys: jax.Array, block_size: int) -> jax.Array:
    """keys [B, S, K, H] whose slot index is the position -> chunk means [B, C, K, H] float32
    (C = ceil(S / block_size); a chunk past the written keys holds garbage and is never a candidate)."""
    b, s, kv, h = keys.shape
    c = -(-s // block_size)
    padded = jnp.pad(keys.astype(jnp.float32), ((0, 0), (0, c * block_size - s), (0, 0), (0, 0)))
    return padded.reshape(b, c, block_size, kv, h).sum(axis=2) / block_size


def dense_key_mask(q: jax.Array, keys: jax.Array, q_positions: jax.Array, k_positions: jax.Array, spec: MobaSpec) -> jax.Array:
    """MoBA mask [B, T, N, S] for q [B, T, N, H] over keys [B, S, K, H] stored by position."""
    b, t, n, _ = q.shape
    kbar = contiguous_chunk_means(keys, spec.block_size)  # [B, C, K, H]
    per_token = jnp.broadcast_to(kbar[:, None], (b, t, *kbar.shape[1:])).reshape(b * t, *kbar.shape[1:])
    selected = selected_chunk_mask(q.reshape(b * t, n, -1), per_token, q_positions.reshape(-1), spec)
    selected = selected.reshape(b, t, n, -1)
    key_chunk = jnp.clip(k_positions // spec.block_size, 0, selected.shape[-1] - 1)  # [B, S]
    return jnp.take_along_axis(selected, key_chunk[:, None, None, :], axis=-1)


def paged_chunk_means(k_pages: jax.Array, pages_of_token: jax.Array, kv_lens_of_token: jax.Array, block_size: int) -> jax.Array:
    """Chunk means [X, C, K, H] float32 of each token's sequence, read from the page pool.

    k_pages [P, G, K, H], pages_of_token [X, P_max], kv_lens_of_token [X]. Loops over the complete
    chunks of the longest sequence, one page column at a time (memory O(X * C * K * H)).
    """
    g, kv, h = k_pages.shape[1:]
    x, p_max = pages_of_token.shape
    per_chunk = block_size // g
    num_chunks = -(-p_max * g // block_size)
    complete = jnp.max(kv_lens_of_token) // block_size

    def chunk_sum(c, kbar):
        def add_page(i, acc):
            return acc + jnp.sum(k_pages[pages_of_token[:, c * per_chunk + i]].astype(jnp.float32), axis=1)

        total = jax.lax.fori_loop(0, per_chunk, add_page, jnp.zeros((x, kv, h), jnp.float32))
        return jax.lax.dynamic_update_slice(kbar, (total / block_size)[:, None], (0, c, 0, 0))

    return jax.lax.fori_loop(0, complete, chunk_sum, jnp.zeros((x, num_chunks, kv, h), jnp.float32))
