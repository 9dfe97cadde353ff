"""moba_work_mosaic: lowering to Mosaic GPU on the CPU, its argument checks, and on a Hopper GPU
its work list against `moba_attention.work_list`'s (the same tiles; each bucket's rows the
same set)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.pallas import moba_attention as ma
from mobajax.pallas import moba_work_mosaic as mosaic
from mobajax.pallas import mosaic_softmax

SHAPE = jax.ShapeDtypeStruct


@pytest.mark.parametrize("chunks, kv", [(256, 8), (300, 2), (8192, 1)])
def test_lowers_to_mosaic_gpu(chunks, kv):
    """Both kernels' Pallas -> Mosaic GPU lowering, with the inlined per-thread code, runs on a
    machine without a GPU, for 8-, 16- and 32-bit keys."""
    rows = kv * 2 * 1000
    fn = jax.jit(mosaic.work_list_mosaic.__wrapped__, static_argnames=("num_rows", "num_kv_heads", "num_chunks",
                                                                        "num_programs"))  # fmt: skip
    dtype = ma.key_dtype(chunks) if chunks <= 2**8 or kv > 1 else jnp.int32
    lowered = fn.trace(SHAPE((rows + 128,), dtype), num_rows=rows, num_kv_heads=kv, num_chunks=chunks)
    bucket, tile, live, order = lowered.out_info
    tiles = -(-rows // mosaic.ROWS) + chunks * kv
    assert (bucket.shape, tile.shape, live.shape, order.shape) == ((tiles,), (tiles, 2), (1,), (rows,))
    assert "mosaic_gpu" in lowered.lower(lowering_platforms=("cuda",)).as_text()


def test_bad_arguments_are_named():
    assert mosaic.fits(256, 8) and mosaic.fits(mosaic.MAX_BUCKETS, 1) and not mosaic.fits(mosaic.MAX_BUCKETS, 2)
    keys = jnp.zeros((1024,), jnp.uint8)
    with pytest.raises(ValueError, match="at most 8192 buckets"):
        mosaic.work_list_mosaic(keys, num_rows=1000, num_kv_heads=4, num_chunks=4096)
    with pytest.raises(ValueError, match="multiple of num_kv_heads=3"):
        mosaic.work_list_mosaic(keys, num_rows=1000, num_kv_heads=3, num_chunks=16)
    with pytest.raises(ValueError, match="rounded up to 16"):
        mosaic.work_list_mosaic(keys[:1000], num_rows=1000, num_kv_heads=4, num_chunks=16)


def random_keys(seed, rows, pad, kv, chunks, empty_share, dtype):
    """Keys as `work_keys` lays them out: each kv head's rows favour low chunks (as causal picks
    do), a share of them empty (the last chunk), the pad rows empty."""
    rng = np.random.default_rng(seed)
    keys = np.minimum(rng.geometric(min(1.0, 4.0 / chunks), rows) - 1, max(chunks - 2, 0))
    keys[rng.random(rows) < empty_share] = chunks - 1
    return jnp.asarray(np.concatenate([keys, np.full(pad, chunks - 1)]).astype(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "rows, pad, kv, chunks, empty_share, dtype",
    [
        (8 * 2 * 4 * 4096, 128, 8, 256, 0.02, jnp.uint8),  # a 16K-token gate's rows, 8-bit keys
        (2 * 3 * 1000, 128, 2, 300, 0.3, jnp.uint16),  # rows not a multiple of 16, 16-bit keys
        (4 * 5 * 977, 128, 4, 2000, 0.0, jnp.int32),  # 32-bit keys, many small buckets
        (8 * 64, 128, 8, 3, 0.5, jnp.uint8),  # fewer rows than CTAs
        (8 * 2 * 64, 128, 8, 2, 1.0, jnp.uint8),  # every row empty: no tile
    ],
)
def test_gpu_work_list_matches_the_sorted_one(rows, pad, kv, chunks, empty_share, dtype):
    if not mosaic_softmax.on_hopper():
        pytest.skip("the Mosaic kernels need a Hopper GPU")
    keys = random_keys(0, rows, pad, kv, chunks, empty_share, dtype)
    bucket, tile, live, order = (np.asarray(x) for x in mosaic.work_list_mosaic(
        keys, num_rows=rows, num_kv_heads=kv, num_chunks=chunks))  # fmt: skip
    want_bucket, want_start, want_size, want_order = (np.asarray(x) for x in ma.work_list(
        keys, rows, kv, chunks, mosaic.ROWS))  # fmt: skip
    (n,) = live
    assert n == np.count_nonzero(want_size) and not want_size[n:].any()
    np.testing.assert_array_equal(bucket[:n], want_bucket[:n])
    np.testing.assert_array_equal(tile[:n], np.stack([want_start, want_size], axis=1)[:n])
    for b in np.unique(bucket[:n]):  # each bucket's rows: the same set (the sorted list is stable)
        first, count = tile[:n][bucket[:n] == b][0, 0], tile[:n][bucket[:n] == b][:, 1].sum()
        np.testing.assert_array_equal(np.sort(order[first:first + count]), want_order[first:first + count])
    assert tile[:n, 1].sum() == np.count_nonzero(np.asarray(keys[:rows]) != chunks - 1)


@pytest.mark.parametrize("fits", [True, False])
def test_the_mosaic_partials_kernel_gets_this_work_list_where_its_counters_fit(monkeypatch, fits):
    """With the Mosaic past-chunk kernel, `past_work` builds the work list here (the gate's keys
    alone); where the buckets' counters do not fit, `work_list`'s, in the same form."""
    t, n, kv, chunks, block = 96, 8, 2, 6, 64
    rng = np.random.default_rng(1)
    past = jnp.asarray(rng.integers(-1, chunks - 1, (t, n, 2)), jnp.int32)
    q, k = jnp.zeros((t, n, 128), jnp.bfloat16), jnp.zeros((chunks * block, kv, 128), jnp.bfloat16)
    layout = ma._prepare(q, k, None, block, 3, None, None, None, check_v=False)
    st = ma._Static(block, 3, 1.0, ma.MobaConfig(), False, mosaic_partials=True)
    keys = ma.work_keys(past, kv, chunks, mosaic.ROWS)
    seen = []
    monkeypatch.setattr(mosaic, "fits", lambda c, h: fits)
    monkeypatch.setattr(mosaic, "work_list_mosaic", lambda keys, **kw: seen.append((keys, kw)) or "mosaic")
    work = ma.past_work(past, kv, layout, None, st=st, config=st.config)
    if fits:
        assert work == "mosaic" and seen[0][1] == dict(num_rows=t * n * 2, num_kv_heads=kv, num_chunks=chunks)
        np.testing.assert_array_equal(seen[0][0], keys)
        return
    bucket, start, size, order = ma.work_list(keys, t * n * 2, kv, chunks, mosaic.ROWS)
    want = (bucket, np.stack([start, size], axis=1), [np.count_nonzero(size)], order)
    for got, expected in zip(work, want, strict=True):
        np.testing.assert_array_equal(got, expected)
