"""paged_prefill_mosaic: lowering to Mosaic GPU on the CPU, argument errors, dispatch rules, and
on a Hopper GPU ragged mixed batches against the reference over page sizes, GQA ratios, head
dims and configs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.pallas import mosaic_softmax
from mobajax.pallas.paged_prefill import block_schedule, paged_prefill_reference
from mobajax.pallas.paged_prefill_mosaic import PagedPrefillMosaicConfig, fits, paged_prefill_mosaic, tile_counts
from tests.pallas.conftest import assert_close

BF16, F16 = jnp.bfloat16, jnp.float16
SHAPE = jax.ShapeDtypeStruct


def _args(t=4096, n=32, h=128, g=16, kv_heads=8, dtype=BF16):
    pool = SHAPE((999, g, kv_heads, h), dtype)
    return (SHAPE((t, n, h), dtype), pool, pool, SHAPE((3, 300), jnp.int32), SHAPE((4,), jnp.int32),
            SHAPE((3,), jnp.int32))


@pytest.mark.parametrize("h, g", [(128, 16), (64, 64)])
def test_lowers_to_mosaic_gpu(h, g):
    """The whole Pallas -> Mosaic GPU lowering runs on a machine without a GPU."""
    text = paged_prefill_mosaic.trace(*_args(h=h, g=g)).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="bf16 or f16"):
        paged_prefill_mosaic.trace(*_args(dtype=jnp.float32))
    with pytest.raises(ValueError, match="multiple of 64"):
        paged_prefill_mosaic.trace(*_args(h=32))
    with pytest.raises(ValueError, match="page size 128"):
        paged_prefill_mosaic.trace(*_args(g=128), config=PagedPrefillMosaicConfig(block_kv=64))
    with pytest.raises(ValueError, match="block_kv"):
        PagedPrefillMosaicConfig(block_kv=96)
    with pytest.raises(ValueError, match="stages"):
        PagedPrefillMosaicConfig(stages=1)


def test_fits_only_on_hopper_with_its_shapes():
    q, pool = jnp.zeros((8, 4, 128), BF16), jnp.zeros((2, 16, 2, 128), BF16)
    on_hopper = mosaic_softmax.on_hopper()
    assert fits(q, pool) == on_hopper
    assert not fits(q.astype(jnp.float32), pool)
    assert not fits(q[..., :32], pool[..., :32])


@pytest.mark.parametrize(
    "q_lens, cached", [([1024, 200], [0, 64]), ([300, 1, 77, 0, 1, 129], [0, 500, 190, 5, 0, 1000])]
)
def test_tile_counts_cover_exactly_the_visible_keys(q_lens, cached):
    """Per block and warpgroup of the kernel's schedule, brute force over its rows: the tiles
    read reach the last row's last visible key, the unmasked ones hold only keys every row sees,
    and unused blocks (whose pos0 goes negative when the last sequence starts late) read none.
    A negative unmasked count once ran the masked loop over negative tiles and hung the GPU."""
    bq, bkv = 64, 128
    q_lens, kv_lens = np.asarray(q_lens), np.asarray(q_lens) + np.asarray(cached)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    seq, start, count = (
        np.asarray(a) for a in block_schedule(jnp.asarray(cu), 2 * bq, -(-cu[-1] // (2 * bq)) + len(q_lens))
    )
    assert (count == 0).any()  # unused blocks are part of the check
    for s, row0, rows in zip(seq, start, count):
        pos0 = kv_lens[s] - q_lens[s] + (row0 - cu[s])
        for w in (0, 1):
            steps, unmasked = (
                int(x) for x in tile_counts(jnp.int32(rows), jnp.int32(pos0), jnp.int32(kv_lens[s]), w, bq, bkv)
            )
            positions = pos0 + np.arange(w * bq, min(rows, (w + 1) * bq))
            want_steps = int(positions.max()) // bkv + 1 if len(positions) else 0
            want_unmasked = min((int(positions.min()) + 1) // bkv, want_steps) if len(positions) else 0
            assert (steps, unmasked) == (want_steps, want_unmasked), (s, row0, rows, w)


def _batch(paged_kv, seed, g, gq, h, dtype, q_lens, cached, kv_heads=8):
    """Sequence b: cached[b] earlier tokens and q_lens[b] new ones, already in the pool. Free
    slots and garbage page-table entries come from `paged_kv`; the pool's free slots are finite
    (as the engine's pool always is: zeros or written K/V), large enough that a kernel scoring
    them unmasked fails."""
    rng = np.random.default_rng(seed)
    q_lens = np.asarray(q_lens, np.int32)
    kv_lens = q_lens + np.asarray(cached, np.int32)
    pool = paged_kv(rng, kv_lens, g, kv_heads, h, dtype)
    finite = [jnp.nan_to_num(p.astype(jnp.float32), nan=300.0).astype(dtype) for p in (pool.k_pages, pool.v_pages)]
    t = int(q_lens.sum()) + 5
    q = jnp.asarray(rng.standard_normal((t, kv_heads * gq, h)), dtype)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    return (q, *finite, pool.page_table, jnp.asarray(cu), jnp.asarray(kv_lens)), int(q_lens.sum())


# plain prefill, decode rows, chunked prefill after a prefix, an empty sequence, long prefixes
Q_LENS, CACHED = [300, 1, 77, 0, 1, 129], [0, 500, 190, 5, 0, 1000]
CASES = [  # (page size, query heads per kv head, head dim, dtype, config)
    (16, 1, 64, BF16, PagedPrefillMosaicConfig()),
    (16, 4, 128, BF16, PagedPrefillMosaicConfig()),
    (16, 8, 128, F16, PagedPrefillMosaicConfig(block_kv=64, stages=3)),
    (32, 4, 64, BF16, PagedPrefillMosaicConfig(block_kv=64, stages=4)),
    (32, 8, 128, BF16, PagedPrefillMosaicConfig()),
    (64, 1, 128, BF16, PagedPrefillMosaicConfig()),
    (64, 4, 128, F16, PagedPrefillMosaicConfig(block_kv=64)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("g, gq, h, dtype, config", CASES)
def test_gpu_matches_reference(paged_kv, g, gq, h, dtype, config):
    if not fits(jnp.zeros((1, 1, h), dtype), jnp.zeros((1, g, 1, h), dtype), config):
        pytest.skip("needs a Hopper GPU")
    args, t = _batch(paged_kv, g + gq + h, g, gq, h, dtype, Q_LENS, CACHED)
    out = paged_prefill_mosaic(*args, config=config)
    assert out.shape == args[0].shape and out.dtype == dtype
    assert_close(out[:t], jax.jit(paged_prefill_reference)(*args)[:t], BF16, "out")


@pytest.mark.gpu
def test_gpu_blocks_of_one_sequence_and_whole_tiles(paged_kv):
    """One long prompt over many blocks (both warpgroups full) and a second one starting
    mid-block, with 64 cached tokens (the unmasked tiles)."""
    args, t = _batch(paged_kv, 3, 16, 4, 128, BF16, [1024, 200], [0, 64])
    if not fits(args[0], args[1]):
        pytest.skip("needs a Hopper GPU")
    assert_close(paged_prefill_mosaic(*args)[:t], jax.jit(paged_prefill_reference)(*args)[:t], BF16, "out")
