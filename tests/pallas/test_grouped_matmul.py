"""grouped_matmul: the Triton kernel in interpret mode and the references against lax.ragged_dot
and naive maths over ragged group sizes (empty groups, groups splitting tiles, rows past the
groups), the fixed-capacity reference's overflow count, Triton lowering, GPU runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.pallas.grouped_matmul import (
    GroupedMatmulConfig,
    GroupedMatmulMosaicConfig,
    capacity_matmul_reference,
    grouped_matmul,
    grouped_matmul_mosaic,
    grouped_matmul_reference,
    mosaic_config_for,
    work_list,
)
from tests.pallas.conftest import assert_close

F32, BF16 = jnp.float32, jnp.bfloat16
SMALL = GroupedMatmulConfig(block_m=16, block_n=16, block_k=16)

# (group sizes, rows M, K, N, dtype): empty groups, a group inside one tile, groups straddling
# tiles, rows past the last group, all rows in one group, no rows at all in groups
CASES = [
    ([5, 0, 17, 3], 30, 32, 48, F32),
    ([64, 64], 128, 64, 32, BF16),
    ([0, 0, 0], 20, 16, 16, F32),
    ([1, 80, 0, 2], 83, 48, 64, BF16),
    ([0, 0, 0, 0, 0, 0, 0, 37], 37, 32, 32, F32),
    ([3, 9, 1, 4, 7, 2, 8, 6], 52, 64, 48, F32),
]


def _inputs(seed, sizes, m, k, n, dtype):
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
    rhs = jnp.asarray(rng.standard_normal((len(sizes), k, n)) / np.sqrt(k), dtype)
    return lhs, rhs, jnp.asarray(sizes, jnp.int32)


def _naive(lhs, rhs, sizes):
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    start = 0
    for g, size in enumerate(sizes):
        out[start:start + size] = lhs[start:start + size] @ rhs[g]
        start += size
    return out


@pytest.mark.parametrize("sizes, m, k, n, dtype", CASES)
def test_kernel_matches_reference(sizes, m, k, n, dtype):
    lhs, rhs, gs = _inputs(m + n, sizes, m, k, n, dtype)
    out = grouped_matmul(lhs, rhs, gs, config=SMALL, interpret=True)
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close(out, grouped_matmul_reference(lhs, rhs, gs), dtype)
    assert not np.asarray(out[sum(sizes):], np.float32).any()  # rows past the groups are 0


@pytest.mark.parametrize("sizes, m, k, n, dtype", CASES[:3])
def test_references_match_ragged_dot_and_naive_maths(sizes, m, k, n, dtype):
    lhs, rhs, gs = _inputs(1, sizes, m, k, n, F32)
    ref = grouped_matmul_reference(lhs, rhs, gs)
    np.testing.assert_allclose(np.asarray(ref), _naive(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)
    ragged = jax.lax.ragged_dot(lhs, rhs, gs, precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(np.asarray(ref), np.asarray(ragged), rtol=1e-5, atol=1e-5)


def test_capacity_reference_counts_overflow():
    sizes = [2, 11, 0, 5]
    lhs, rhs, gs = _inputs(2, sizes, 20, 16, 16, F32)
    full, overflow = capacity_matmul_reference(lhs, rhs, gs, capacity=11)
    assert int(overflow) == 0
    np.testing.assert_allclose(np.asarray(full), _naive(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)
    capped, overflow = capacity_matmul_reference(lhs, rhs, gs, capacity=4)
    assert int(overflow) == (11 - 4) + (5 - 4)  # counted, not silently dropped
    kept = np.r_[0:2, 2:6, 13:17]
    np.testing.assert_allclose(np.asarray(capped)[kept], _naive(lhs, rhs, sizes)[kept], rtol=1e-5, atol=1e-5)


def test_work_list_covers_every_row_once():
    sizes = jnp.asarray([5, 0, 17, 3], jnp.int32)
    group, tile, lo, hi = (np.asarray(a) for a in work_list(sizes, 30, 8))
    covered = np.zeros(30, int)
    bounds = [0, 5, 5, 22, 25, 30]  # groups 0..3, then segment 4: the tail past the groups
    for g, t, a, b in zip(group, tile, lo, hi):
        assert t * 8 <= a <= b <= t * 8 + 8
        if b > a:  # the item's rows lie in its group
            assert bounds[g] <= a and b <= bounds[g + 1]
        covered[a:b] += 1
    assert (covered == 1).all()
    bounds = np.r_[0, np.cumsum([5, 0, 17, 3]), 30]
    for g, a, b in zip(group, lo, hi):
        if b > a:
            assert bounds[g] <= a and b <= bounds[g + 1]


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(lhs=jnp.zeros((4, 16, 1))), r"lhs must be \[M, K\]"),
        (dict(rhs=jnp.zeros((2, 32, 16))), r"contraction dims differ: lhs K=16, rhs K=32"),
        (dict(group_sizes=jnp.zeros(3, jnp.int32)), r"group_sizes must be int \[G=2\]"),
        (dict(rhs=jnp.zeros((2, 16, 16), BF16)), "must share a dtype"),
        (dict(lhs=jnp.zeros((4, 24)), rhs=jnp.zeros((2, 24, 16))), "K=24 must be a multiple of 16"),
    ],
)
def test_bad_inputs_raise(bad, match):
    args = dict(lhs=jnp.zeros((4, 16)), rhs=jnp.zeros((2, 16, 16)), group_sizes=jnp.zeros(2, jnp.int32))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        grouped_matmul(args["lhs"], args["rhs"], args["group_sizes"], interpret=True)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16, got 24"):
        GroupedMatmulConfig(block_n=24)


def test_lowers_to_triton(lower_for_gpu):
    lhs, rhs, gs = _inputs(3, [100, 28], 128, 128, 256, BF16)
    assert "__gpu$xla.gpu.triton" in lower_for_gpu(grouped_matmul, lhs, rhs, gs)


GPU_CASES = [([300, 0, 212, 488], 1024, 256, 512), ([1000, 24], 1100, 512, 256)]


@pytest.mark.gpu
@pytest.mark.parametrize("sizes, m, k, n", GPU_CASES)
def test_gpu_triton_matches_reference(sizes, m, k, n):
    lhs, rhs, gs = _inputs(4, sizes, m, k, n, BF16)
    assert_close(grouped_matmul(lhs, rhs, gs), grouped_matmul_reference(lhs, rhs, gs), BF16)


@pytest.mark.gpu
@pytest.mark.parametrize("sizes, m, k, n", GPU_CASES)
def test_gpu_mosaic_matches_reference(sizes, m, k, n):
    if "H100" not in jax.devices()[0].device_kind and "H200" not in jax.devices()[0].device_kind:
        pytest.skip("the Mosaic GPU kernel needs a Hopper GPU")
    lhs, rhs, gs = _inputs(5, sizes, m, k, n, BF16)
    out = grouped_matmul_mosaic(lhs, rhs, gs, config=GroupedMatmulMosaicConfig(block_n=128, grid_block_n=1))
    total = sum(sizes)
    assert_close(out[:total], grouped_matmul_reference(lhs, rhs, gs)[:total], BF16)


def test_work_list_has_no_while_loop():
    """searchsorted unrolled: on the GPU a while loop costs launches and copies per step."""
    jaxpr = jax.make_jaxpr(lambda gs: work_list(gs, 256, 64))(jnp.ones(128, jnp.int32))
    assert "while" not in str(jaxpr)


def test_mosaic_config_for_fits_or_declines():
    base = GroupedMatmulMosaicConfig()
    assert mosaic_config_for(2048, 768) == base  # 768 = 3 x (128 x 2)
    assert mosaic_config_for(256, 128) == GroupedMatmulMosaicConfig(grid_block_n=1)
    assert mosaic_config_for(32, 128) is None and mosaic_config_for(256, 96) is None
