"""moba_partials_mosaic: lowering to Mosaic GPU on the CPU, the tile-order bookkeeping and the
finish kernel's indexed partials (interpret mode), the dispatch rules, and on a Hopper GPU the
Mosaic path of `moba_attention` against the Triton path and the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.pallas import moba_attention as ma
from mobajax.pallas import moba_partials_mosaic as mosaic
from mobajax.pallas import mosaic_softmax
from mobajax.pallas.moba_gate import moba_layout

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
SHAPE = jax.ShapeDtypeStruct


def _qkv(seed, t, s, n, kv, h, dtype):
    rng = np.random.default_rng(seed)
    return tuple(
        jnp.asarray(rng.standard_normal(shape), dtype) for shape in ((t, n, h), (s, kv, h), (s, kv, h))
    )


def test_lowers_to_mosaic_gpu():
    """The whole Pallas -> Mosaic GPU lowering runs on a machine without a GPU."""
    tiles, pages, h = 40, 64, 128
    fn = jax.jit(
        mosaic.attention_partials_mosaic.__wrapped__,
        static_argnames=("steps", "scale", "config"),
    )
    args = (
        SHAPE((4096 * 8, h), BF16),
        SHAPE((pages, mosaic.BLOCK_KV, 2, h), BF16),
        SHAPE((pages, mosaic.BLOCK_KV, 2, h), BF16),
        SHAPE((tiles * mosaic.ROWS,), jnp.int32),
        SHAPE((tiles,), jnp.int32),
        SHAPE((tiles,), jnp.int32),
        SHAPE((1,), jnp.int32),
    )
    lowered = fn.trace(*args, steps=8, scale=h**-0.5, config=mosaic.MobaMosaicConfig())
    assert "mosaic_gpu" in lowered.lower(lowering_platforms=("cuda",)).as_text()


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="stages"):
        mosaic.MobaMosaicConfig(stages=1)
    with pytest.raises(ValueError, match="num_programs"):
        mosaic.MobaMosaicConfig(num_programs=0)
    with pytest.raises(ValueError, match="partials"):
        ma.MobaConfig(partials="cuda")


def test_fits_only_on_hopper_with_its_shapes():
    q = jnp.zeros((8, 4, 128), BF16)
    assert mosaic.fits(q, 512) == mosaic_softmax.on_hopper()
    assert not mosaic.fits(q.astype(F32), 512)
    assert not mosaic.fits(jnp.zeros((8, 4, 64), BF16), 512)  # square 64-key tiles: wrong on the H100
    assert not mosaic.fits(q, 96)


def test_mosaic_asked_where_it_cannot_run_is_an_error():
    q, k, v = _qkv(0, 64, 64, 4, 2, 32, F32)
    with pytest.raises(ValueError, match="partials='mosaic' needs a Hopper GPU"):
        ma.moba_attention(q, k, v, block_size=16, top_k=2, interpret=True,
                          config=ma.MobaConfig(partials="mosaic"))  # fmt: skip


@pytest.mark.parametrize("t, n, kv, block, top_k", [(300, 8, 2, 16, 3), (200, 4, 4, 32, 5), (130, 6, 2, 8, 2)])
def test_tile_order_rows_and_their_index(t, n, kv, block, top_k):
    """Every selected (token, head, past slot) row sits in exactly one tile-order row of the
    work list's tiles, with its query row, and `partials_index` points each `partial_row`
    position at it."""
    q, k, _ = _qkv(1, t, t, n, kv, 16, F32)
    past = ma.moba_select(q, k, block_size=block, top_k=top_k, interpret=True)[..., 1:]
    slots = past.shape[-1]
    work = ma.work_list(past, kv, -(-t // block), mosaic.ROWS)
    src, row = (np.asarray(x) for x in mosaic.tile_rows(work, slots))
    live = row >= 0
    want = np.nonzero(np.asarray(past).reshape(-1) >= 0)[0]
    np.testing.assert_array_equal(np.sort(row[live]), want)
    np.testing.assert_array_equal(src[live], row[live] // slots)
    assert (src[~live] == 0).all()

    def partial_row_of(r):
        return ma.partial_row(r // slots, r % slots, t, n, kv)

    spare = 7
    index = np.asarray(mosaic.partials_index(jnp.asarray(row), partial_row_of, t * n * slots + spare))
    dest = np.asarray(partial_row_of(jnp.asarray(row[live])))
    np.testing.assert_array_equal(index[dest], np.nonzero(live)[0])


@pytest.mark.parametrize("t, s, n, kv, block, top_k", [(200, 200, 8, 2, 16, 3), (96, 160, 4, 1, 32, 4)])
def test_finish_reads_indexed_partials_like_ordered_ones(t, s, n, kv, block, top_k):
    """The finish kernel given the partials in tile order with their index (the Mosaic kernel's
    outputs, emulated by a permutation of the Triton kernel's) gives the same output."""
    q, k, v = _qkv(2, t, s, n, kv, 16, F32)
    st = ma._Static(block, top_k, 16**-0.5, ma.MobaConfig(block_q=16, block_k=16, gate_block_q=16), True)
    layout = moba_layout(jnp.array([0, t]), jnp.array([0, s]), None, t, s, block)
    sel = ma._select(st, q, k, layout)
    past = sel[..., 1:]
    slots = past.shape[-1]
    config = st.config
    work = ma.work_list(past, kv, layout.chunk_len.shape[0], config.block_q)
    o, lse = ma.attention_partials(q, k, v, work, layout, slots=slots, scale=st.scale, config=config, interpret=True)

    def run(partials):
        return ma.finish(q, k, v, layout.token_pos, layout.token_own, sel, layout, partials,
                         scale=st.scale, config=config, interpret=True)  # fmt: skip

    perm = np.random.default_rng(3).permutation(o.shape[0])
    index = jnp.asarray(np.argsort(perm), jnp.int32)  # o[i] now sits at row index[i]
    np.testing.assert_array_equal(run((o[perm], lse[perm], index)), run((o, lse)))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "t, s, n, kv, h, block, top_k, dtype",
    [
        (4096, 4096, 32, 8, 128, 512, 3, BF16),
        (3000, 4100, 8, 1, 128, 256, 4, F16),  # a prefix, a partial last chunk, S not a page multiple
        (2048, 2048, 8, 8, 128, 64, 12, BF16),
        (1, 5000, 4, 2, 128, 128, 3, BF16),
    ],
)
def test_gpu_mosaic_path_matches_triton_and_reference(t, s, n, kv, h, block, top_k, dtype):
    if not mosaic_softmax.on_hopper():
        pytest.skip("the Mosaic kernel needs a Hopper GPU")
    q, k, v = _qkv(4, t, s, n, kv, h, dtype)
    args = dict(block_size=block, top_k=top_k)
    out = ma.moba_attention(q, k, v, **args, config=ma.MobaConfig(partials="mosaic"))
    triton = ma.moba_attention(q, k, v, **args, config=ma.MobaConfig(partials="triton"))
    rel = float(jnp.linalg.norm((out - triton).astype(F32)) / jnp.linalg.norm(triton.astype(F32)))
    assert rel < 2e-3, rel  # the same selection; bf16 partials rounded alike, sums in another order
    want = ma.moba_attention_reference(q.astype(F32), k.astype(F32), v.astype(F32), **args)
    rel = float(jnp.linalg.norm(out.astype(F32) - want) / jnp.linalg.norm(want))
    assert rel < 2e-2, rel  # near ties of the 16-bit gate may flip a few selections


@pytest.mark.parametrize("partials, block, one_sequence, want", [
    ("auto", 512, True, True), ("auto", 4096, True, False), ("auto", 512, False, False),
    ("triton", 512, True, False), ("mosaic", 4096, True, True),
])  # fmt: skip
def test_which_kernel_takes_the_partials(monkeypatch, partials, block, one_sequence, want):
    """auto: Mosaic where it runs and the chunks are short (measured faster there), else Triton."""
    monkeypatch.setattr(mosaic, "fits", lambda q, block_size: True)  # as on a Hopper GPU
    st = ma._Static(block, 3, 1.0, ma.MobaConfig(partials=partials), False)
    assert ma.use_mosaic(st, jnp.zeros((8, 4, 128), BF16), one_sequence=one_sequence) == want
