"""rms_norm in interpret mode against the model's RMSNorm (XLA ops), argument errors, Triton
lowering, a GPU run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.models.layers import RMSNorm
from mobajax.pallas.rms_norm import rms_norm
from tests.pallas.conftest import assert_close


def _inputs(seed, m, d, dtype):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, d)) * 3, dtype)
    return x, jnp.asarray(1 + 0.1 * rng.standard_normal(d), dtype)


def _reference(x, scale, eps):
    return RMSNorm(eps, x.dtype).apply({"params": {"scale": scale}}, x)


@pytest.mark.parametrize("m,d,dtype", [(1, 2048, jnp.bfloat16), (3, 64, jnp.float32), (16, 256, jnp.bfloat16),
                                       (6, 16, jnp.float32)])
def test_matches_the_model_norm(m, d, dtype):
    x, scale = _inputs(m * d, m, d, dtype)
    got = rms_norm(x, scale, eps=1e-5, interpret=True)
    assert got.shape == x.shape and got.dtype == dtype
    assert_close(got, _reference(x, scale, 1e-5), dtype, "rms_norm")


def test_model_norm_takes_the_kernel_for_a_few_rows(monkeypatch):
    """RMSNorm(kernel=True) runs `rms_norm` up to KERNEL_ROWS rows and XLA ops beyond."""
    from mobajax.models import layers

    calls = []
    monkeypatch.setattr(layers, "rms_norm", lambda *a, **k: calls.append(a[0].shape) or rms_norm(*a, **k, interpret=True))
    for rows in (1, 16, 17):
        x, scale = _inputs(rows, rows, 64, jnp.float32)
        got = RMSNorm(1e-6, jnp.float32, kernel=True).apply({"params": {"scale": scale}}, x[None])
        assert_close(got[0], _reference(x, scale, 1e-6), jnp.float32, f"{rows} rows")
    assert calls == [(1, 64), (16, 64)]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"x must be \[M, D\] and scale \[D\]"):
        rms_norm(jnp.zeros((2, 64)), jnp.zeros((32,)), eps=1e-6)
    with pytest.raises(ValueError, match=r"D=48: rms_norm needs a power of two in 16..16384"):
        rms_norm(jnp.zeros((2, 48)), jnp.zeros((48,)), eps=1e-6)


def test_lowers_to_triton(lower_for_gpu):
    x, scale = _inputs(0, 1, 2048, jnp.bfloat16)
    assert "rms_norm" in lower_for_gpu(rms_norm, x, scale, eps=1e-6)


@pytest.mark.gpu
def test_gpu_matches_the_model_norm():
    for m in (1, 5, 16):
        x, scale = _inputs(m, m, 2048, jnp.bfloat16)
        assert_close(rms_norm(x, scale, eps=1e-6), jax.jit(_reference, static_argnums=2)(x, scale, 1e-6),
                     jnp.bfloat16, f"{m} rows")
