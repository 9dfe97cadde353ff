"""merge_states_kernel in interpret mode against merge_states: random splits of real attention,
empty parts (lse -inf, NaN out), all-empty rows, more parts than one chunk, errors, lowering, GPU."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.pallas.attention_chunk import merge_states
from mobajax.pallas.merge_kernel import merge_states_kernel


def _parts(seed, c, m, h, empty=0.0):
    rng = np.random.default_rng(seed)
    outs = rng.standard_normal((c, m, h)).astype(np.float32)
    lses = (rng.standard_normal((c, m)) * 4).astype(np.float32)
    gone = rng.random((c, m)) < empty
    lses[gone] = -np.inf
    outs[gone] = np.nan
    return jnp.asarray(outs), jnp.asarray(lses)


@pytest.mark.parametrize("c,m,h,empty", [(1, 3, 16, 0.0), (3, 5, 64, 0.3), (32, 4, 128, 0.5), (70, 2, 128, 0.2)])
def test_matches_merge_states(c, m, h, empty):
    outs, lses = _parts(c * m, c, m, h, empty)
    out, lse = merge_states_kernel(outs, lses, interpret=True)
    want_out, want_lse = merge_states(outs, lses)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), rtol=1e-6)


def test_all_empty_row_is_zero_and_minus_inf_and_out_dtype():
    outs, lses = _parts(0, 40, 3, 32)
    lses = lses.at[:, 1].set(-jnp.inf)
    outs = outs.at[:, 1].set(jnp.nan)
    out, lse = merge_states_kernel(outs, lses, out_dtype=jnp.bfloat16, interpret=True)
    assert out.dtype == jnp.bfloat16 and np.all(np.asarray(out[1], np.float32) == 0) and np.asarray(lse)[1] == -np.inf
    want_out, _ = merge_states(outs, lses)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want_out), rtol=1e-2, atol=1e-2)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"outs must be \[C, M, H\] and lses \[C, M\]"):
        merge_states_kernel(jnp.zeros((2, 3, 16)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="head dim must be a power of two >= 16, got 24"):
        merge_states_kernel(jnp.zeros((2, 3, 24)), jnp.zeros((2, 3)))


def test_lowers_to_triton(lower_for_gpu):
    assert "merge_states" in lower_for_gpu(merge_states_kernel, jnp.zeros((32, 64, 128)), jnp.zeros((32, 64)))


@pytest.mark.gpu
def test_gpu_matches_merge_states():
    outs, lses = _parts(1, 48, 256, 128, 0.2)
    out, lse = merge_states_kernel(outs, lses)
    want_out, want_lse = merge_states(outs, lses)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), rtol=1e-5)
