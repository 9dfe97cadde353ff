"""qk_norm_rope in interpret mode against the model path (RMSNorm then rope), with and without
the norm, GQA head counts, rope scalings, argument errors, Triton lowering, a GPU run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.models.config import RopeConfig
from mobajax.models.rope import inverse_frequencies
from mobajax.pallas.qk_norm_rope import norm_rope_reference, qk_norm_rope
from tests.pallas.conftest import assert_close

ROPES = [RopeConfig(theta=10000.0), RopeConfig(theta=1e6, rope_type="yarn", factor=4.0, original_max_position_embeddings=64)]


def _inputs(seed, t, n, kh, h, dtype, norm):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((t, n, h)) * 3, dtype)
    k = jnp.asarray(rng.standard_normal((t, kh, h)), dtype)
    positions = jnp.asarray(rng.integers(0, 5000, t), jnp.int32)
    scales = (jnp.asarray(rng.uniform(0.5, 2, h), dtype), jnp.asarray(rng.uniform(0.5, 2, h), dtype)) if norm else (None, None)
    return q, k, positions, scales


@pytest.mark.parametrize("t,n,kh,h", [(1, 32, 4, 128), (5, 8, 8, 64), (3, 6, 2, 16)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("rope", ROPES)
def test_matches_model_path(t, n, kh, h, dtype, norm, rope):
    q, k, positions, (qs, ks) = _inputs(t * n + h, t, n, kh, h, dtype, norm)
    inv_freq, factor = inverse_frequencies(rope, h)
    got_q, got_k = qk_norm_rope(q, k, positions, jnp.asarray(inv_freq), attention_factor=factor, q_scale=qs,
                                k_scale=ks, eps=1e-6, interpret=True)
    assert got_q.dtype == got_k.dtype == dtype and got_q.shape == q.shape and got_k.shape == k.shape
    # positions up to 5000 make angles ~5000 rad: float32 cos/sin of such angles differ by ~1e-4
    tol = 2e-2 if dtype == jnp.bfloat16 else 5e-4
    for got, x, s in ((got_q, q, qs), (got_k, k, ks)):
        want = norm_rope_reference(x, positions, inv_freq, factor, s, 1e-6)
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)


def test_bad_arguments_are_named():
    q, k = jnp.zeros((2, 4, 16)), jnp.zeros((2, 2, 16))
    freq = jnp.ones(8)
    with pytest.raises(ValueError, match="must share T and H"):
        qk_norm_rope(q, jnp.zeros((3, 2, 16)), jnp.zeros(2, jnp.int32), freq)
    with pytest.raises(ValueError, match="head dim must be a power of two"):
        qk_norm_rope(jnp.zeros((2, 4, 24)), jnp.zeros((2, 2, 24)), jnp.zeros(2, jnp.int32), jnp.ones(12))
    with pytest.raises(ValueError, match=r"positions must be \[2\] and inv_freq \[8\]"):
        qk_norm_rope(q, k, jnp.zeros(3, jnp.int32), freq)
    with pytest.raises(ValueError, match="q_scale and k_scale must both be"):
        qk_norm_rope(q, k, jnp.zeros(2, jnp.int32), freq, q_scale=jnp.ones(16))


def test_lowers_to_triton(lower_for_gpu):
    q, k = jnp.zeros((3, 32, 128), jnp.bfloat16), jnp.zeros((3, 4, 128), jnp.bfloat16)
    text = lower_for_gpu(qk_norm_rope, q, k, jnp.zeros(3, jnp.int32), jnp.ones(64), q_scale=jnp.ones(128),
                         k_scale=jnp.ones(128))
    assert "qk_norm_rope" in text


@pytest.mark.gpu
@pytest.mark.parametrize("norm", [False, True])
def test_gpu_matches_model_path(norm):
    q, k, positions, (qs, ks) = _inputs(0, 300, 32, 8, 128, jnp.bfloat16, norm)
    inv_freq, factor = inverse_frequencies(ROPES[0], 128)
    got_q, got_k = qk_norm_rope(q, k, positions, jnp.asarray(inv_freq), attention_factor=factor, q_scale=qs, k_scale=ks)
    for got, x, s in ((got_q, q, qs), (got_k, k, ks)):
        assert_close(got, norm_rope_reference(x, positions, inv_freq, factor, s, 1e-6), jnp.bfloat16)
