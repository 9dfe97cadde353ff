"""moba_partials_mosaic: lowering to Mosaic GPU on the CPU, its config and dispatch rule, and on
a Hopper GPU the Mosaic past-chunk kernel inside `moba_attention` against the Triton one and the
reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.pallas import moba_attention as ma
from mobajax.pallas import moba_finish_mosaic as finish_mosaic
from mobajax.pallas import moba_partials_mosaic as mosaic
from mobajax.pallas import mosaic_softmax
from tests.pallas.conftest import random_qkv

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
SHAPE = jax.ShapeDtypeStruct



@pytest.mark.parametrize("slots", [1, 2, 11])
def test_lowers_to_mosaic_gpu(slots):
    """The whole Pallas -> Mosaic GPU lowering, with the inlined per-thread copies, runs on a
    machine without a GPU."""
    t, n, kv, h, block = 1000, 16, 4, 128, 256
    pages = -(-t // mosaic.BLOCK_KV)
    tiles = 300
    fn = jax.jit(
        mosaic.attention_partials_mosaic.__wrapped__,
        static_argnames=("num_rows", "num_tokens", "key_tokens", "block_size", "slots", "scale", "config"),
    )
    args = (
        SHAPE((t * n, h), BF16),
        SHAPE((pages, mosaic.BLOCK_KV, kv, h), BF16),
        SHAPE((pages, mosaic.BLOCK_KV, kv, h), BF16),
        SHAPE((tiles,), jnp.int32),
        SHAPE((tiles, 2), jnp.int32),
        SHAPE((1,), jnp.int32),
        SHAPE((t * n * slots,), jnp.int32),
    )
    rows = slots * n * finish_mosaic.token_stride(t) + mosaic.ROWS
    lowered = fn.trace(*args, num_rows=rows, num_tokens=t, key_tokens=t, block_size=block, slots=slots,
                       scale=h**-0.5, config=mosaic.MobaPartialsConfig())  # fmt: skip
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="num_programs"):
        mosaic.MobaPartialsConfig(num_programs=0)
    with pytest.raises(ValueError, match="partials='gpu'"):
        ma.MobaConfig(partials="gpu")


def test_fits_whole_key_tiles_only():
    assert mosaic.fits(512) and mosaic.fits(4096) and mosaic.fits(mosaic.BLOCK_KV)
    assert not mosaic.fits(64) and not mosaic.fits(192)


def test_key_pages_are_block_kv_pages():
    """The finish kernel's `key_pages` (tested there) at this kernel's BLOCK_KV."""
    x = jnp.arange(130 * 2 * 4, dtype=F32).reshape(130, 2, 4)
    np.testing.assert_array_equal(mosaic.key_pages(x), finish_mosaic.key_pages(x, mosaic.BLOCK_KV))


def test_mosaic_asked_where_it_cannot_run_is_an_error():
    q, k, v = random_qkv(0, 64, 64, 4, 2, 32, F32)
    with pytest.raises(ValueError, match="partials='mosaic' needs"):
        ma.moba_attention(q, k, v, block_size=16, top_k=2, interpret=True,
                          config=ma.MobaConfig(partials="mosaic"))  # fmt: skip


@pytest.mark.parametrize("partials, block, one_sequence, want", [
    ("auto", 512, True, True), ("auto", 4096, True, True), ("auto", 192, True, False),
    ("auto", 512, False, False), ("triton", 512, True, False), ("mosaic", 4096, True, True),
])  # fmt: skip
def test_which_partials_kernel_runs(monkeypatch, partials, block, one_sequence, want):
    """auto: Mosaic where it runs (measured faster at blocks 512 and 4096; blocks must be whole
    128-key tiles), else Triton; an explicit choice wins."""
    monkeypatch.setattr(finish_mosaic, "fits", lambda q, num_kv_heads, block_size: True)  # a Hopper GPU
    st = ma._Static(block, 3, 1.0, ma.MobaConfig(partials=partials), False)
    st = ma.with_kernels(st, jnp.zeros((8, 4, 128), BF16), 2, one_sequence=one_sequence)
    assert st.mosaic_partials == want
    assert ma.work_rows(st, st.config) == (mosaic.ROWS if want else st.config.block_q)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "t, s, n, kv, block, top_k, dtype",
    [
        (4096, 4096, 32, 8, 512, 3, BF16),
        (3000, 4100, 8, 1, 256, 4, F16),  # a prefix, a partial last chunk, S not a page multiple
        (2048, 2048, 8, 8, 128, 12, BF16),  # one head per kv head; 11 past slots
        (1, 5000, 4, 2, 128, 3, BF16),  # one token: one live row in a tile
        (700, 700, 16, 2, 128, 2, BF16),  # 8 heads per kv head
    ],
)
def test_gpu_mosaic_partials_match_triton_and_reference(t, s, n, kv, block, top_k, dtype):
    if not mosaic_softmax.on_hopper():
        pytest.skip("the Mosaic kernel needs a Hopper GPU")
    q, k, v = random_qkv(6, t, s, n, kv, 128, dtype)
    args = dict(block_size=block, top_k=top_k)
    out = ma.moba_attention(q, k, v, **args, config=ma.MobaConfig(partials="mosaic"))
    triton = ma.moba_attention(q, k, v, **args, config=ma.MobaConfig(partials="triton"))
    rel = float(jnp.linalg.norm((out - triton).astype(F32)) / jnp.linalg.norm(triton.astype(F32)))
    assert rel < 3e-3, rel  # the same selection; 128-key tiles round P to 16 bits at other maxima
    want = ma.moba_attention_reference(q.astype(F32), k.astype(F32), v.astype(F32), **args)
    rel = float(jnp.linalg.norm(out.astype(F32) - want) / jnp.linalg.norm(want))
    assert rel < 2e-2, rel  # near ties of the 16-bit gate may flip a few selections
