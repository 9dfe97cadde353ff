"""moba_finish_mosaic: lowering to Mosaic GPU on the CPU, its helpers and the partials it reads
(interpret mode), the dispatch rule, and on a Hopper GPU the Mosaic path of `moba_attention`
against the Triton path and the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.moba import moba_selected_chunks
from mobajax.pallas import moba_attention as ma
from mobajax.pallas import moba_finish_mosaic as mosaic
from mobajax.pallas import mosaic_softmax
from mobajax.pallas.moba_gate import moba_layout
from tests.pallas.conftest import random_qkv

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
SHAPE = jax.ShapeDtypeStruct



@pytest.mark.parametrize("past, scale", [(0, 128**-0.5), (3, 128**-0.5), (3, -0.5)])
def test_lowers_to_mosaic_gpu(past, scale):
    """The whole Pallas -> Mosaic GPU lowering runs on a machine without a GPU (a negative scale
    takes the softmax step's scale-first branch)."""
    t, n, kv, h, pages = 1000, 16, 4, 128, 64
    fn = jax.jit(
        mosaic.own_chunk_and_merge_mosaic.__wrapped__,
        static_argnames=("num_tokens", "block_size", "past_slots", "scale", "config"),
    )
    rows = past * n * mosaic.token_stride(t) + mosaic.ROWS
    args = (
        SHAPE((t, n, h), BF16),
        SHAPE((pages, mosaic.BLOCK_KV, kv, h), BF16),
        SHAPE((pages, mosaic.BLOCK_KV, kv, h), BF16),
        SHAPE((rows, h), BF16),
        SHAPE((rows,), F32),
        SHAPE((1,), jnp.int32),
    )
    lowered = fn.trace(*args, num_tokens=t, block_size=256, past_slots=past, scale=scale,
                       config=mosaic.MobaMosaicConfig())  # fmt: skip
    assert "mosaic_gpu" in lowered.lower(lowering_platforms=("cuda",)).as_text()


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="stages"):
        mosaic.MobaMosaicConfig(stages=1)
    with pytest.raises(ValueError, match="num_programs"):
        mosaic.MobaMosaicConfig(num_programs=0)
    with pytest.raises(ValueError, match="finish='cuda'"):
        ma.MobaConfig(finish="cuda")


def test_fits_only_on_hopper_with_its_shapes():
    q = jnp.zeros((8, 4, 128), BF16)
    assert mosaic.fits(q, 2, 512) == mosaic_softmax.on_hopper()
    assert not mosaic.fits(q.astype(F32), 2, 512)
    assert not mosaic.fits(jnp.zeros((8, 4, 64), BF16), 2, 512)  # head dim 128 only
    assert not mosaic.fits(q, 2, 96)
    assert not mosaic.fits(jnp.zeros((8, 12, 128), BF16), 4, 512)  # 3 heads per kv head: 64 % 3


def test_mosaic_asked_where_it_cannot_run_is_an_error():
    q, k, v = random_qkv(0, 64, 64, 4, 2, 32, F32)
    with pytest.raises(ValueError, match="finish='mosaic' needs a Hopper GPU"):
        ma.moba_attention(q, k, v, block_size=16, top_k=2, interpret=True,
                          config=ma.MobaConfig(finish="mosaic"))  # fmt: skip


