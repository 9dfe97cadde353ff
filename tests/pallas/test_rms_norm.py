"""rms_norm and add_rms_norm in interpret mode against the model's RMSNorm (XLA ops), argument
errors, Triton lowering, a GPU run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.models.layers import RMSNorm
from mobajax.pallas.rms_norm import add_rms_norm, rms_norm
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
    monkeypatch.setattr(layers, "rms_norm",
                        lambda *a, **k: calls.append(a[0].shape) or rms_norm(*a, **k, interpret=True))
    for rows in (1, 16, 17):
        x, scale = _inputs(rows, rows, 64, jnp.float32)
        got = RMSNorm(1e-6, jnp.float32, kernel=True).apply({"params": {"scale": scale}}, x[None])
        assert_close(got[0], _reference(x, scale, 1e-6), jnp.float32, f"{rows} rows")
    assert calls == [(1, 64), (16, 64)]


def _update(seed, m, splits, d, dtype):
    """splits 0: an [M, D] update in dtype; else float32 partial sums [M, S, D]."""
    rng = np.random.default_rng(seed)
    if not splits:
        return jnp.asarray(rng.standard_normal((m, d)), dtype)
    return jnp.asarray(rng.standard_normal((m, splits, d)), jnp.float32)


@pytest.mark.parametrize("m,splits,d,dtype", [(1, 4, 2048, jnp.bfloat16), (3, 0, 64, jnp.float32),
                                              (16, 2, 256, jnp.bfloat16), (5, 8, 16, jnp.float32)])
def test_add_rms_norm_adds_then_normalises(m, splits, d, dtype):
    x, scale = _inputs(m + d, m, d, dtype)
    update = _update(m, m, splits, d, dtype)
    h, normed = add_rms_norm(update, x, scale, eps=1e-5, interpret=True)
    want = x + (jnp.sum(update, axis=1) if splits else update).astype(dtype)
    assert h.dtype == normed.dtype == dtype and h.shape == normed.shape == (m, d)
    assert_close(h, want, dtype, "residual sum")
    assert_close(normed, _reference(want, scale, 1e-5), dtype, "norm of the sum")


def test_model_norm_with_residual_takes_add_rms_norm(monkeypatch):
    """RMSNorm(kernel=True)(update, residual=x) runs `add_rms_norm` for a few rows (a plain update
    or a `SplitSum`) and XLA ops beyond; the XLA ops give the same (sum, norm)."""
    from mobajax.models import layers
    from mobajax.models.layers import SplitSum

    calls = []
    monkeypatch.setattr(layers, "add_rms_norm",
                        lambda *a, **k: calls.append(a[0].shape) or add_rms_norm(*a, **k, interpret=True))
    for rows, splits, kernel in ((2, 4, True), (2, 0, True), (17, 2, True), (2, 4, False)):
        x, scale = _inputs(rows, rows, 64, jnp.float32)
        update = _update(rows, rows, splits, 64, jnp.float32)
        norm = RMSNorm(1e-6, jnp.float32, kernel=kernel)
        h, normed = norm.apply({"params": {"scale": scale}}, SplitSum(update) if splits else update[None],
                               residual=x[None])
        want = x + (jnp.sum(update, axis=1) if splits else update)
        assert_close(h[0], want, jnp.float32, f"{rows} rows sum")
        assert_close(normed[0], _reference(want, scale, 1e-6), jnp.float32, f"{rows} rows norm")
    assert calls == [(2, 4, 64), (2, 64)]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"x must be \[M, D\] and scale \[D\]"):
        rms_norm(jnp.zeros((2, 64)), jnp.zeros((32,)), eps=1e-6)
    with pytest.raises(ValueError, match=r"D=48: rms_norm needs a power of two in 16..16384"):
        rms_norm(jnp.zeros((2, 48)), jnp.zeros((48,)), eps=1e-6)
    with pytest.raises(ValueError, match=r"update must be \[M=2, D=64\] or partial sums \[M, S, D\], got \(3, 64\)"):
        add_rms_norm(jnp.zeros((3, 64)), jnp.zeros((2, 64)), jnp.zeros((64,)), eps=1e-6)
    with pytest.raises(ValueError, match=r"residual must be \[M, D\] and scale \[D\]"):
        add_rms_norm(jnp.zeros((2, 64)), jnp.zeros((2, 64)), jnp.zeros((32,)), eps=1e-6)


def test_lowers_to_triton(lower_for_gpu):
    x, scale = _inputs(0, 1, 2048, jnp.bfloat16)
    assert "rms_norm" in lower_for_gpu(rms_norm, x, scale, eps=1e-6)
    assert "add_rms_norm" in lower_for_gpu(add_rms_norm, _update(0, 1, 4, 2048, jnp.float32), x, scale, eps=1e-6)


@pytest.mark.gpu
def test_gpu_matches_the_model_norm():
    for m in (1, 5, 16):
        x, scale = _inputs(m, m, 2048, jnp.bfloat16)
        assert_close(rms_norm(x, scale, eps=1e-6), jax.jit(_reference, static_argnums=2)(x, scale, 1e-6),
                     jnp.bfloat16, f"{m} rows")
        update = _update(m, m, 4, 2048, jnp.float32)
        h, normed = add_rms_norm(update, x, scale, eps=1e-6)
        want = x + jnp.sum(update, axis=1).astype(jnp.bfloat16)
        assert_close(h, want, jnp.bfloat16, f"{m} rows sum")
        assert_close(normed, jax.jit(_reference, static_argnums=2)(want, scale, 1e-6), jnp.bfloat16, f"{m} rows norm")
