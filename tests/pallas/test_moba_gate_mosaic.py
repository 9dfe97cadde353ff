"""moba_gate_mosaic: lowering to Mosaic GPU on the CPU, its ranked insertion and padding, the
dispatch rule, and on a Hopper GPU its selection against the Triton gate's and the reference's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.moba import moba_selected_chunks
from mobajax.pallas import moba_attention as ma
from mobajax.pallas import moba_finish_mosaic as finish_mosaic
from mobajax.pallas import moba_gate_mosaic as mosaic
from mobajax.pallas import mosaic_softmax
from tests.pallas.conftest import random_qkv

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
SHAPE = jax.ShapeDtypeStruct


@pytest.mark.parametrize("picks, chunks", [(1, 64), (2, 256), (11, 8192)])
def test_lowers_to_mosaic_gpu(picks, chunks):
    """The whole Pallas -> Mosaic GPU lowering, with the inlined row copies, runs on a machine
    without a GPU."""
    t, n, kv, h = 1000, 16, 4, 128
    fn = jax.jit(
        mosaic.select_chunks_mosaic.__wrapped__,
        static_argnames=("num_tokens", "block_size", "picks", "num_chunks", "pad", "key_dtype", "num_programs"),
    )
    pooled = SHAPE((kv, chunks, h), BF16)
    lowered = fn.trace(SHAPE((t, n, h), BF16), pooled, pooled, SHAPE((1,), jnp.int32), num_tokens=t,
                       block_size=16, picks=picks, num_chunks=chunks, pad=128,
                       key_dtype=ma.key_dtype(chunks))  # fmt: skip
    keys = lowered.out_info
    assert keys.shape == (n * picks * mosaic.key_tokens(t, n // kv) + 128,)
    assert keys.dtype == (jnp.uint8 if chunks <= 256 else jnp.uint16)
    assert "mosaic_gpu" in lowered.lower(lowering_platforms=("cuda",)).as_text()


def _close_scores(rng, rows, chunks, scale):
    """Scores of magnitude about scale, each a copy of, or one float32 step from, a few values."""
    base = (rng.standard_normal(4) * scale).astype(np.float32)
    steps = np.array([-np.inf, 0.0, np.inf], np.float32)
    values = np.nextafter(base[:, None], steps[None, :]).reshape(-1)  # each value and its neighbours
    return rng.choice(values, size=(rows, chunks)).astype(np.float32)


@pytest.mark.parametrize("scores_of", ["integers", "tiny", "ones", "huge"])
def test_picks_keep_the_best_first_lower_id_on_ties(scores_of):
    """The kernel's picks (`block_pick` per block, blocks by increasing id, each block's best
    offered first to `_insert`) leave the `picks` best by (higher score, then lower id): with
    many ties, and with scores one float32 step apart at the smallest magnitude `block_pick`
    promises (2**-96), about 1, and near the largest."""
    rng = np.random.default_rng(0)
    rows, chunks, picks, block = 5, 40, 4, 8
    if scores_of == "integers":
        scores = rng.integers(0, 6, size=(rows, chunks)).astype(np.float32)
    else:
        scale = {"tiny": 2.0**-96 * 1.5, "ones": 1.0, "huge": 2.0**120}[scores_of]
        scores = _close_scores(rng, rows, chunks, scale)
    scores[0, 3:] = -np.inf  # fewer candidates than picks
    held = (tuple(jnp.full((rows,), -jnp.inf) for _ in range(picks)),
            tuple(jnp.full((rows,), mosaic.NO_CHUNK) for _ in range(picks)))  # fmt: skip
    for b0 in range(0, chunks, block):
        s = jnp.asarray(scores[:, b0:b0 + block])
        place = jnp.broadcast_to(jnp.arange(block, dtype=F32), s.shape)
        for _ in range(picks):  # as the kernel picks from a block
            top, idx, s = mosaic.block_pick(s, place)
            held = mosaic._insert(held, top, idx + b0)
    for r in range(rows):
        want = sorted(range(chunks), key=lambda c: (-scores[r, c], c))[:picks]
        got = [int(i) if s > -np.inf else -1 for s, i in zip(np.array(held[0])[:, r], np.array(held[1])[:, r])]
        assert got == [c if scores[r, c] > -np.inf else -1 for c in want], r


@pytest.mark.parametrize("t, n, kv, picks, chunks", [(37, 16, 4, 2, 9), (70, 8, 8, 3, 300), (5, 16, 1, 1, 4)])
def test_picks_of_keys_reads_back_work_keys(t, n, kv, picks, chunks):
    """`picks_of_keys` inverts `moba_attention.work_keys` over the gate's tile-padded tokens
    (the layout the kernel writes): the picks come back, empty slots as -1."""
    rng = np.random.default_rng(t)
    past = rng.integers(0, chunks - 1, (t, n, picks))
    past = jnp.asarray(np.where(rng.random(past.shape) < 0.3, -1, past), jnp.int32)
    padded = mosaic.key_tokens(t, n // kv)
    assert padded % mosaic.tile_tokens(n // kv) == 0 and padded >= t
    keys = ma.work_keys(jnp.pad(past, ((0, padded - t), (0, 0), (0, 0)), constant_values=-1), kv, chunks, 64)
    np.testing.assert_array_equal(mosaic.picks_of_keys(keys, t, n, kv, picks, chunks), past)


@pytest.mark.parametrize("picks", [1, 4, 5, 11])
def test_compute_warpgroups_fit_the_register_pool(picks):
    """The compute warpgroups ask for no more registers than the data warpgroups (24 each) leave
    of the CTA's launch pool (a larger ask would wait forever), and the tiles of either count
    cover `key_tokens` whole."""
    compute = mosaic.compute_warpgroups(picks)
    assert compute == (4 if picks <= 4 else 2)
    stages, registers = mosaic._stages_and_registers(compute)
    threads = (compute + 2) * 128
    pool = 65536 // threads // 8 * 8 * threads
    assert registers % 8 == 0 and compute * 128 * registers + 2 * 128 * 24 <= pool
    assert registers >= 104 and stages >= 2
    for group in (1, 4, 8):
        assert mosaic.key_tokens(1000, group) % mosaic.tile_tokens(group, compute) == 0


def test_pad_chunks_to_whole_blocks():
    x = jnp.ones((2, 16, 8), F32)
    padded = mosaic.pad_chunks(x)
    assert padded.shape == (2, mosaic.BLOCK_C, 8)
    np.testing.assert_array_equal(padded[:, :16], x)
    assert not padded[:, 16:].any()
    assert mosaic.pad_chunks(jnp.ones((2, 128, 8))).shape == (2, 128, 8)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="gate='cuda'"):
        ma.MobaConfig(gate="cuda")


def test_mosaic_asked_where_it_cannot_run_is_an_error():
    q, k, v = random_qkv(0, 64, 64, 4, 2, 32, F32)
    with pytest.raises(ValueError, match="gate='mosaic' needs"):
        ma.moba_attention(q, k, v, block_size=16, top_k=2, interpret=True, config=ma.MobaConfig(gate="mosaic"))
    with pytest.raises(ValueError, match="gate='mosaic' needs"):
        ma.moba_select(q, k, block_size=16, top_k=2, interpret=True, config=ma.MobaConfig(gate="mosaic"))


@pytest.mark.parametrize("gate, one_sequence, top_k, want", [
    ("auto", True, 3, True), ("auto", True, 5, True), ("auto", True, 6, False), ("auto", False, 3, False),
    ("triton", True, 3, False), ("mosaic", True, 12, True),
])  # fmt: skip
def test_which_gate_kernel_runs(monkeypatch, gate, one_sequence, top_k, want):
    """auto: Mosaic where it runs (one sequence on a Hopper GPU) and top_k <= 5 (measured faster
    there), else Triton; an explicit choice wins. Any block size: the gate does not tile keys."""
    monkeypatch.setattr(finish_mosaic, "fits", lambda q, num_kv_heads, block_size: True)  # a Hopper GPU
    st = ma._Static(48, top_k, 1.0, ma.MobaConfig(gate=gate, finish="triton", partials="triton"), False)
    st = ma.with_kernels(st, jnp.zeros((8, 4, 128), BF16), 2, one_sequence=one_sequence)
    assert st.mosaic_gate == want


@pytest.mark.gpu
@pytest.mark.parametrize(
    "t, s, n, kv, block, top_k, dtype",
    [
        (4096, 4096, 32, 8, 512, 3, BF16),
        (3000, 4100, 8, 1, 256, 4, F16),  # a prefix: tiles not aligned to chunks
        (2048, 2048, 8, 8, 128, 12, BF16),  # one head per kv head; 11 picks, fewer candidates early
        (1, 5000, 4, 2, 128, 3, BF16),  # one token
        (700, 700, 16, 2, 16, 2, BF16),  # 8 heads per kv head; a tile spans chunks
        (20000, 20000, 8, 2, 16, 8, BF16),  # 1250 chunks: 20 blocks
        (500, 600, 16, 1, 64, 3, F16),  # 16 heads per kv head: boxes of 8 tokens
    ],
)
def test_gpu_mosaic_selection_matches_triton_and_reference(t, s, n, kv, block, top_k, dtype):
    if not mosaic_softmax.on_hopper():
        pytest.skip("the Mosaic kernel needs a Hopper GPU")
    q, k, _ = random_qkv(7, t, s, n, kv, 128, dtype)
    args = dict(block_size=block, top_k=top_k)
    got = np.asarray(ma.moba_select(q, k, **args, config=ma.MobaConfig(gate="mosaic")))
    triton = np.asarray(ma.moba_select(q, k, **args, config=ma.MobaConfig(gate="triton")))
    same = (got == triton).all(-1).mean()
    assert same >= 0.9999, same  # hi + lo summed in another order: a rare near tie may flip
    want = np.asarray(moba_selected_chunks(q.astype(F32), k.astype(F32), **args))
    assert (got == want).all(-1).mean() >= 0.999


@pytest.mark.gpu
@pytest.mark.parametrize("block, top_k", [(64, 3), (16, 5)])
def test_gpu_mosaic_ties_go_to_the_lower_chunk(block, top_k):
    """Chunks that repeat (3 distinct ones, so every score ties exactly with those of its class):
    on every row the Mosaic gate's picks are runs of one class each, best class first, each run
    the lowest candidates of its class in increasing order, cut short only by the last pick."""
    if not mosaic_softmax.on_hopper():
        pytest.skip("the Mosaic kernel needs a Hopper GPU")
    t, n, kv = 6000, 16, 4
    q, k, _ = random_qkv(3, t, t, n, kv, 128, BF16)
    k = jnp.tile(k[: 3 * block], (-(-t // (3 * block)), 1, 1))[:t]
    args = dict(block_size=block, top_k=top_k)
    got = np.asarray(ma.moba_select(q, k, **args, config=ma.MobaConfig(gate="mosaic")))
    want = np.asarray(moba_selected_chunks(q.astype(F32), k.astype(F32), **args))
    assert (got == want).all(-1).mean() >= 0.999  # the classes' scores in another order: near ties
    for row, own in zip(got[..., 1:].reshape(-1, top_k - 1), np.repeat(np.arange(t) // block, n)):
        ids = row[row >= 0]
        assert len(ids) == min(own, top_k - 1)
        start = 0
        while start < len(ids):
            members = np.arange(ids[start] % 3, own, 3)
            run = ids[start:start + len(members)]
            run = run[: np.argmin(np.append(run % 3 == ids[start] % 3, False))]
            np.testing.assert_array_equal(run, members[: len(run)])
            assert start + len(run) == len(ids) or len(run) == len(members)
            start += len(run)


@pytest.mark.gpu
@pytest.mark.parametrize("t, n, kv, block, top_k", [(4096, 32, 8, 512, 3), (1000, 16, 2, 16, 4), (700, 8, 8, 64, 2)])
def test_gpu_mosaic_keys_are_the_work_keys_of_its_picks(t, n, kv, block, top_k):
    """The keys the Mosaic gate writes are `work_keys` of its picks (over its
    tile-padded tokens, whose slots are empty), so the work list sorts what the other gates'
    selections would give it."""
    if not mosaic_softmax.on_hopper():
        pytest.skip("the Mosaic kernel needs a Hopper GPU")
    q, k, _ = random_qkv(5, t, t, n, kv, 128, BF16)
    layout = ma._prepare(q, k, k, block, top_k, None, None, None)
    st = ma.with_kernels(ma._Static(block, top_k, 1.0, ma.MobaConfig(gate="mosaic"), False), q, kv, one_sequence=True)
    sel, keys = jax.jit(lambda q, k: ma._selection(st, q, k, layout))(q, k)
    padded = mosaic.key_tokens(t, n // kv)
    past = jnp.pad(sel[..., 1:], ((0, padded - t), (0, 0), (0, 0)), constant_values=-1)
    want = ma.work_keys(past, kv, layout.chunk_len.shape[0], keys.shape[0] - past.size)
    np.testing.assert_array_equal(np.asarray(keys), np.asarray(want))