@pytest.mark.parametrize("page", [mosaic.BLOCK_KV, 128])
def test_key_pages_pad_to_whole_pages(page):
    x = jnp.arange(130 * 2 * 4, dtype=F32).reshape(130, 2, 4)
    pages = mosaic.key_pages(x, page)
    assert pages.shape == (-(-130 // page), page, 2, 4)
    np.testing.assert_array_equal(pages.reshape(-1, 2, 4)[:130], x)
    assert not pages.reshape(-1, 2, 4)[130:].any()
    assert mosaic.key_pages(x[:128], page).shape == (128 // page, page, 2, 4)


@pytest.mark.parametrize("t, n, kv", [(1, 4, 2), (5, 8, 8), (130, 4, 4), (64, 64, 1)])
def test_every_tile_reads_aligned_whole_partial_rows(t, n, kv):
    """`partial_row` is one-to-one into [0, R) and every Mosaic tile's ROWS rows of a past slot
    start at a multiple of 4 (16-byte aligned log-sum-exps: a TMA copy from a misaligned start
    faults) and end within `partial_rows`."""
    slots, group = 3, n // kv
    tn = np.arange(t * n)
    rows = np.concatenate([np.asarray(ma.partial_row(tn, j, t, n, kv)) for j in range(slots)])
    total = ma.partial_rows(t, n, slots, ma.MobaConfig(), group)
    assert len(set(rows.tolist())) == rows.size and rows.max() < slots * n * mosaic.token_stride(t)
    for t0 in range(0, t, mosaic.tile_tokens(group)):
        for h in range(kv):
            for j in range(slots):
                first = int(ma.partial_row(t0 * n + h * group, j, t, n, kv))
                assert first % 4 == 0 and first + mosaic.ROWS <= total


@pytest.mark.parametrize("t, s, n, kv, block, top_k", [(200, 200, 8, 2, 16, 3), (97, 160, 4, 1, 32, 4)])
def test_a_past_slot_is_empty_exactly_where_the_own_chunk_index_is_at_most_its_index(t, s, n, kv, block, top_k):
    """The rule by which the Mosaic finish skips the partial rows of empty slots (which no
    kernel writes): past slot j of a token is empty (-1) iff its own chunk index is <= j, i.e.
    the gate fills a slot wherever there is a past chunk to pick. Here for the Triton gate, the
    float32 reference and a prefix with a partial last chunk."""
    q, k, _ = random_qkv(2, t, s, n, kv, 16, F32)
    st = ma._Static(block, top_k, 16**-0.5, ma.MobaConfig(block_q=16, block_k=16, gate_block_q=16), True)
    layout = moba_layout(jnp.array([0, t]), jnp.array([0, s]), None, t, s, block)
    pos = np.arange(s - t, s)
    own = (pos // block)[:, None, None]
    slot = np.arange(top_k - 1)[None, None, :]
    kernel, reference = ma._select(st, q, k, layout), moba_selected_chunks(q, k, block_size=block, top_k=top_k)
    for past in (kernel[..., 1:], reference[..., 1:]):
        np.testing.assert_array_equal(np.asarray(past) < 0, np.broadcast_to(own <= slot, past.shape))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "t, s, n, kv, h, block, top_k, dtype",
    [
        (4096, 4096, 32, 8, 128, 512, 3, BF16),
        (3000, 4100, 8, 1, 128, 256, 4, F16),  # a prefix, a partial last chunk, S not a page multiple
        (2048, 2048, 8, 8, 128, 64, 12, BF16),  # one head per kv head; a ring of 11 past slots
        (1, 5000, 4, 2, 128, 128, 3, BF16),  # one token (tile padding); tiles at odd partial rows
        (5, 5000, 4, 2, 128, 128, 3, BF16),
        (700, 700, 16, 2, 128, 192, 1, BF16),  # the own chunk only; 8 heads per kv head
    ],
)
def test_gpu_mosaic_path_matches_triton_and_reference(t, s, n, kv, h, block, top_k, dtype):
    if not mosaic_softmax.on_hopper():
        pytest.skip("the Mosaic kernel needs a Hopper GPU")
    q, k, v = random_qkv(4, t, s, n, kv, h, dtype)
    args = dict(block_size=block, top_k=top_k)
    out = ma.moba_attention(q, k, v, **args, config=ma.MobaConfig(finish="mosaic"))
    triton = ma.moba_attention(q, k, v, **args, config=ma.MobaConfig(finish="triton"))
    rel = float(jnp.linalg.norm((out - triton).astype(F32)) / jnp.linalg.norm(triton.astype(F32)))
    assert rel < 3e-3, rel  # the same selection and partials; sums in another order
    want = ma.moba_attention_reference(q.astype(F32), k.astype(F32), v.astype(F32), **args)
    rel = float(jnp.linalg.norm(out.astype(F32) - want) / jnp.linalg.norm(want))
    assert rel < 2e-2, rel  # near ties of the 16-bit gate may flip a few selections


@pytest.mark.gpu
def test_gpu_mosaic_path_is_deterministic():
    """Repeated calls through both Mosaic kernels (this one and `moba_partials_mosaic`) give
    bit-equal outputs. Before its partial ring was fenced, this kernel released a slot to the next
    TMA copy while reads of it were still pending, and calls differed in a few rows (2 of 8 calls
    at 16K tokens, every call at 128K)."""
    if not mosaic_softmax.on_hopper():
        pytest.skip("the Mosaic kernel needs a Hopper GPU")
    q, k, v = random_qkv(5, 65536, 65536, 32, 8, 128, BF16)
    config = ma.MobaConfig(finish="mosaic", partials="mosaic")
    run = jax.jit(lambda q, k, v: ma.moba_attention(q, k, v, block_size=512, top_k=3, config=config))
    first = np.asarray(run(q, k, v))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(run(q, k, v)), first)


@pytest.mark.parametrize("finish, block, one_sequence, want", [
    ("auto", 512, True, True), ("auto", 4096, True, True), ("auto", 512, False, False),
    ("triton", 512, True, False), ("mosaic", 4096, True, True),
])  # fmt: skip
def test_which_finish_kernel_runs(monkeypatch, finish, block, one_sequence, want):
    """auto: Mosaic where it runs (measured faster), else Triton; an explicit choice wins."""
    monkeypatch.setattr(mosaic, "fits", lambda q, num_kv_heads, block_size: True)  # as on a Hopper GPU
    st = ma._Static(block, 3, 1.0, ma.MobaConfig(finish=finish), False)
    st = ma.with_kernels(st, jnp.zeros((8, 4, 128), BF16), 2, one_sequence=one_sequence)
    assert st.mosaic_finish == want
