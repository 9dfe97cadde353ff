"""router_top_k in interpret mode against route_reference (softmax, top-k, renormalisation),
extreme logits, ties, argument errors, Triton lowering, a GPU run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.pallas.router_top_k import route_reference, router_top_k


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


def test_num_tokens_routes_the_first_rows_only():
    logits = jnp.asarray(np.random.default_rng(2).standard_normal((5, 32)), jnp.float32)
    weights, experts = router_top_k(logits, 4, True, num_tokens=2, interpret=True)
    want_w, want_e = route_reference(logits[:2], 4, True)
    assert weights.shape == experts.shape == (2, 4)
    np.testing.assert_array_equal(np.asarray(experts), np.asarray(want_e))
    np.testing.assert_allclose(np.asarray(weights), np.asarray(want_w), rtol=1e-6)
    with pytest.raises(ValueError, match=r"num_tokens must be in 0..5 \(the rows of logits\), got 6"):
        router_top_k(logits, 4, True, num_tokens=6)


def test_bfloat16_logits_are_routed_in_float32():
    logits = jnp.asarray(np.random.default_rng(1).standard_normal((9, 16)), jnp.bfloat16)
    weights, experts = router_top_k(logits, 3, True, interpret=True)
    want_w, want_e = route_reference(logits, 3, True)
    np.testing.assert_array_equal(np.asarray(experts), np.asarray(want_e))
    np.testing.assert_allclose(np.asarray(weights), np.asarray(want_w), rtol=1e-6)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"top_k must be in 1..8"):
        router_top_k(jnp.zeros((2, 8)), 9, True)
    with pytest.raises(ValueError, match=r"float \[M, E\] array"):
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
