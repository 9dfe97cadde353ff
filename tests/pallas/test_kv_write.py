"""kv_write: the page-table scatter, in interpret mode against the XLA scatter, and in place."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.pallas.kv_write import KVWriteConfig, kv_write, kv_write_reference

F32, BF16 = jnp.float32, jnp.bfloat16


def _inputs(seed, pages, g, kv_heads, h, t, dtype, padding=3):
    rng = np.random.default_rng(seed)
    k_pages = jnp.asarray(rng.standard_normal((pages, g, kv_heads, h)), dtype)
    v_pages = jnp.asarray(rng.standard_normal((pages, g, kv_heads, h)), dtype)
    k = jnp.asarray(rng.standard_normal((t, kv_heads, h)), F32)
    v = jnp.asarray(rng.standard_normal((t, kv_heads, h)), F32)
    slots = rng.choice(pages * g, size=t, replace=False).astype(np.int32)
    slots[rng.choice(t, size=min(padding, t), replace=False)] = -1  # padding tokens
    return k_pages, v_pages, k, v, jnp.asarray(slots)


@pytest.mark.parametrize(
    "g, kv_heads, h, t, dtype, block_t",
    [(16, 2, 64, 11, F32, 8), (32, 8, 128, 5, BF16, 4), (64, 1, 64, 1, BF16, 8)],
)
def test_matches_scatter_and_plain_numpy(g, kv_heads, h, t, dtype, block_t):
    args = _inputs(g + t, 7, g, kv_heads, h, t, dtype, padding=min(3, t - 1))
    k_pages, v_pages, k, v, slots = args
    got = kv_write(*args, config=KVWriteConfig(block_t=block_t), interpret=True)
    want = kv_write_reference(*args)
    for pool, new, old, ref in zip(got, (k, v), (k_pages, v_pages), want):
        assert pool.dtype == dtype
        np.testing.assert_array_equal(np.asarray(pool, np.float32), np.asarray(ref, np.float32))
        expect = np.asarray(old, np.float32).reshape(-1, kv_heads, h).copy()
        for i, s in enumerate(np.asarray(slots)):
            if s >= 0:
                expect[s] = np.asarray(new[i].astype(dtype), np.float32)
        np.testing.assert_array_equal(np.asarray(pool, np.float32).reshape(expect.shape), expect)


def test_reference_in_place_under_donation():
    # Under jit with donated pools the XLA scatter reuses the pools' buffers: no pool-sized temp.
    args = _inputs(0, 256, 16, 2, 64, 9, F32)
    step = jax.jit(kv_write_reference, donate_argnums=(0, 1))
    stats = step.lower(*args).compile().memory_analysis()
    assert stats.temp_size_in_bytes < args[0].nbytes // 4, stats.temp_size_in_bytes
    want = [np.asarray(x) for x in kv_write(*args, interpret=True)]
    k_pages = args[0]
    out = step(*args)
    assert k_pages.is_deleted(), "the donated pool must be consumed"
    np.testing.assert_array_equal(np.asarray(out[0]), want[0])


def test_kernel_aliases_pools_to_outputs(lower_for_gpu):
    # The GPU kernel writes into its input pools (input_output_aliases), so a donated pool is
    # updated in place. (Interpret mode on CPU copies, so this checks the GPU lowering.)
    args = _inputs(0, 64, 16, 8, 128, 9, BF16)
    text = lower_for_gpu(kv_write, *args)
    assert "output_operand_aliases" in text and "__gpu$xla.gpu.triton" in text


def test_bad_inputs_raise():
    k_pages, v_pages, k, v, slots = _inputs(1, 4, 16, 2, 64, 3, F32, padding=0)
    with pytest.raises(ValueError, match="slots must be int32"):
        kv_write(k_pages, v_pages, k, v, slots[:2], interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        odd = jnp.zeros((4, 16, 3, 64), F32)
        kv_write(odd, odd, jnp.zeros((3, 3, 64)), jnp.zeros((3, 3, 64)), slots, interpret=True)


@pytest.mark.gpu
def test_gpu_matches_scatter():
    args = _inputs(5, 4096, 16, 8, 128, 1000, BF16, padding=20)
    got = kv_write(*args)
    want = jax.jit(kv_write_reference)(*args)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
