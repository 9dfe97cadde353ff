"""attention_chunk (out, lse), merge_states and KV-sequence-parallel attention."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.attention import dense_attention_reference
from mobajax.pallas.attention_chunk import (
    AttentionChunkConfig,
    attention_chunk,
    attention_chunk_reference,
    merge_states,
)
from tests.pallas.conftest import assert_close

F32, BF16 = jnp.float32, jnp.bfloat16
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _inputs(seed, b, t, s, n, kv_heads, h, dtype):
    """Random q/k/v; key positions are a shuffled range with padding (-1) slots whose k/v are NaN;
    query positions include a padding query (-1) that sees nothing."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, n, h)).astype(np.float32)
    k = rng.standard_normal((b, s, kv_heads, h)).astype(np.float32)
    v = rng.standard_normal((b, s, kv_heads, h)).astype(np.float32)
    k_pos = np.stack([rng.permutation(s) - 2 for _ in range(b)]).astype(np.int32)
    k_pos[k_pos < 0] = -1
    k[k_pos < 0] = np.nan
    v[k_pos < 0] = np.nan
    q_pos = rng.integers(0, s, (b, t)).astype(np.int32)
    q_pos[0, 0] = -1
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
            jnp.asarray(q_pos), jnp.asarray(k_pos))


@pytest.mark.parametrize(
    "t, s, gq, h, dtype",
    [(5, 37, 1, 64, F32), (1, 70, 4, 128, BF16), (20, 16, 8, 64, F32), (9, 100, 4, 64, BF16)],
)
def test_kernel_matches_reference(t, s, gq, h, dtype):
    args = _inputs(t * s, 2, t, s, 2 * gq, 2, h, dtype)
    config = AttentionChunkConfig(block_m=32, block_kv=32)
    out, lse = attention_chunk(*args, config=config, interpret=True)
    ref_out, ref_lse = attention_chunk_reference(*args)
    assert_close(out, ref_out, dtype, "out")
    finite = np.isfinite(np.asarray(ref_lse))
    assert np.array_equal(np.isfinite(np.asarray(lse)), finite)
    assert not finite[0, 0].any(), "the padding query must see nothing"
    assert_close(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], dtype, "lse")


def test_reference_matches_dense_attention_and_logsumexp():
    q, k, v, q_pos, k_pos = _inputs(1, 2, 6, 30, 8, 2, 64, F32)
    k, v = jnp.nan_to_num(k), jnp.nan_to_num(v)
    out, lse = attention_chunk_reference(q, k, v, q_pos, k_pos, scale=0.1)
    want = dense_attention_reference(q, k, v, q_pos, k_pos, scale=0.1)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5)
    # lse by hand for one query, natural log
    b, i, head = 1, 3, 5
    logits = np.asarray(k[b, :, head // 4], np.float64) @ np.asarray(q[b, i, head], np.float64)
    visible = (np.asarray(k_pos[b]) >= 0) & (np.asarray(k_pos[b]) <= int(q_pos[b, i]))
    want_lse = np.log(np.sum(np.exp(0.1 * logits[visible])))
    np.testing.assert_allclose(float(lse[b, i, head]), want_lse, rtol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_merge_states_over_random_splits_equals_one_shot(seed):
    rng = np.random.default_rng(seed)
    q, k, v, q_pos, k_pos = _inputs(seed, 1, 7, 64, 4, 2, 64, F32)
    whole_out, whole_lse = attention_chunk_reference(q, k, v, q_pos, k_pos)
    cuts = np.sort(rng.choice(np.arange(1, 64), size=rng.integers(1, 6), replace=False))
    bounds = [0, *cuts.tolist(), 64]
    parts = [
        attention_chunk_reference(q, k[:, a:e], v[:, a:e], q_pos, k_pos[:, a:e])
        for a, e in zip(bounds[:-1], bounds[1:])
    ]
    order = rng.permutation(len(parts))  # the merge is order-free
    out, lse = merge_states(
        jnp.stack([parts[i][0] for i in order]), jnp.stack([parts[i][1] for i in order])
    )
    np.testing.assert_allclose(np.asarray(out), np.asarray(whole_out), atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(whole_lse), atol=1e-5)


def test_merge_states_ignores_empty_parts():
    out = jnp.array([[1.0, 2.0], [jnp.nan, jnp.nan]])
    lse = jnp.array([0.5, -jnp.inf])
    merged, merged_lse = merge_states(out[:, None], lse[:, None])
    np.testing.assert_allclose(np.asarray(merged[0]), [1.0, 2.0])
    assert float(merged_lse[0]) == 0.5
    none, none_lse = merge_states(out[1:, None], lse[1:, None])
    assert np.all(np.asarray(none) == 0) and np.isneginf(float(none_lse[0]))


def test_bad_inputs_raise():
    q = jnp.zeros((1, 2, 6, 64))
    k = jnp.zeros((1, 5, 4, 64))
    pos = jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 5), jnp.int32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention_chunk(q, k, k, *pos, interpret=True)
    with pytest.raises(ValueError, match="block_kv"):
        AttentionChunkConfig(block_kv=8)


KV_PARALLEL_SCRIPT = textwrap.dedent(
    """
    import numpy as np, jax, jax.numpy as jnp
    from mobajax.pallas.attention_chunk import kv_parallel_attention, attention_chunk_reference
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    b, t, s, n, kh, h = 2, 5, 128, 8, 2, 64
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, s, kh, h)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, s, kh, h)), jnp.float32)
    k_pos = jnp.asarray(np.stack([rng.permutation(s) for _ in range(b)]), jnp.int32)
    q_pos = jnp.asarray(rng.integers(0, s, (b, t)), jnp.int32)
    q_pos = q_pos.at[0, 0].set(3)  # sees keys on few devices only
    want_out, want_lse = attention_chunk_reference(q, k, v, q_pos, k_pos)
    explicit, auto = jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto
    for axis_type, use_reference in ((explicit, False), (explicit, True), (auto, True)):
        mesh = jax.make_mesh((8,), ("seq",), axis_types=(axis_type,))
        out, lse = kv_parallel_attention(q, k, v, q_pos, k_pos, mesh=mesh, axis_name="seq",
                                         use_reference=use_reference, interpret=True)
        np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), atol=2e-5)
        np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), atol=2e-5)
    print("KV_PARALLEL_OK")
    """
)


def test_kv_parallel_on_8_cpu_devices_equals_single_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", KV_PARALLEL_SCRIPT], env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "KV_PARALLEL_OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("gq, dtype", [(4, BF16), (1, F32), (8, BF16)])
def test_gpu_matches_reference(gq, dtype):
    args = _inputs(gq, 2, 300, 1000, 8 * gq, 8, 128, dtype)
    out, lse = attention_chunk(*args)
    ref_out, ref_lse = jax.jit(attention_chunk_reference)(*args)
    assert_close(out, ref_out, dtype, "out")
    finite = np.isfinite(np.asarray(ref_lse))
    assert_close(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], dtype, "lse")


def test_lowers_to_triton(lower_for_gpu):
    shape = jax.ShapeDtypeStruct
    args = (shape((2, 300, 32, 128), BF16), shape((2, 999, 8, 128), BF16),
            shape((2, 999, 8, 128), BF16), shape((2, 300), jnp.int32), shape((2, 999), jnp.int32))
    assert "__gpu$xla.gpu.triton" in lower_for_gpu(attention_chunk, *args)
