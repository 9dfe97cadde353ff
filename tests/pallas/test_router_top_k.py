"""router_top_k in interpret mode against route_reference (softmax, top-k, renormalisation),
extreme logits, ties, argument errors, Triton lowering, a GPU run; router_logits (partial logits
of a few tokens) against float64 products, and routed through router_top_k."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.pallas.router_top_k import route_reference, router_logits, router_top_k


@pytest.mark.parametrize("m,e,k", [(1, 128, 8), (5, 60, 4), (40, 8, 2), (17, 6, 6), (3, 1, 1), (33, 256, 16)])
@pytest.mark.parametrize("normalize", [False, True])
def test_matches_reference(m, e, k, normalize):
    logits = jnp.asarray(np.random.default_rng(m * e + k).standard_normal((m, e)) * 3, jnp.float32)
    weights, experts = router_top_k(logits, k, normalize, interpret=True)
    want_w, want_e = route_reference(logits, k, normalize)
    assert weights.shape == experts.shape == (m, k) and weights.dtype == jnp.float32 and experts.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(experts), np.asarray(want_e))
    np.testing.assert_allclose(np.asarray(weights), np.asarray(want_w), rtol=1e-6, atol=1e-7)


def test_extreme_logits_and_ties_follow_the_reference():
    """Huge logits stay finite and sum to 1; equal probabilities go to the lower expert index."""
    logits = jnp.asarray([[1e30, -1e30, 5.0, 1e30, 0.0, 0.0],
                          [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                          [-3e38, 3e38, 2.0, 2.0, -1.0, 7.0]], jnp.float32)
    for normalize in (False, True):
        weights, experts = router_top_k(logits, 4, normalize, interpret=True)
        want_w, want_e = route_reference(logits, 4, normalize)
        np.testing.assert_array_equal(np.asarray(experts), np.asarray(want_e))
        np.testing.assert_allclose(np.asarray(weights), np.asarray(want_w), rtol=1e-6)
        assert np.isfinite(np.asarray(weights)).all()
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)


def test_bfloat16_logits_are_routed_in_float32():
    logits = jnp.asarray(np.random.default_rng(1).standard_normal((9, 16)), jnp.bfloat16)
    weights, experts = router_top_k(logits, 3, True, interpret=True)
    want_w, want_e = route_reference(logits, 3, True)
    np.testing.assert_array_equal(np.asarray(experts), np.asarray(want_e))
    np.testing.assert_allclose(np.asarray(weights), np.asarray(want_w), rtol=1e-6)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"top_k must be in 1..8"):
        router_top_k(jnp.zeros((2, 8)), 9, True)
    with pytest.raises(ValueError, match=r"float \[M, E\] \(or \[S, M, E\]\) array"):
        router_top_k(jnp.zeros((2, 8), jnp.int32), 2, True)
    with pytest.raises(ValueError, match=r"number of experts must be in 1..1024"):
        router_top_k(jnp.zeros((2, 2048)), 2, True)


def test_lowers_to_triton(lower_for_gpu):
    text = lower_for_gpu(router_top_k, jnp.zeros((3, 128), jnp.float32), 8, True)
    assert "router_top_k" in text


@pytest.mark.gpu
def test_gpu_matches_reference():
    logits = jax.random.normal(jax.random.key(0), (1000, 128), jnp.float32) * 2
    weights, experts = router_top_k(logits, 8, True)
    want_w, want_e = route_reference(logits, 8, True)
    np.testing.assert_array_equal(np.asarray(experts), np.asarray(want_e))
    np.testing.assert_allclose(np.asarray(weights), np.asarray(want_w), rtol=1e-5)


@pytest.mark.parametrize("m,d,e,dtype,w_dtype", [
    (1, 256, 128, jnp.bfloat16, jnp.bfloat16),  # 4 splits of one 64-row step
    (16, 2048, 8, jnp.float32, jnp.float32),  # 8 splits of four steps, E padded to 16
    (3, 48, 6, jnp.float32, jnp.bfloat16),  # 1 split of three 16-row steps, mixed dtypes
    (2, 96, 60, jnp.bfloat16, jnp.float32),  # 1 split of three 32-row steps, mixed dtypes
])
def test_router_logits_sum_to_the_float32_product(m, d, e, dtype, w_dtype):
    """Partial logits over splits of D sum to x @ w: every product exact and the sums in float32,
    so within float32 rounding of the float64 product of the same inputs."""
    rng = np.random.default_rng(m * d + e)
    x = jnp.asarray(rng.standard_normal((m, d)), dtype)
    w = jnp.asarray(rng.standard_normal((d, e)) * 2 / np.sqrt(d), w_dtype)  # logits of order 1
    parts = router_logits(x, w, interpret=True)
    assert parts.dtype == jnp.float32 and parts.shape[1:] == (m, e)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    np.testing.assert_allclose(np.asarray(parts).sum(0), want, rtol=1e-5, atol=1e-5)
    for normalize in (False, True):
        k = min(e, 4)
        weights, experts = router_top_k(parts, k, normalize, interpret=True)
        want_w, want_e = route_reference(jnp.asarray(want, jnp.float32), k, normalize)
        np.testing.assert_array_equal(np.asarray(experts), np.asarray(want_e))
        np.testing.assert_allclose(np.asarray(weights), np.asarray(want_w), rtol=1e-5, atol=1e-7)


def test_router_logits_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"takes 1..16 tokens, got 17"):
        router_logits(jnp.zeros((17, 64)), jnp.zeros((64, 8)))
    with pytest.raises(ValueError, match=r"x must be \[M, D\] and w \[D, E\]"):
        router_logits(jnp.zeros((2, 64)), jnp.zeros((32, 8)))
    with pytest.raises(ValueError, match=r"number of experts must be in 1..1024"):
        router_logits(jnp.zeros((2, 64)), jnp.zeros((64, 2048)))
    with pytest.raises(ValueError, match=r"D a multiple of 16, got 40"):
        router_logits(jnp.zeros((2, 40)), jnp.zeros((40, 8)))


def test_router_logits_lower_to_triton(lower_for_gpu):
    text = lower_for_gpu(router_logits, jnp.zeros((1, 2048), jnp.bfloat16), jnp.zeros((2048, 128), jnp.bfloat16))
    assert "router_logits" in text


@pytest.mark.gpu
def test_gpu_router_logits_route_like_the_reference():
    x = jax.random.normal(jax.random.key(1), (4, 2048), jnp.bfloat16)
    w = (jax.random.normal(jax.random.key(2), (2048, 128), jnp.float32) * 0.02).astype(jnp.bfloat16)
    parts = router_logits(x, w)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    np.testing.assert_allclose(np.asarray(parts).sum(0), want, rtol=1e-5, atol=1e-5)
    weights, experts = router_top_k(parts, 8, True)
    want_w, want_e = route_reference(jnp.asarray(want, jnp.float32), 8, True)
    np.testing.assert_array_equal(np.asarray(experts), np.asarray(want_e))
    np.testing.assert_allclose(np.asarray(weights), np.asarray(want_w), rtol=1e-5)
