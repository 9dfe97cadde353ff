"""MoBA in the attention dispatch (dense and paged XLA paths) against the MoBA reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.attention import (
    AttentionSpec,
    KVCache,
    PagedKVCache,
    attend,
    dense_attention_reference,
)
from mobajax.moba import moba_attention_reference, moba_selected_chunks
from mobajax.moba_masks import MobaSpec, contiguous_chunk_means, selected_chunk_mask
from tests.test_attention import build_paged_batch

SCALE = 0.3


def rand(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("block, top_k", [(4, 1), (4, 3), (8, 2), (16, 9)])
def test_selected_mask_equals_reference_selection(block, top_k):
    rng = np.random.default_rng(0)
    q, k = rand(rng, 40, 8, 16), rand(rng, 40, 2, 16)
    pos = jnp.arange(40)
    spec = MobaSpec(block, top_k)
    kbar = jnp.broadcast_to(contiguous_chunk_means(k[None], block), (40, -(-40 // block), 2, 16))
    mask = np.asarray(selected_chunk_mask(q, kbar, pos, spec))
    chunks = np.asarray(moba_selected_chunks(q, k, block_size=block, top_k=top_k, q_positions=pos))
    want = np.zeros_like(mask)
    for t in range(40):
        for n in range(8):
            want[t, n, [c for c in chunks[t, n] if c >= 0]] = True
    np.testing.assert_array_equal(mask, want)


@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_full_sequence_forward_equals_reference(heads):
    n, kh = heads
    rng = np.random.default_rng(1)
    q, k, v = rand(rng, 2, 37, n, 16), rand(rng, 2, 37, kh, 16), rand(rng, 2, 37, kh, 16)
    spec = AttentionSpec(moba=MobaSpec(block_size=8, top_k=2))
    out, _ = attend(q, k, v, jnp.broadcast_to(jnp.arange(37), (2, 37)), None, spec, scale=SCALE)
    for b in range(2):
        want = moba_attention_reference(q[b], k[b], v[b], block_size=8, top_k=2, scale=SCALE)
        np.testing.assert_allclose(np.asarray(out[b]), np.asarray(want), atol=2e-5)


def test_cached_chunked_prefill_is_moba_and_decode_is_full():
    rng = np.random.default_rng(2)
    q, k, v = rand(rng, 1, 30, 4, 8), rand(rng, 1, 30, 2, 8), rand(rng, 1, 30, 2, 8)
    spec = AttentionSpec(moba=MobaSpec(block_size=4, top_k=2))
    cache = KVCache(jnp.zeros((1, 32, 2, 8)), jnp.zeros((1, 32, 2, 8)))
    first, cache = attend(q[:, :20], k[:, :20], v[:, :20], jnp.arange(20)[None], cache, spec, scale=SCALE)
    chunk, cache = attend(q[:, 20:29], k[:, 20:29], v[:, 20:29], jnp.arange(20, 29)[None], cache, spec, scale=SCALE)
    decode, cache = attend(q[:, 29:], k[:, 29:], v[:, 29:], jnp.array([[29]]), cache, spec, scale=SCALE)
    ref = moba_attention_reference(q[0, :29], k[0, :29], v[0, :29], block_size=4, top_k=2, scale=SCALE)
    np.testing.assert_allclose(np.asarray(jnp.concatenate([first, chunk], axis=1)[0]), np.asarray(ref), atol=2e-5)
    full = dense_attention_reference(q[:, 29:], k, v, jnp.array([[29]]), jnp.arange(30)[None], scale=SCALE)
    np.testing.assert_allclose(np.asarray(decode), np.asarray(full), atol=2e-5)
    assert not np.allclose(np.asarray(chunk), np.asarray(dense_attention_reference(
        q[:, 20:29], k[:, :29], v[:, :29], jnp.arange(20, 29)[None], jnp.arange(29)[None], scale=SCALE)))


@pytest.mark.parametrize("moba_decode", [False, True])
def test_paged_moba_equals_reference_per_sequence(moba_decode):
    rng = np.random.default_rng(3)
    n, kh, h, g = 4, 2, 8, 4
    lens_cached, lens_new = [0, 21, 13, 30], [17, 6, 1, 1]  # prefill, chunk after a prefix, decodes
    k_pages, v_pages, meta, positions = build_paged_batch(rng, lens_cached, lens_new, g, 40, kh, h)
    t = len(positions)
    q, k_new, v_new = rand(rng, 1, t, n, h), rand(rng, 1, t, kh, h), rand(rng, 1, t, kh, h)
    moba = MobaSpec(block_size=8, top_k=2, decode=moba_decode)
    cache = PagedKVCache(jnp.asarray(k_pages), jnp.asarray(v_pages), meta)
    out, cache = attend(q, k_new, v_new, jnp.asarray(positions)[None], cache, AttentionSpec(moba=moba), scale=SCALE)
    start = 0
    for r, (c, m) in enumerate(zip(lens_cached, lens_new)):
        rows = slice(start, start + m)
        slots = [meta.page_table[r, p // g] * g + p % g for p in range(c + m)]
        keys = jnp.asarray(np.asarray(cache.k_pages).reshape(-1, kh, h)[np.asarray(slots)])
        values = jnp.asarray(np.asarray(cache.v_pages).reshape(-1, kh, h)[np.asarray(slots)])
        if m > 1 or moba_decode:
            want = moba_attention_reference(q[0, rows], keys, values, block_size=8, top_k=2, scale=SCALE)
        else:
            want = dense_attention_reference(q[:, rows], keys[None], values[None], jnp.array([[c]]),
                                             jnp.arange(c + 1)[None], scale=SCALE)[0]
        np.testing.assert_allclose(np.asarray(out[0, rows]), np.asarray(want), atol=2e-5)
        start += m


def test_bad_moba_arguments():
    with pytest.raises(ValueError, match="block_size and top_k must be >= 1"):
        MobaSpec(block_size=0, top_k=2)
    with pytest.raises(ValueError, match="no MoBA mode"):
        AttentionSpec(impl="pallas", moba=MobaSpec(64, 3))
