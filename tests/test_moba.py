"""mobajax.moba: the MoBA reference against the spec written out in numpy and a dense-mask version."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.moba import (
    moba_attention_dense_mask,
    moba_attention_reference,
    moba_selected_chunks,
)


def _qkv(seed, t, s, n, kv, h, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((t, n, h)), dtype)
    k = jnp.asarray(rng.standard_normal((s, kv, h)), dtype)
    v = jnp.asarray(rng.standard_normal((s, kv, h)), dtype)
    return q, k, v


def _naive(q, k, v, block, top_k, pos):
    """The spec, token by token, in float64 numpy."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    t, n, h = q.shape
    s, kv = k.shape[:2]
    chunks = -(-s // block)
    kbar = np.stack([k[c * block : (c + 1) * block].mean(0) for c in range(chunks)])
    out = np.zeros_like(q)
    sel = np.full((t, n, top_k), -1)
    for i in range(t):
        p = int(pos[i])
        own = p // block
        for j in range(n):
            hk = j // (n // kv)
            gate = {c: q[i, j] @ kbar[c, hk] for c in range(own)}
            best = sorted(gate, key=lambda c: (-gate[c], c))[: top_k - 1]
            sel[i, j, : 1 + len(best)] = [own, *best]
            keys = [x for c in best for x in range(c * block, min((c + 1) * block, s))]
            keys += list(range(own * block, p + 1))
            logits = k[keys, hk] @ q[i, j] / np.sqrt(h)
            w = np.exp(logits - logits.max())
            out[i, j] = w @ v[keys, hk] / w.sum()
    return out, sel


CASES = [  # T, S, N, K, H, block, top_k
    (40, 40, 4, 4, 16, 8, 3),
    (37, 53, 8, 2, 16, 8, 2),  # T < S (prefix), partial last chunk, GQA 4
    (50, 50, 8, 1, 32, 16, 1),  # block-diagonal, GQA 8
    (45, 45, 2, 2, 16, 8, 99),  # top_k > chunks: plain causal
]


@pytest.mark.parametrize("t,s,n,kv,h,block,top_k", CASES)
def test_reference_matches_spec_in_numpy(t, s, n, kv, h, block, top_k):
    q, k, v = _qkv(0, t, s, n, kv, h)
    pos = s - t + np.arange(t)
    want, want_sel = _naive(q, k, v, block, top_k, pos)
    got = moba_attention_reference(q, k, v, block_size=block, top_k=top_k)
    sel = moba_selected_chunks(q, k, block_size=block, top_k=top_k)
    np.testing.assert_array_equal(np.asarray(sel), want_sel)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("t,s,n,kv,h,block,top_k", CASES)
def test_reference_matches_dense_mask(t, s, n, kv, h, block, top_k):
    q, k, v = _qkv(1, t, s, n, kv, h)
    a = moba_attention_reference(q, k, v, block_size=block, top_k=top_k)
    b = moba_attention_dense_mask(q, k, v, block_size=block, top_k=top_k)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)


def test_top_k_beyond_chunks_is_causal_attention_and_top_1_block_diagonal():
    q, k, v = _qkv(2, 48, 48, 4, 2, 16)
    pos = np.arange(48)
    causal = moba_attention_reference(q, k, v, block_size=8, top_k=6)
    logits = jnp.einsum("tkgh,skh->kgts", q.reshape(48, 2, 2, 16), k) / 4.0
    logits = jnp.where(pos[None, None, None, :] <= pos[None, None, :, None], logits, -jnp.inf)
    dense = jnp.einsum("kgts,skh->tkgh", jax.nn.softmax(logits, -1), v).reshape(48, 4, 16)
    np.testing.assert_allclose(np.asarray(causal), np.asarray(dense), atol=2e-5, rtol=2e-5)
    sel = np.asarray(moba_selected_chunks(q, k, block_size=8, top_k=1))
    np.testing.assert_array_equal(sel[..., 0], np.broadcast_to((pos // 8)[:, None], (48, 4)))


def test_ties_pick_the_lower_chunk():
    # every chunk has the same pooled key: all gate scores tie
    k = jnp.tile(jnp.asarray(np.random.default_rng(3).standard_normal((1, 1, 16)), jnp.float32),
                 (64, 1, 1))  # fmt: skip
    q, _, _ = _qkv(3, 64, 64, 2, 1, 16)
    sel = np.asarray(moba_selected_chunks(q, k, block_size=8, top_k=3))
    assert (sel[-1] == [7, 0, 1]).all(), sel[-1]
    assert (sel[8] == [1, 0, -1]).all(), sel[8]


def test_explicit_positions_and_bf16():
    q, k, v = _qkv(4, 24, 64, 4, 2, 16, jnp.bfloat16)
    pos = jnp.arange(10, 34)
    got = moba_attention_reference(q, k, v, block_size=8, top_k=2, q_positions=pos)
    want, _ = _naive(q, k, v, 8, 2, np.arange(10, 34))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2, rtol=2e-2)


def test_gradients_match_dense_mask():
    q, k, v = _qkv(5, 40, 40, 4, 2, 16)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, block_size=8, top_k=3)))

    ga = jax.grad(loss(moba_attention_reference), (0, 1, 2))(q, k, v)
    gb = jax.grad(loss(moba_attention_dense_mask), (0, 1, 2))(q, k, v)
    for a, b in zip(ga, gb):
        assert float(jnp.max(jnp.abs(a))) > 0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_public_name_in_attention_module():
    from mobajax import attention

    assert attention.moba_attention_reference is moba_attention_reference
    with pytest.raises(ValueError, match="block_size"):
        moba_attention_reference(*_qkv(0, 4, 4, 2, 2, 16), block_size=0, top_k=1)
