"""moe_decode: the per-assignment expert kernels in interpret mode against the reference and the
grouped path (`run_experts` with ragged_dot), experts held elsewhere (ids outside 0..E-1),
argument errors, Triton lowering, GPU runs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.models.moe import run_experts
from mobajax.pallas.moe_decode import MoeDecodeConfig, moe_decode, moe_decode_reference
from tests.pallas.conftest import assert_close

F32, BF16 = jnp.float32, jnp.bfloat16
SMALL = MoeDecodeConfig(block_f=16, splits=2, block_d=16, down_splits=2, chunk=16)


def _inputs(seed, n, top_k, e, d, f, dtype, not_held=0.0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, d)), dtype)
    experts = np.stack([rng.choice(e, top_k, replace=False) for _ in range(n)]).astype(np.int32)
    experts[rng.random((n, top_k)) < not_held] = -1
    weights = jnp.asarray(rng.dirichlet(np.ones(top_k), n), jnp.float32)
    gate, up = (jnp.asarray(rng.standard_normal((e, d, f)) / np.sqrt(d), dtype) for _ in range(2))
    down = jnp.asarray(rng.standard_normal((e, f, d)) / np.sqrt(f), dtype)
    return x, weights, jnp.asarray(experts), gate, up, down


# (tokens, top_k, experts, D, F, dtype, share of assignments held elsewhere)
CASES = [
    (1, 2, 8, 64, 32, F32, 0.0),
    (1, 8, 16, 128, 96, F32, 0.0),
    (3, 4, 8, 64, 48, BF16, 0.0),
    (2, 2, 4, 32, 64, F32, 0.5),
    (4, 1, 4, 64, 32, BF16, 0.3),
]


@pytest.mark.parametrize("n,top_k,e,d,f,dtype,not_held", CASES)
def test_kernel_matches_reference_and_grouped_path(n, top_k, e, d, f, dtype, not_held):
    args = _inputs(n * 100 + top_k, n, top_k, e, d, f, dtype, not_held)
    out = moe_decode(*args, config=SMALL, interpret=True)
    assert out.shape == (n, d) and out.dtype == F32
    assert_close(out, moe_decode_reference(*args), dtype, "reference")
    x, weights, experts, gate, up, down = args
    if not_held == 0.0:  # the grouped path over every expert
        assert_close(out, run_experts(x, weights, experts, gate, up, down), dtype, "run_experts")


def test_expert_parallel_slices_sum_to_the_whole():
    """Two devices' halves of the experts add up to all of them: ids shifted by the half's first
    expert, those outside 0..3 (negative, or past the half) contribute 0."""
    x, weights, experts, gate, up, down = _inputs(7, 2, 4, 8, 64, 32, F32)
    whole = moe_decode(x, weights, experts, gate, up, down, config=SMALL, interpret=True)
    parts = []
    for first in (0, 4):
        local = experts - first
        sl = slice(first, first + 4)
        parts.append(moe_decode(x, weights, local, gate[sl], up[sl], down[sl], config=SMALL, interpret=True))
    assert_close(parts[0] + parts[1], whole, F32, "halves")


def test_default_config_and_all_held_elsewhere():
    args = _inputs(3, 1, 2, 4, 256, 128, F32)
    assert_close(moe_decode(*args, interpret=True), moe_decode_reference(*args), F32, "default config")
    x, weights, experts, gate, up, down = args
    none = moe_decode(x, weights, jnp.full_like(experts, -1), gate, up, down, interpret=True)
    assert not np.asarray(none).any()


def test_bad_arguments_are_named():
    x, weights, experts, gate, up, down = _inputs(0, 2, 2, 4, 32, 16, F32)
    with pytest.raises(ValueError, match="x must be"):
        moe_decode(x, weights[:1], experts[:1], gate, up, down, interpret=True)
    with pytest.raises(ValueError, match="down"):
        moe_decode(x, weights, experts, gate, up, gate, interpret=True)
    with pytest.raises(ValueError, match="integer"):
        moe_decode(x, weights, experts.astype(F32), gate, up, down, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        MoeDecodeConfig(block_f=24)
    with pytest.raises(ValueError, match="chunk must be at least 16"):
        MoeDecodeConfig(chunk=8)
    x, weights, experts, gate, up, down = _inputs(0, 2, 2, 4, 40, 16, F32)
    with pytest.raises(ValueError, match="multiples of 16"):
        moe_decode(x, weights, experts, gate, up, down, interpret=True)


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_lowers_to_triton(lower_for_gpu, dtype):
    args = _inputs(1, 1, 8, 16, 256, 128, dtype)
    assert lower_for_gpu(moe_decode, *args).count("__gpu$xla.gpu.triton") == 2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_gpu_matches_reference(dtype):
    args = _inputs(5, 2, 8, 128, 2048, 768, dtype, not_held=0.2)
    assert_close(moe_decode(*args), moe_decode_reference(*args), dtype, "gpu")


def test_run_experts_takes_the_decode_kernels_for_few_assignments(monkeypatch):
    """With a kernel impl and at most E_local / 2 assignments, `run_experts` runs `moe_decode`
    (here in interpret mode), also for a device's slice of the experts."""
    from mobajax.models import moe

    calls = []

    def interpreted(*args, **kw):
        calls.append(args[2].shape)
        return moe_decode(*args, config=SMALL, interpret=True, **kw)

    monkeypatch.setattr(moe, "moe_decode", interpreted)
    x, weights, experts, gate, up, down = _inputs(11, 2, 2, 16, 64, 32, F32)
    want = run_experts(x, weights, experts, gate, up, down)
    assert_close(run_experts(x, weights, experts, gate, up, down, impl="pallas"), want, F32, "all experts")
    halves = [
        run_experts(x, weights, experts, gate[i:i + 8], up[i:i + 8], down[i:i + 8], first_expert=i, impl="mosaic")
        for i in (0, 8)
    ]
    assert_close(halves[0] + halves[1], want, F32, "expert slices")
    assert calls == [(2, 2)] * 3


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 4, 64])  # 64 x 2 assignments > 16 / 2: the grouped path
def test_gpu_run_experts_kernels_match_ragged_dot(tokens):
    x, weights, experts, gate, up, down = _inputs(tokens, tokens, 2, 16, 256, 128, BF16)
    want = run_experts(x, weights, experts, gate, up, down)
    for impl in ("pallas", "mosaic"):
        assert_close(run_experts(x, weights, experts, gate, up, down, impl=impl), want, BF16, impl)
