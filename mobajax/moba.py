"""MoBA (Mixture of Block Attention) in plain `jax.numpy`: the semantics in code.

Every MoBA path in mobajax (the Pallas kernels, the paged variants) is tested against the functions
here. One sequence: q [T, N, H] at absolute positions `q_positions` (default `S - T + arange(T)`,
the queries are the tail of the keys), k/v [S, K, H] at positions 0 .. S-1, GQA-native (query head
j reads kv head j // (N // K); K/V are never repeated per query head).

Rule (see the project's MoBA spec):
- chunk c holds keys [c*B, min((c+1)*B, S)); the last chunk may be partial;
- pooled key kbar[c] = mean of the chunk's keys, in float32;
- gate s[t, n, c] = <q[t, n], kbar[c, h(n)]> in float32, no scale, no softmax;
- the own chunk p // B is always selected; past chunks c < p // B are the candidates (they end at
  or before p); the top_k - 1 candidates with the highest gate score are selected;
- attention (softmax, default scale 1/sqrt(H)) over every key of the selected past chunks and the
  own-chunk keys at positions <= p.

Ties between equal gate scores: the lower chunk index wins (as `jax.lax.top_k` orders them).

Shape letters: T queries, S keys, N query heads, K kv heads, H head dim, C chunks, B block size.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _check(q, k, v, block_size, top_k):
    if q.ndim != 3 or k.ndim != 3 or v.shape != k.shape:
        raise ValueError(f"want q [T, N, H] and k, v [S, K, H]; got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"head dims must match and N must be a multiple of K; got q {q.shape}, k {k.shape}"
        )
    if block_size < 1 or top_k < 1:
        raise ValueError(f"block_size and top_k must be >= 1; got {block_size}, {top_k}")


def _positions(q, k, q_positions):
    if q_positions is None:
        return k.shape[0] - q.shape[0] + jnp.arange(q.shape[0], dtype=jnp.int32)
    return jnp.asarray(q_positions, jnp.int32)


def chunk_means(k: jax.Array, block_size: int) -> jax.Array:
    """Pooled keys kbar [C, K, H] in float32 (mean over the keys that exist)."""
    s = k.shape[0]
    c = -(-s // block_size)
    kp = jnp.pad(k.astype(jnp.float32), ((0, c * block_size - s), (0, 0), (0, 0)))
    sums = kp.reshape(c, block_size, *k.shape[1:]).sum(axis=1)
    counts = jnp.minimum(block_size, s - jnp.arange(c) * block_size).astype(jnp.float32)
    return sums / counts[:, None, None]


def _gate(q, k, block_size):
    """Gate scores [T, N, C] in float32."""
    t, n, h = q.shape
    kv = k.shape[1]
    kbar = chunk_means(k, block_size)
    qg = q.astype(jnp.float32).reshape(t, kv, n // kv, h)
    return jnp.einsum("tkgh,ckh->tkgc", qg, kbar, precision=_HIGHEST).reshape(t, n, kbar.shape[0])


def moba_selected_chunks(
    q: jax.Array,
    k: jax.Array,
    *,
    block_size: int,
    top_k: int,
    q_positions: jax.Array | None = None,
) -> jax.Array:
    """Chunks each query head attends to: [T, N, top_k] int32.

    Slot 0 is the own chunk p // B; slots 1.. are the selected past chunks by decreasing gate score
    (ties: lower chunk index first); -1 fills the slots beyond the number of candidates.
    """
    _check(q, k, k, block_size, top_k)
    pos = _positions(q, k, q_positions)
    own = pos // block_size
    out = [jnp.broadcast_to(own[:, None, None], (q.shape[0], q.shape[1], 1))]
    num_chunks = -(-k.shape[0] // block_size)
    picks = min(top_k - 1, num_chunks)
    if picks > 0:
        gate = _gate(q, k, block_size)
        cand = jnp.arange(num_chunks)[None, None, :] < own[:, None, None]
        scores, idx = jax.lax.top_k(jnp.where(cand, gate, -jnp.inf), picks)
        out.append(jnp.where(scores == -jnp.inf, -1, idx).astype(jnp.int32))
    if top_k - 1 > picks:
        out.append(jnp.full((q.shape[0], q.shape[1], top_k - 1 - picks), -1, jnp.int32))
    return jnp.concatenate(out, axis=-1).astype(jnp.int32)


def chunk_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    chunks: jax.Array,
    chunk_start: jax.Array,
    chunk_len: jax.Array,
    chunk_pos: jax.Array,
    *,
    block_size: int,
    scale: float,
    query_tile: int = 64,
) -> jax.Array:
    """Attention of each query head over the keys of its chunks, by gathering them.

    q [T, N, H], k/v [S, K, H] (flat: may hold several sequences), q_positions [T] (position of
    each query within its own sequence), chunks [T, N, J] int32 (chunk ids, -1 = none), and per
    chunk id: chunk_start (index into k of its first key), chunk_len (number of keys) and
    chunk_pos (position of its first key). A key of chunk c is seen when its position is <= the
    query's. Softmax in float32; a query that sees no key returns zeros. Returns [T, N, H] in q's
    dtype. Queries are processed `query_tile` at a time (rematerialised under autodiff), so memory
    is O(query_tile * N * J * B * H), never O(T * S).
    """
    t, n, h = q.shape
    if t == 0:
        return jnp.zeros_like(q)
    kv = k.shape[1]
    tile = max(1, min(query_tile, t))
    pad = -t % tile
    kvh = jnp.arange(n) // (n // kv)
    offs = jnp.arange(block_size)

    @jax.checkpoint
    def one_tile(args):
        qt, pt, ct = args  # [tile, N, H], [tile], [tile, N, J]
        cc = jnp.maximum(ct, 0)
        idx = chunk_start[cc][..., None] + offs  # [tile, N, J, B]
        kpos = chunk_pos[cc][..., None] + offs
        seen = (ct >= 0)[..., None] & (offs < chunk_len[cc][..., None])
        seen &= kpos <= pt[:, None, None, None]
        idx = jnp.clip(idx, 0, k.shape[0] - 1)
        heads = kvh[None, :, None, None]
        kt = k[idx, heads]  # [tile, N, J, B, H]
        vt = v[idx, heads]
        logits = jnp.einsum(
            "tnh,tnjbh->tnjb", qt, kt, preferred_element_type=jnp.float32, precision=_HIGHEST
        ) * scale
        logits = jnp.where(seen, logits, -jnp.inf)
        m = jnp.max(logits, axis=(2, 3), keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        w = jnp.where(seen, jnp.exp(logits - m), 0.0)
        den = jnp.sum(w, axis=(2, 3))
        num = jnp.einsum("tnjb,tnjbh->tnh", w, vt.astype(jnp.float32), precision=_HIGHEST)
        return (num / jnp.where(den == 0.0, 1.0, den)[..., None]).astype(q.dtype)

    qp = jnp.pad(q, ((0, pad), (0, 0), (0, 0)))
    pp = jnp.pad(q_positions, (0, pad))
    cp = jnp.pad(chunks, ((0, pad), (0, 0), (0, 0)), constant_values=-1)
    split = lambda x: x.reshape(-1, tile, *x.shape[1:])  # noqa: E731
    out = jax.lax.map(one_tile, (split(qp), split(pp), split(cp)))
    return out.reshape(-1, n, h)[:t]


def moba_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    block_size: int,
    top_k: int,
    q_positions: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """MoBA attention of one sequence: q [T, N, H], k/v [S, K, H] -> [T, N, H] in q's dtype.

    q_positions [T] defaults to S - T + arange(T). Gate and selection as `moba_selected_chunks`
    (ties: lower chunk index wins); softmax in float32 with scale 1/sqrt(H) by default. Gradients
    flow through the attention over the selected chunks; the selection is not differentiable.
    """
    _check(q, k, v, block_size, top_k)
    pos = _positions(q, k, q_positions)
    chunks = jax.lax.stop_gradient(
        moba_selected_chunks(q, k, block_size=block_size, top_k=top_k, q_positions=pos)
    )
    s = k.shape[0]
    starts = jnp.arange(-(-s // block_size), dtype=jnp.int32) * block_size
    lens = jnp.minimum(block_size, s - starts)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    tile = max(1, 2**24 // (q.shape[1] * top_k * block_size * q.shape[2]))
    return chunk_attention(
        q, k, v, pos, chunks, starts, lens, starts, block_size=block_size, scale=scale,
        query_tile=tile,
    )  # fmt: skip


def moba_attention_dense_mask(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    block_size: int,
    top_k: int,
    q_positions: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """The same function written the straightforward way (as the original `moba_naive`).

    Full gate [T, N, C] with the own chunk forced to +inf and non-candidates to -inf, top_k over it,
    a dense [T, N, S] key mask, masked softmax. O(T * S) memory: for tests only.
    """
    _check(q, k, v, block_size, top_k)
    pos = _positions(q, k, q_positions)
    t, n, h = q.shape
    s, kv = k.shape[0], k.shape[1]
    num_chunks = -(-s // block_size)
    chunk_ids = jnp.arange(num_chunks)[None, None, :]
    own = (pos // block_size)[:, None, None]
    gate = jnp.where(chunk_ids < own, _gate(q, k, block_size), -jnp.inf)
    gate = jnp.where(chunk_ids == own, jnp.inf, gate)
    vals, idx = jax.lax.top_k(gate, min(top_k, num_chunks))
    picked = jnp.zeros((t, n, num_chunks), bool)
    picked = picked.at[jnp.arange(t)[:, None, None], jnp.arange(n)[None, :, None], idx].set(
        vals > -jnp.inf
    )
    key_chunk = jnp.arange(s) // block_size
    mask = picked[:, :, key_chunk] & (jnp.arange(s)[None, None, :] <= pos[:, None, None])
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    qg = q.reshape(t, kv, n // kv, h)
    logits = jnp.einsum(
        "tkgh,skh->tkgs", qg, k, preferred_element_type=jnp.float32, precision=_HIGHEST
    ).reshape(t, n, s)
    logits = jnp.where(mask, logits * scale, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum(
        "tkgs,skh->tkgh",
        probs.reshape(t, kv, n // kv, s),
        v.astype(jnp.float32),
        precision=_HIGHEST,
    )
    return out.reshape(t, n, h).astype(q.dtype)
