"""MoBA in the attention dispatch (dense and paged XLA paths) against the MoBA reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.attention import (
    AttentionSpec,
    KVCache,
    PagedKVCache,
    PagedMetadata,
    attend,
    dense_attention_reference,
)
from mobajax.moba import moba_attention_reference, moba_selected_chunks
from mobajax.moba_masks import MobaSpec, contiguous_chunk_means, paged_chunk_means, selected_chunk_mask
from tests.test_attention import build_paged_batch

SCALE = 0.3
POISON = 1e4  # stale pool contents and key sums: large, so any that leaks into a gate or softmax shows


def rand(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def held_key_sums(k_pages, page_table, kv_lens, sums):
    """sums [P, K, H] with each sequence's pages set to the sum of the keys it holds (numpy)."""
    g = k_pages.shape[1]
    sums = np.array(sums)
    for pages, n in zip(np.asarray(page_table), np.asarray(kv_lens)):
        for j in range(-(-int(n) // g)):
            sums[pages[j]] = np.asarray(k_pages)[pages[j], : min(g, n - j * g)].sum(0)
    return sums


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
    for pages, c in zip(np.asarray(meta.page_table), lens_cached):  # stale keys past the cached ones
        k_pages.reshape(-1, kh, h)[(pages[:, None] * g + np.arange(g)).reshape(-1)[c:]] = POISON
    k_sums = held_key_sums(k_pages, meta.page_table, lens_cached, np.full((40, kh, h), POISON, np.float32))
    t = len(positions)
    q, k_new, v_new = rand(rng, 1, t, n, h), rand(rng, 1, t, kh, h), rand(rng, 1, t, kh, h)
    moba = MobaSpec(block_size=8, top_k=2, decode=moba_decode)
    cache = PagedKVCache(jnp.asarray(k_pages), jnp.asarray(v_pages), meta, jnp.asarray(k_sums))
    out, cache = attend(q, k_new, v_new, jnp.asarray(positions)[None], cache, AttentionSpec(moba=moba), scale=SCALE)
    want_sums = held_key_sums(cache.k_pages, meta.page_table, meta.kv_lens, k_sums)  # stale keys left out
    np.testing.assert_allclose(np.asarray(cache.k_sums), want_sums, rtol=1e-6)
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


def test_chunk_means_from_page_sums_equal_means_of_the_keys():
    """The gate's chunk means from page sums equal those of the keys themselves (complete chunks)."""
    rng = np.random.default_rng(4)
    g, kh, h, block = 4, 2, 8, 16
    k_pages = rng.standard_normal((30, g, kh, h)).astype(np.float32)
    page_table = rng.permutation(30)[:24].reshape(3, 8)
    kv_lens = np.array([32, 17, 9])
    sums = held_key_sums(k_pages, page_table, kv_lens, np.full((30, kh, h), POISON, np.float32))
    got = paged_chunk_means(jnp.asarray(sums), jnp.asarray(page_table), jnp.asarray(kv_lens), block, g)
    for r, n in enumerate(kv_lens):
        keys = k_pages[page_table[r]].reshape(-1, kh, h)[None]
        complete = n // block
        want = contiguous_chunk_means(jnp.asarray(keys), block)[0, :complete]
        np.testing.assert_allclose(np.asarray(got[r, :complete]), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got[:, 2:]) == 0)  # beyond the longest sequence's complete chunks


def _step_meta(tables, work, g):
    """PagedMetadata of one step: work is [(sequence, first position, count)] in batch order."""
    slots, seq = [], []
    for r, (name, start, count) in enumerate(work):
        slots += [tables[name][p // g] * g + p % g for p in range(start, start + count)]
        seq += [r] * count
    counts = [count for _, _, count in work]
    return PagedMetadata(
        jnp.asarray(slots, jnp.int32),
        jnp.asarray(np.stack([tables[name] for name, _, _ in work]), jnp.int32),
        jnp.asarray(np.cumsum([0] + counts), jnp.int32),
        jnp.asarray([start + count for _, start, count in work], jnp.int32),
        jnp.asarray(seq, jnp.int32),
    )


@pytest.mark.parametrize("moba_decode", [False, True])
def test_paged_moba_steps_keep_page_sums(moba_decode):
    """Several steps over one pool whose keys and page sums start as large garbage: chunked prefill
    (many tokens per page), decodes, a sequence on the reused pages of a finished one, and a prefix
    hit on another sequence's pages. Every step equals the MoBA reference; every page sum stays the
    sum of the keys its sequence holds."""
    rng = np.random.default_rng(5)
    n, kh, h, g, num_pages = 4, 2, 8, 4, 24
    moba = MobaSpec(block_size=8, top_k=2, decode=moba_decode)
    perm = rng.permutation(num_pages)
    tables = {"a": perm[:8], "b": perm[8:16], "c": perm[8:16], "d": np.concatenate([perm[:2], perm[16:22]])}
    lengths = {"a": 30, "b": 6, "c": 25, "d": 17}
    seqs = {name: (rand(rng, m, n, h), rand(rng, m, kh, h), rand(rng, m, kh, h)) for name, m in lengths.items()}
    q_d, k_d, v_d = seqs["d"]  # d's first 8 keys are a's first chunk: its prefix comes from a's pages
    seqs["d"] = (q_d, k_d.at[:8].set(seqs["a"][1][:8]), v_d.at[:8].set(seqs["a"][2][:8]))
    steps = [
        [("a", 0, 13), ("b", 0, 6)],
        [("a", 13, 16), ("c", 0, 9)],  # b has finished: c writes over its pages
        [("a", 29, 1), ("c", 9, 13), ("d", 8, 9)],
        [("c", 22, 3)],
    ]
    k_pages, v_pages = (POISON * rand(rng, num_pages, g, kh, h) for _ in range(2))
    k_sums = POISON * rand(rng, num_pages, kh, h)
    for work in steps:
        meta = _step_meta(tables, work, g)
        new = (jnp.concatenate([seqs[name][i][s : s + c] for name, s, c in work])[None] for i in range(3))
        positions = jnp.concatenate([jnp.arange(s, s + c) for _, s, c in work])[None]
        cache = PagedKVCache(k_pages, v_pages, meta, k_sums)
        out, cache = attend(*new, positions, cache, AttentionSpec(moba=moba), scale=SCALE)
        k_pages, v_pages, k_sums = cache.k_pages, cache.v_pages, cache.k_sums
        row = 0
        for name, s, c in work:
            q, k, v = (x[: s + c] for x in seqs[name])
            if c > 1 or moba_decode:
                want = moba_attention_reference(q[s:], k, v, block_size=8, top_k=2, scale=SCALE)
            else:
                want = dense_attention_reference(q[None, s:], k[None], v[None], jnp.array([[s]]),
                                                 jnp.arange(s + 1)[None], scale=SCALE)[0]
            np.testing.assert_allclose(np.asarray(out[0, row : row + c]), np.asarray(want), atol=2e-5)
            row += c
        want_sums = held_key_sums(k_pages, meta.page_table, meta.kv_lens, k_sums)
        np.testing.assert_allclose(np.asarray(k_sums), want_sums, rtol=1e-6)


def test_bad_moba_arguments():
    with pytest.raises(ValueError, match="block_size and top_k must be >= 1"):
        MobaSpec(block_size=0, top_k=2)
    with pytest.raises(ValueError, match="no MoBA mode"):
        AttentionSpec(impl="pallas", moba=MobaSpec(64, 3))
