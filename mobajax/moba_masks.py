"""MoBA selection as key-visibility masks, for the XLA paths of the attention dispatch.

Same rule as `mobajax.moba` (the reference) and the project's MoBA spec: the own chunk p // B is
always selected, and of the complete chunks before it ((c + 1) * B <= p) the top_k - 1 with the
highest gate score <q, mean(k of chunk)> (float32, no scale; ties: lower chunk index). Because
candidates are complete chunks that end at or before the query, their means only ever need keys
that are already in the cache. The paged path keeps per-page key sums beside the pool, so the gate
builds a chunk's mean from block_size / G page sums and never reads the chunk's keys.

Shape letters: X query tokens, B sequences, N query heads, K kv heads, H head dim, C chunks,
P pages, G page size.
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


def dense_key_mask(
    q: jax.Array, keys: jax.Array, q_positions: jax.Array, k_positions: jax.Array, spec: MobaSpec
) -> jax.Array:
    """MoBA mask [B, T, N, S] for q [B, T, N, H] over keys [B, S, K, H] stored by position."""
    b, t, n, _ = q.shape
    kbar = contiguous_chunk_means(keys, spec.block_size)  # [B, C, K, H]
    per_token = jnp.broadcast_to(kbar[:, None], (b, t, *kbar.shape[1:])).reshape(b * t, *kbar.shape[1:])
    selected = selected_chunk_mask(q.reshape(b * t, n, -1), per_token, q_positions.reshape(-1), spec)
    selected = selected.reshape(b, t, n, -1)
    key_chunk = jnp.clip(k_positions // spec.block_size, 0, selected.shape[-1] - 1)  # [B, S]
    return jnp.take_along_axis(selected, key_chunk[:, None, None, :], axis=-1)


def update_page_key_sums(k_sums: jax.Array, k_pages: jax.Array, slots: jax.Array) -> jax.Array:
    """Refresh the key sums of the pages written at `slots`, after the write.

    k_sums [P, K, H] float32: page p's sum of the keys a sequence holds in it (offsets up to its
    last written one). k_pages [P, G, K, H] (new keys already in), slots [T] int32 (-1: padding).
    Each written page is summed again from the pool up to the highest offset written to it in this
    step, so stale keys past it (a reused page) and stale sums never leak. Memory O(T * G * K * H).
    """
    num_pages, g = k_pages.shape[:2]
    page, offset = jnp.maximum(slots, 0) // g, slots % g
    target = jnp.where(slots < 0, num_pages, page)  # out of range -> dropped
    last = jnp.full(num_pages, -1, jnp.int32).at[target].max(offset, mode="drop")
    keys = k_pages[page].astype(jnp.float32)  # [T, G, K, H]
    held = jnp.arange(g)[None, :] <= offset[:, None]  # [T, G]
    sums = jnp.sum(jnp.where(held[:, :, None, None], keys, 0.0), axis=1)
    is_last = offset == last[page]  # one writer per page
    return k_sums.at[jnp.where(is_last, target, num_pages)].set(sums, mode="drop")


def paged_chunk_means(
    k_sums: jax.Array, page_table: jax.Array, kv_lens: jax.Array, block_size: int, page_size: int
) -> jax.Array:
    """Chunk means [B, C, K, H] float32 of each sequence, from the pool's page key sums.

    k_sums [P, K, H] float32 (see `update_page_key_sums`), page_table [B, P_max], kv_lens [B];
    block_size a multiple of page_size. Only the complete chunks of the longest sequence are
    summed (the gate reads no other; a complete chunk holds block_size keys); the rest are zeros.
    Loops over chunks and their pages, never reading a key: memory O(B * C * K * H).
    """
    b, p_max = page_table.shape
    kv, h = k_sums.shape[1:]
    per_chunk = block_size // page_size
    num_chunks = -(-p_max * page_size // block_size)
    complete = jnp.max(kv_lens) // block_size

    def chunk_sum(c, kbar):
        def add_page(i, acc):
            return acc + k_sums[page_table[:, c * per_chunk + i]]

        total = jax.lax.fori_loop(0, per_chunk, add_page, jnp.zeros((b, kv, h), jnp.float32))
        return jax.lax.dynamic_update_slice(kbar, (total / block_size)[:, None], (0, c, 0, 0))

    return jax.lax.fori_loop(0, complete, chunk_sum, jnp.zeros((b, num_chunks, kv, h), jnp.float32))
