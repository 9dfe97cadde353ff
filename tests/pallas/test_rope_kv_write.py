"""rope_kv_write in interpret mode against the model's steps (RMSNorm, apply_rope) and
kv_write_reference: with and without q/k norm, rope scaling factors, padding slots, float32 and
bfloat16; argument errors; Triton lowering; a GPU run."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.models.layers import RMSNorm
from mobajax.models.rope import apply_rope
from mobajax.pallas.kv_write import kv_write_reference
from mobajax.pallas.rope_kv_write import rope_kv_write
from tests.pallas.conftest import assert_close


def _inputs(seed, t, n, kh, h, dtype, qk_norm, pages=6, g=4):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((t, n, h)) * 3, dtype)
    k = jnp.asarray(rng.standard_normal((t, kh, h)) * 3, dtype)
    v = jnp.asarray(rng.standard_normal((t, kh, h)), dtype)
    positions = jnp.asarray(rng.integers(0, 5000, t), jnp.int32)
    slots = rng.choice(pages * g, t, replace=False).astype(np.int32)
    slots[rng.random(t) < 0.25] = -1  # padding tokens
    k_pages = jnp.asarray(rng.standard_normal((pages, g, kh, h)), dtype)
    v_pages = jnp.asarray(rng.standard_normal((pages, g, kh, h)), dtype)
    scales = tuple(jnp.asarray(1 + 0.1 * rng.standard_normal(h), dtype) for _ in range(2)) if qk_norm else (None, None)
    inv_freq = (1.0 / 10000 ** (np.arange(0, h, 2) / h)).astype(np.float32)
    return q, k, v, positions, jnp.asarray(slots), k_pages, v_pages, inv_freq, scales


def _reference(q, k, v, positions, slots, k_pages, v_pages, inv_freq, scales, factor, eps):
    if scales[0] is not None:
        norm = lambda x, s: RMSNorm(eps, x.dtype).apply({"params": {"scale": s}}, x)  # noqa: E731
        q, k = norm(q, scales[0]), norm(k, scales[1])
    q = apply_rope(q[None], positions[None], inv_freq, factor)[0]
    k = apply_rope(k[None], positions[None], inv_freq, factor)[0]
    return (q, *kv_write_reference(k_pages, v_pages, k, v, slots))


@pytest.mark.parametrize("t,n,kh,h,dtype,qk_norm,factor", [
    (1, 32, 4, 128, jnp.bfloat16, True, 1.0),  # 4 query-head programs + 1 for k and v
    (5, 8, 2, 64, jnp.float32, True, 1.0),
    (3, 4, 4, 32, jnp.float32, False, 1.2),
    (6, 16, 8, 64, jnp.bfloat16, False, 1.0),
])
def test_matches_the_model_steps(t, n, kh, h, dtype, qk_norm, factor):
    args = _inputs(t * n + h, t, n, kh, h, dtype, qk_norm)
    q, k, v, positions, slots, k_pages, v_pages, inv_freq, (qs, ks) = args
    got = rope_kv_write(jnp.concatenate([q, k, v], axis=1), positions, slots, k_pages, v_pages, inv_freq,
                        num_heads=n, attention_factor=factor, q_scale=qs, k_scale=ks, eps=1e-6, interpret=True)
    want = _reference(*args, factor, 1e-6)
    for name, a, b in zip(("q", "k_pages", "v_pages"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_close(a, b, dtype, name)
    untouched = np.setdiff1d(np.arange(k_pages.shape[0] * k_pages.shape[1]), np.asarray(slots))
    flat = lambda x: np.asarray(x.reshape(-1, *x.shape[2:]), np.float32)[untouched]  # noqa: E731
    np.testing.assert_array_equal(flat(got[1]), flat(k_pages))  # slots not written keep their rows
    np.testing.assert_array_equal(flat(got[2]), flat(v_pages))


def test_rows_past_the_tokens_are_not_read():
    """A one-token GEMM's second row (here NaN) is neither written to the pool nor returned."""
    q, k, v, positions, slots, k_pages, v_pages, inv_freq, (qs, ks) = _inputs(2, 1, 8, 2, 64, jnp.float32, True)
    qkv = jnp.concatenate([q, k, v], axis=1)
    two = jnp.concatenate([qkv, jnp.full_like(qkv, jnp.nan)])
    slots = jnp.maximum(slots, 0)
    kw = dict(num_heads=8, q_scale=qs, k_scale=ks, interpret=True)
    one = rope_kv_write(qkv, positions, slots, k_pages, v_pages, inv_freq, **kw)
    got = rope_kv_write(two, positions, slots, k_pages, v_pages, inv_freq, **kw)
    assert got[0].shape == (1, 8, 64)
    for a, b in zip(got, one):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_arguments_are_named():
    q, k, v, positions, slots, k_pages, v_pages, inv_freq, (qs, ks) = _inputs(0, 2, 8, 2, 64, jnp.float32, True)
    qkv = jnp.concatenate([q, k, v], axis=1)
    call = lambda **kw: rope_kv_write(**{**dict(qkv=qkv, positions=positions, slots=slots, k_pages=k_pages,  # noqa: E731
                                              v_pages=v_pages, inv_freq=inv_freq, num_heads=8), **kw})
    with pytest.raises(ValueError, match=r"qkv must be \[T' >= T = 2, N \+ 2K = 12, H = 64\] \(N=8 query heads, K=2"):
        call(qkv=qkv[:, :10])
    with pytest.raises(ValueError, match=r"qkv must be \[T' >= T = 2"):
        call(qkv=qkv[:1])
    with pytest.raises(ValueError, match=r"N=6, K=2, H=64: must be powers of two"):
        call(qkv=qkv[:, :10], num_heads=6)
    with pytest.raises(ValueError, match=r"slots must be int32 \[T=2\]"):
        call(slots=jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match=r"give both q_scale and k_scale"):
        call(q_scale=qs)
    with pytest.raises(ValueError, match=r"inv_freq must be \[H/2=32\]"):
        call(inv_freq=inv_freq[:8])
    with pytest.raises(ValueError, match=r"k_pages and v_pages must both be \[P, G, K, H\]"):
        call(k_pages=k_pages[0])


def test_lowers_to_triton(lower_for_gpu):
    q, k, v, positions, slots, k_pages, v_pages, inv_freq, (qs, ks) = _inputs(1, 1, 32, 4, 128, jnp.bfloat16, True)
    text = lower_for_gpu(rope_kv_write, jnp.concatenate([q, k, v], axis=1), positions, slots, k_pages, v_pages,
                         inv_freq, num_heads=32, q_scale=qs, k_scale=ks)
    assert "rope_kv_write" in text


@pytest.mark.gpu
@pytest.mark.parametrize("qk_norm", [True, False])
def test_gpu_matches_the_model_steps(qk_norm):
    args = _inputs(3, 7, 32, 8, 128, jnp.bfloat16, qk_norm, pages=64, g=16)
    q, k, v, positions, slots, k_pages, v_pages, inv_freq, (qs, ks) = args
    got = rope_kv_write(jnp.concatenate([q, k, v], axis=1), positions, slots, k_pages, v_pages, inv_freq,
                        num_heads=32, q_scale=qs, k_scale=ks)
    want = _reference(*args, 1.0, 1e-6)
    for name, a, b in zip(("q", "k_pages", "v_pages"), got, want):
        assert_close(a, b, jnp.bfloat16, name)
