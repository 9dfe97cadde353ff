"""decode_matmul in interpret mode against a float32 dot over grids of rows, widths, splits and
dtypes; argument errors; Triton lowering; a GPU run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.pallas.decode_matmul import DecodeMatmulConfig, decode_matmul
from tests.pallas.conftest import assert_close


def _inputs(seed, m, k, widths, dtype):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    return x, [jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype) for n in widths]


def _reference(x, weights):
    w = jnp.concatenate([a.astype(jnp.float32) for a in weights], axis=1)
    return jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "m,k,widths,config",
    [
        (1, 256, (128,), DecodeMatmulConfig(block_n=32, splits=1, chunk=64)),
        (2, 256, (128, 32, 32), DecodeMatmulConfig(block_n=64, splits=1, chunk=32)),
        (5, 128, (64, 16, 16), DecodeMatmulConfig(block_n=64, splits=4, chunk=64)),
        (16, 512, (96,), DecodeMatmulConfig(block_n=64, splits=2, chunk=128)),
        (3, 64, (48, 80), DecodeMatmulConfig(block_n=128, splits=8, chunk=16)),
    ],
)
def test_matches_a_float32_dot(m, k, widths, config, dtype):
    x, weights = _inputs(m * k, m, k, widths, dtype)
    got = decode_matmul(x, weights, config=config, interpret=True)
    assert got.shape == (m, sum(widths)) and got.dtype == dtype
    assert_close(got, _reference(x, weights).astype(dtype), dtype, "decode_matmul")


def test_splits_shrink_to_the_contraction():
    """More splits than 16-row pieces of K: as many splits as there are pieces."""
    x, weights = _inputs(0, 1, 32, (16,), jnp.float32)
    got = decode_matmul(x, weights, config=DecodeMatmulConfig(splits=8), interpret=True)
    assert_close(got, _reference(x, weights), jnp.float32, "two splits")


@pytest.mark.parametrize("widths,splits", [((3072, 512, 512), 1), ((1024,), 8), ((64,), 16)])
def test_partial_sums_and_automatic_splits(widths, splits):
    """sum_splits=False returns the float32 partial sums [M, S, N]; automatic splits: one split
    from MIN_BLOCKS column blocks of 64 on, else enough for MIN_PROGRAMS programs (at most K / 16)."""
    x, weights = _inputs(1, 3, 256, widths, jnp.bfloat16)
    parts = decode_matmul(x, weights, sum_splits=False, interpret=True)
    assert parts.shape == (3, splits, sum(widths)) and parts.dtype == jnp.float32
    assert_close(parts.sum(1).astype(jnp.bfloat16), _reference(x, weights).astype(jnp.bfloat16), jnp.bfloat16,
                 "partial sums")


def test_bad_arguments_are_named():
    x, weights = _inputs(0, 2, 64, (32,), jnp.float32)
    with pytest.raises(ValueError, match=r"x must be \[M, K\] and weights \[K, N_i\]"):
        decode_matmul(x, [jnp.zeros((32, 32))])
    with pytest.raises(ValueError, match=r"x must be \[M, K\]"):
        decode_matmul(x, [])
    with pytest.raises(ValueError, match=r"weights must share one dtype"):
        decode_matmul(x, [weights[0], weights[0].astype(jnp.bfloat16)])
    with pytest.raises(ValueError, match=r"takes 1..16 rows and K, N_i multiples of 16, got M=17"):
        decode_matmul(jnp.zeros((17, 64)), weights)
    with pytest.raises(ValueError, match=r"N=\[24\]"):
        decode_matmul(x, [jnp.zeros((64, 24))])
    with pytest.raises(ValueError, match=r"block_n must be a power of two >= 16, got 8"):
        DecodeMatmulConfig(block_n=8)
    with pytest.raises(ValueError, match=r"splits must be a power of two or None, got 3"):
        DecodeMatmulConfig(splits=3)


def test_lowers_to_triton(lower_for_gpu):
    x, weights = _inputs(0, 1, 2048, (512, 64, 64), jnp.bfloat16)
    assert "decode_matmul" in lower_for_gpu(decode_matmul, x, weights)


@pytest.mark.gpu
def test_gpu_matches_a_float32_dot():
    for m, splits in ((1, 1), (4, 1), (1, 4), (16, 2)):
        x, weights = _inputs(m, m, 2048, (4096, 512, 512), jnp.bfloat16)
        got = decode_matmul(x, weights, config=DecodeMatmulConfig(splits=splits))
        assert_close(got, _reference(x, weights).astype(got.dtype), got.dtype, f"{m} rows, {splits} splits")
