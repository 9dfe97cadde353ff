"""paged_prefill: ragged mixed batches in interpret mode against the reference, and the
reference against the contiguous dense attention of `mobajax.attention`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.attention import dense_attention_reference
from mobajax.pallas.paged_prefill import (
    PagedPrefillConfig,
    paged_prefill,
    paged_prefill_reference,
)
from tests.pallas.conftest import assert_close

F32, BF16 = jnp.float32, jnp.bfloat16

# (page size, query heads per kv head, head dim, dtype)
CASES = [
    (16, 1, 64, F32),
    (16, 4, 128, BF16),
    (16, 8, 64, F32),
    (32, 1, 128, BF16),
    (32, 4, 64, F32),
    (32, 8, 128, BF16),
    (64, 1, 64, F32),
    (64, 4, 128, BF16),
    (64, 8, 64, BF16),
]


def _batch(paged_kv, seed, g, gq, h, dtype, q_lens, cached, pad_rows=3, kv_heads=2):
    """A mixed batch: sequence b has `cached[b]` earlier tokens and q_lens[b] new ones (already in
    the pool). Padding rows past the last sequence hold NaN queries."""
    rng = np.random.default_rng(seed)
    q_lens = np.asarray(q_lens, np.int32)
    kv_lens = q_lens + np.asarray(cached, np.int32)
    pool = paged_kv(rng, kv_lens, g, kv_heads, h, dtype)
    t = int(q_lens.sum()) + pad_rows
    q = rng.standard_normal((t, kv_heads * gq, h)).astype(np.float32)
    q[int(q_lens.sum()) :] = np.nan
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    args = (jnp.asarray(q, dtype), pool.k_pages, pool.v_pages, pool.page_table,
            jnp.asarray(cu), jnp.asarray(kv_lens))
    return args, pool


# plain prefill (no cache), decode rows (1 new token), chunked prefill and a prefix-cache hit
# (new tokens after cached ones, starting mid-page), an empty sequence, single-token prompt
Q_LENS = [9, 1, 21, 0, 1, 3]
CACHED = [0, 40, 19, 5, 0, 50]


@pytest.mark.parametrize("g, gq, h, dtype", CASES)
def test_kernel_matches_reference(paged_kv, g, gq, h, dtype):
    args, _ = _batch(paged_kv, g * 10 + gq, g, gq, h, dtype, Q_LENS, CACHED)
    config = PagedPrefillConfig(block_m=max(16, 4 * gq), block_kv=max(16, g))
    out, lse = paged_prefill(*args, config=config, interpret=True, return_lse=True)
    ref_out, ref_lse = paged_prefill_reference(*args, return_lse=True)
    t = int(np.sum(Q_LENS))
    assert out.shape == args[0].shape and out.dtype == dtype
    assert_close(out[:t], ref_out[:t], dtype, "out")
    assert_close(lse[:t], ref_lse[:t], dtype, "lse")
    assert np.all(np.asarray(out[t:], np.float32) == 0), "padding rows must be zero"
    assert np.all(np.isneginf(np.asarray(lse[t:]))), "padding rows must have lse -inf"


def test_blocks_span_many_tiles(paged_kv):
    # One long chunk over several query blocks and kv tiles, the full (unmasked) loop included.
    args, _ = _batch(paged_kv, 5, 16, 4, 64, F32, [70, 2], [45, 30])
    config = PagedPrefillConfig(block_m=32, block_kv=16)
    out = paged_prefill(*args, config=config, interpret=True)
    assert_close(out[:72], paged_prefill_reference(*args)[:72], F32, "out")


def test_reference_matches_dense_attention(paged_kv):
    args, pool = _batch(paged_kv, 11, 16, 4, 64, F32, Q_LENS, CACHED)
    q, cu, kv_lens = args[0], np.asarray(args[4]), np.asarray(args[5])
    out = paged_prefill_reference(*args, scale=0.2)
    for b, n in enumerate(Q_LENS):
        if n == 0:
            continue
        k, v = pool.dense(b)
        pos = jnp.arange(kv_lens[b] - n, kv_lens[b], dtype=jnp.int32)[None]
        want = dense_attention_reference(
            q[cu[b] : cu[b + 1]][None], k[None], v[None], pos,
            jnp.arange(kv_lens[b], dtype=jnp.int32)[None], scale=0.2,
        )[0]
        np.testing.assert_allclose(np.asarray(out[cu[b] : cu[b + 1]]), np.asarray(want), atol=1e-5)


def test_bad_inputs_raise():
    q = jnp.zeros((4, 8, 64), F32)
    pages = jnp.zeros((4, 16, 2, 64), F32)
    table = jnp.zeros((2, 2), jnp.int32)
    with pytest.raises(ValueError, match="cu_q_lens"):
        paged_prefill(q, pages, pages, table, jnp.zeros((2,), jnp.int32), jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="page size"):
        bad = jnp.zeros((4, 12, 2, 64), F32)
        paged_prefill(q, bad, bad, table, jnp.zeros((3,), jnp.int32), jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="block_m"):
        PagedPrefillConfig(block_m=8)


@pytest.mark.gpu
@pytest.mark.parametrize("g, gq, h, dtype", CASES)
def test_gpu_matches_reference(paged_kv, g, gq, h, dtype):
    q_lens, cached = [300, 1, 77, 0, 1, 129], [0, 500, 190, 5, 0, 1000]
    args, _ = _batch(paged_kv, g + gq, g, gq, h, dtype, q_lens, cached, kv_heads=8)
    out, lse = paged_prefill(*args, return_lse=True)
    ref_out, ref_lse = jax.jit(paged_prefill_reference, static_argnames="return_lse")(
        *args, return_lse=True
    )
    t = sum(q_lens)
    assert_close(out[:t], ref_out[:t], dtype, "out")
    assert_close(lse[:t], ref_lse[:t], dtype, "lse")
    assert np.all(np.asarray(out[t:], np.float32) == 0)


def test_lowers_to_triton(lower_for_gpu):
    shape = jax.ShapeDtypeStruct
    pool = shape((999, 16, 8, 128), BF16)
    args = (shape((4096, 32, 128), BF16), pool, pool, shape((3, 300), jnp.int32),
            shape((4,), jnp.int32), shape((3,), jnp.int32))
    assert "__gpu$xla.gpu.triton" in lower_for_gpu(paged_prefill, *args)


def test_block_schedule_has_no_while_loop():
    """searchsorted unrolled: on the GPU a while loop costs launches and copies per step."""
    from mobajax.pallas.paged_prefill import block_schedule

    jaxpr = jax.make_jaxpr(lambda cu: block_schedule(cu, 32, 40))(jnp.arange(0, 65, 8, dtype=jnp.int32))
    assert "while" not in str(jaxpr)
