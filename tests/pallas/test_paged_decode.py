"""paged_decode: interpret mode against the reference (and the reference against plain maths)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.pallas.paged_decode import PagedDecodeConfig, paged_decode, paged_decode_reference
from tests.pallas.conftest import assert_close

F32, BF16 = jnp.float32, jnp.bfloat16

# (page size G, query heads per kv head, head dim H, dtype, num_splits): every pair of page size
# and GQA ratio once, both head dims and dtypes, split-K off, on, and more splits than blocks.
CASES = [
    (16, 1, 64, F32, 1),
    (16, 4, 128, BF16, None),
    (16, 8, 64, BF16, 3),
    (32, 1, 128, BF16, 2),
    (32, 4, 64, F32, None),
    (32, 8, 128, F32, 1),
    (64, 1, 64, BF16, 1),
    (64, 4, 128, F32, 4),
    (64, 8, 64, F32, 9),
]


def _inputs(paged_kv, seed, g, gq, h, dtype, lengths, kv_heads=2):
    rng = np.random.default_rng(seed)
    pool = paged_kv(rng, lengths, g, kv_heads, h, dtype)
    q = jnp.asarray(rng.standard_normal((len(lengths), kv_heads * gq, h)), dtype)
    return q, pool


def _naive(q, pool, b, scale):
    """Softmax attention of one sequence written out plainly in float64 numpy."""
    k, v = (np.asarray(x, np.float64) for x in pool.dense(b))
    kv_heads = k.shape[1]
    qb = np.asarray(q[b], np.float64).reshape(kv_heads, -1, q.shape[-1])
    s = np.einsum("kgh,skh->kgs", qb, k) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    lse = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
    out = np.einsum("kgs,skh->kgh", p / p.sum(-1, keepdims=True), v)
    return out.reshape(q.shape[1:]), lse.reshape(-1)


@pytest.mark.parametrize("g, gq, h, dtype, splits", CASES)
def test_kernel_matches_reference(paged_kv, g, gq, h, dtype, splits):
    # lengths: a single token, a partial first page, a partial later page, exactly full pages
    lengths = [1, g - 3, 2 * g + 5, 3 * g]
    q, pool = _inputs(paged_kv, g * 100 + gq, g, gq, h, dtype, lengths)
    args = (q, pool.k_pages, pool.v_pages, pool.page_table, jnp.asarray(lengths, jnp.int32))
    config = PagedDecodeConfig(block_kv=max(16, g), num_splits=splits)
    out, lse = paged_decode(*args, config=config, interpret=True, return_lse=True)
    ref_out, ref_lse = paged_decode_reference(*args, return_lse=True)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")


def test_reference_matches_naive_maths(paged_kv):
    lengths = [1, 13, 40]
    q, pool = _inputs(paged_kv, 7, 16, 4, 64, F32, lengths)
    args = (q, pool.k_pages, pool.v_pages, pool.page_table, jnp.asarray(lengths, jnp.int32))
    out, lse = paged_decode_reference(*args, scale=0.3, return_lse=True)
    for b in range(len(lengths)):
        want_out, want_lse = _naive(q, pool, b, 0.3)
        np.testing.assert_allclose(np.asarray(out[b]), want_out, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(lse[b]), want_lse, atol=1e-5, rtol=1e-5)


def test_zero_length_row_and_multi_block_splits(paged_kv):
    # A length-0 row (inactive batch slot) gives out 0 and lse -inf; a long row spans many
    # kv blocks split over several programs; one split gets no block at all.
    lengths = [0, 9 * 16 + 1, 5]
    q, pool = _inputs(paged_kv, 3, 16, 4, 64, F32, lengths)
    args = (q, pool.k_pages, pool.v_pages, pool.page_table, jnp.asarray(lengths, jnp.int32))
    config = PagedDecodeConfig(block_kv=32, num_splits=4)
    out, lse = paged_decode(*args, config=config, interpret=True, return_lse=True)
    ref_out, ref_lse = paged_decode_reference(*args, return_lse=True)
    assert np.all(np.asarray(out[0]) == 0) and np.all(np.isneginf(np.asarray(lse[0])))
    assert_close(out[1:], ref_out[1:], F32, "out")
    assert_close(lse[1:], ref_lse[1:], F32, "lse")


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(q=(2, 5, 64)), "multiple of kv heads"),
        (dict(q=(2, 8, 48)), "head dim"),
        (dict(lengths=(3,)), "lengths must be int32"),
    ],
)
def test_bad_inputs_raise(bad, match):
    q = jnp.zeros(bad.get("q", (2, 8, 64)), F32)
    pages = jnp.zeros((4, 16, 2, 64), F32)
    table = jnp.zeros((2, 2), jnp.int32)
    lengths = jnp.zeros(bad.get("lengths", (2,)), jnp.int32)
    with pytest.raises(ValueError, match=match):
        paged_decode(q, pages, pages, table, lengths, interpret=True)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="block_kv"):
        PagedDecodeConfig(block_kv=48)


@pytest.mark.gpu
@pytest.mark.parametrize("g, gq, h, dtype, splits", [c for c in CASES if c[4] != 9])
def test_gpu_matches_reference(paged_kv, g, gq, h, dtype, splits):
    lengths = [1, g - 3, 37 * g + 5, 3 * g, 200]
    q, pool = _inputs(paged_kv, g + gq, g, gq, h, dtype, lengths, kv_heads=8)
    args = (q, pool.k_pages, pool.v_pages, pool.page_table, jnp.asarray(lengths, jnp.int32))
    out, lse = paged_decode(*args, config=PagedDecodeConfig(num_splits=splits), return_lse=True)
    ref_out, ref_lse = jax.jit(paged_decode_reference, static_argnames="return_lse")(
        *args, return_lse=True
    )
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")


@pytest.mark.parametrize("splits", [1, 4])
def test_lowers_to_triton(lower_for_gpu, splits):
    # The full Pallas -> Triton lowering at serving shapes, on CPU (catches unsupported ops).
    shape = jax.ShapeDtypeStruct
    args = (shape((4, 32, 128), BF16), shape((999, 16, 8, 128), BF16),
            shape((999, 16, 8, 128), BF16), shape((4, 300), jnp.int32), shape((4,), jnp.int32))
    config = PagedDecodeConfig(num_splits=splits)
    assert "__gpu$xla.gpu.triton" in lower_for_gpu(paged_decode, *args, config=config)
