"""The attention dispatch: dense reference vs naive maths, paged XLA path vs dense reference."""

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
import pytest

import mobajax.attention
from mobajax.attention import (
    AttentionSpec,
    KVCache,
    PagedKVCache,
    PagedMetadata,
    attend,
    dense_attention_reference,
    paged_attention_xla,
)


def naive_attention(q, k, v, window=None):
    """One sequence, q/k/v [T, N|K, H] at positions 0..T-1, repeated kv heads, float64."""
    t, n, h = q.shape
    rep = n // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.einsum("tnh,snh->nts", q, k) / np.sqrt(h)
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    mask = j <= i if window is None else (j <= i) & (j > i - window)
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("nts,snh->tnh", p, v)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_dense_reference_matches_naive(heads, window):
    n, kh = heads
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((13, x, 16)) for x in (n, kh, kh))
    pos = jnp.arange(13)[None]
    out = dense_attention_reference(
        jnp.asarray(q[None], jnp.float32), jnp.asarray(k[None], jnp.float32), jnp.asarray(v[None], jnp.float32),
        pos, pos, scale=16**-0.5, sliding_window=window,
    )
    np.testing.assert_allclose(np.asarray(out[0]), naive_attention(q, k, v, window), atol=1e-5)


def test_dense_cache_incremental_equals_full():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 9, x, 8)), jnp.float32) for x in (4, 2, 2))
    spec = AttentionSpec()
    full, _ = attend(q, k, v, jnp.arange(9)[None], None, spec, scale=0.3)
    cache = KVCache(jnp.zeros((1, 16, 2, 8)), jnp.zeros((1, 16, 2, 8)))
    first, cache = attend(q[:, :6], k[:, :6], v[:, :6], jnp.arange(6)[None], cache, spec, scale=0.3)
    rest, cache = attend(q[:, 6:], k[:, 6:], v[:, 6:], jnp.arange(6, 9)[None], cache, spec, scale=0.3)
    np.testing.assert_allclose(np.concatenate([first, rest], axis=1), full, atol=1e-5)


def build_paged_batch(rng, lens_cached, lens_new, page_size, num_pages, kv_heads, h):
    """Random pool holding each sequence's cached keys on shuffled pages, and a flat new batch."""
    b = len(lens_cached)
    p_max = max(-(-(c + n) // page_size) for c, n in zip(lens_cached, lens_new))
    perm = rng.permutation(num_pages)
    page_table = perm[: b * p_max].reshape(b, p_max).astype(np.int32)
    k_pages = rng.standard_normal((num_pages, page_size, kv_heads, h)).astype(np.float32)
    v_pages = rng.standard_normal((num_pages, page_size, kv_heads, h)).astype(np.float32)
    positions, seq, slots = [], [], []
    for r, (c, n) in enumerate(zip(lens_cached, lens_new)):
        for p in range(c, c + n):
            positions.append(p)
            seq.append(r)
            slots.append(page_table[r, p // page_size] * page_size + p % page_size)
    cu = np.concatenate([[0], np.cumsum(lens_new)]).astype(np.int32)
    kv_lens = np.asarray(lens_cached, np.int32) + np.asarray(lens_new, np.int32)
    meta = PagedMetadata(
        jnp.asarray(slots, jnp.int32), jnp.asarray(page_table), jnp.asarray(cu), jnp.asarray(kv_lens),
        jnp.asarray(seq, jnp.int32)
    )
    return k_pages, v_pages, meta, np.asarray(positions, np.int32)


@pytest.mark.parametrize("page_size", [4, 16])
@pytest.mark.parametrize("window", [None, 7])
def test_paged_attend_equals_dense(page_size, window):
    rng = np.random.default_rng(2)
    n, kh, h = 6, 2, 8
    lens_cached, lens_new = [0, 5, 19, 3], [7, 1, 4, 1]  # prefill, decodes, a chunk after a prefix
    k_pages, v_pages, meta, positions = build_paged_batch(rng, lens_cached, lens_new, page_size, 40, kh, h)
    t = len(positions)
    q = rng.standard_normal((1, t, n, h)).astype(np.float32)
    k_new = rng.standard_normal((1, t, kh, h)).astype(np.float32)
    v_new = rng.standard_normal((1, t, kh, h)).astype(np.float32)
    spec = AttentionSpec(sliding_window=window)
    cache = PagedKVCache(jnp.asarray(k_pages), jnp.asarray(v_pages), meta)
    out, cache = attend(
        jnp.asarray(q), jnp.asarray(k_new), jnp.asarray(v_new), jnp.asarray(positions)[None], cache, spec, scale=0.4
    )
    # Dense check per sequence: its cached keys from the pool plus the new ones.
    start = 0
    for r, (c, m) in enumerate(zip(lens_cached, lens_new)):
        rows = slice(start, start + m)
        slots = [meta.page_table[r, p // page_size] * page_size + p % page_size for p in range(c + m)]
        keys = np.asarray(cache.k_pages).reshape(-1, kh, h)[np.asarray(slots)]
        values = np.asarray(cache.v_pages).reshape(-1, kh, h)[np.asarray(slots)]
        np.testing.assert_array_equal(keys[c:], k_new[0, rows])
        want = dense_attention_reference(
            jnp.asarray(q[:, rows]), jnp.asarray(keys[None]), jnp.asarray(values[None]),
            jnp.asarray(positions[rows])[None], jnp.arange(c + m)[None], scale=0.4, sliding_window=window,
        )
        np.testing.assert_allclose(np.asarray(out[0, rows]), np.asarray(want[0]), atol=2e-5)
        start += m


def test_paged_padding_rows_are_zero_and_not_written():
    rng = np.random.default_rng(3)
    k_pages, v_pages, meta, positions = build_paged_batch(rng, [3], [2], 4, 8, 1, 4)
    meta = dataclasses.replace(meta, slots=jnp.concatenate([meta.slots, jnp.array([-1, -1], jnp.int32)]),
                               token_seq=jnp.concatenate([meta.token_seq, jnp.zeros(2, jnp.int32)]))
    q = jnp.asarray(rng.standard_normal((4, 2, 4)), jnp.float32)
    out = paged_attention_xla(
        q, jnp.asarray(k_pages), jnp.asarray(v_pages), meta, jnp.asarray([3, 4, -1, -1]), scale=0.5
    )
    assert np.all(np.asarray(out[2:]) == 0) and np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize("decode", [False, True])
def test_pallas_dispatch_equals_xla(monkeypatch, decode):
    """impl="pallas" (kernels in interpret mode on CPU) writes the pool and attends like the XLA
    path: the ragged prefill kernel for mixed batches, the decode kernel for `decode` metadata."""
    for name in ("kv_write", "paged_prefill", "paged_decode"):
        monkeypatch.setattr(
            mobajax.attention, name, functools.partial(getattr(mobajax.attention, name), interpret=True)
        )
    rng = np.random.default_rng(4)
    n, kh, h, page_size = 8, 2, 16, 16
    lens_cached, lens_new = ([5, 40, 0, 17], [1, 1, 1, 1]) if decode else ([0, 21, 3], [9, 1, 30])
    k_pages, v_pages, meta, positions = build_paged_batch(rng, lens_cached, lens_new, page_size, 24, kh, h)
    meta = dataclasses.replace(meta, decode=decode)
    t = len(positions)
    q, k_new, v_new = (jnp.asarray(rng.standard_normal((1, t, x, h)), jnp.float32) for x in (n, kh, kh))
    outs = {}
    for impl in ("xla", "pallas"):
        cache = PagedKVCache(jnp.asarray(k_pages), jnp.asarray(v_pages), meta)
        outs[impl] = attend(q, k_new, v_new, jnp.asarray(positions)[None], cache, AttentionSpec(impl=impl), scale=0.25)
    np.testing.assert_allclose(np.asarray(outs["pallas"][0]), np.asarray(outs["xla"][0]), atol=2e-5)
    np.testing.assert_array_equal(np.asarray(outs["pallas"][1].k_pages), np.asarray(outs["xla"][1].k_pages))


def test_pallas_impl_rejects_sliding_window():
    with pytest.raises(ValueError, match="no sliding window"):
        AttentionSpec(impl="pallas", sliding_window=4)
    with pytest.raises(ValueError, match=r"attention impl 'cuda' is not one of \('xla', 'pallas'\)"):
        AttentionSpec(impl="cuda")
