"""Pallas MoBA prefill (interpret mode on CPU, compiled on a GPU) against mobajax.moba."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.moba import moba_attention_dense_mask, moba_selected_chunks
from mobajax.pallas.moba_attention import (
    SHARED_MEMORY_BUDGET,
    MobaConfig,
    finish_rows,
    fit_shared_memory,
    moba_attention,
    moba_attention_reference,
    moba_select,
    partial_row,
    work_keys,
    work_list,
    work_row_query,
)
from mobajax.pallas.moba_finish_mosaic import token_stride
from mobajax.pallas.moba_gate import chunk_means_pallas, moba_layout, select_chunks_pallas
from tests.pallas.conftest import assert_close, random_qkv

F32, BF16 = jnp.float32, jnp.bfloat16
SMALL = MobaConfig(block_q=16, block_k=16, gate_block_q=16)



# T, S, N, K, H, block, top_k, dtype: block sizes 8-256, top-k 1 .. beyond the chunks, GQA 1-32,
# T < S (prefix), partial last chunks, float32 and bf16.
CASES = [
    (64, 64, 4, 4, 16, 16, 2, F32),
    (100, 100, 8, 2, 32, 16, 3, F32),
    (48, 112, 8, 1, 16, 32, 4, BF16),
    (90, 90, 4, 1, 16, 64, 1, F32),
    (60, 200, 4, 2, 16, 16, 50, F32),
    (269, 269, 2, 2, 16, 256, 2, BF16),
    (130, 150, 4, 1, 16, 128, 2, F32),
    (50, 100, 6, 2, 16, 8, 3, BF16),  # GQA 3: own-chunk tiles with an unused last row
    (7, 40, 32, 1, 16, 8, 2, F32),  # GQA 32: one token per own-chunk tile
]


@pytest.mark.parametrize("t,s,n,kv,h,block,top_k,dtype", CASES)
def test_kernel_matches_reference(t, s, n, kv, h, block, top_k, dtype):
    q, k, v = random_qkv(t + s, t, s, n, kv, h, dtype)
    sel = moba_select(q, k, block_size=block, top_k=top_k, config=SMALL, interpret=True)
    want_sel = moba_selected_chunks(q, k, block_size=block, top_k=top_k)
    np.testing.assert_array_equal(np.asarray(sel), np.asarray(want_sel))
    out = moba_attention(q, k, v, block_size=block, top_k=top_k, config=SMALL, interpret=True)
    want = moba_attention_reference(q, k, v, block_size=block, top_k=top_k)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, want, dtype, f"T={t} S={s} B={block} top_k={top_k}")


def test_ragged_batch_with_empty_and_prefix_sequences_and_padding():
    n, kv, h, block = 4, 2, 16, 16
    cu_q = jnp.array([0, 20, 20, 60, 75], jnp.int32)  # seq 1 has no queries
    cu_k = jnp.array([0, 50, 60, 100, 115], jnp.int32)  # every T_b <= S_b: prefixes
    q, k, v = random_qkv(7, 80, 120, n, kv, h, F32)  # tokens 75..79 are padding
    args = dict(block_size=block, top_k=3, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    out = moba_attention(q, k, v, **args, config=SMALL, interpret=True)
    want = moba_attention_reference(q, k, v, **args)
    assert_close(out, want, F32, "ragged")
    assert float(jnp.max(jnp.abs(out[75:]))) == 0.0
    sel = np.asarray(moba_select(q, k, **args, config=SMALL, interpret=True))
    for b in range(4):
        lo, hi, klo, khi = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        if hi > lo:
            ref = moba_selected_chunks(q[lo:hi], k[klo:khi], block_size=block, top_k=3)
            np.testing.assert_array_equal(sel[lo:hi], np.asarray(ref), err_msg=f"seq {b}")
    assert (sel[75:] == -1).all()


def test_explicit_positions_and_default_config():
    q, k, v = random_qkv(8, 32, 96, 4, 2, 32, F32)
    pos = jnp.arange(40, 72, dtype=jnp.int32)  # a middle slice: later keys must stay unseen
    out = moba_attention(q, k, v, block_size=16, top_k=3, q_positions=pos, interpret=True)
    want = moba_attention_reference(q, k, v, block_size=16, top_k=3, q_positions=pos)
    assert_close(out, want, F32, "q_positions")


def test_tiles_of_padding_tokens_only():
    # 30 padding tokens after one sequence of 10: own-chunk tiles (8 tokens) with no live row
    q, k, v = random_qkv(10, 40, 30, 4, 2, 16, F32)
    args = dict(block_size=16, top_k=2, cu_seqlens_q=jnp.array([0, 10]), cu_seqlens_k=jnp.array([0, 30]))
    out = moba_attention(q, k, v, **args, config=SMALL, interpret=True)
    assert_close(out, moba_attention_reference(q, k, v, **args), F32, "padding tiles")
    assert float(jnp.max(jnp.abs(out[10:]))) == 0.0


def test_positions_past_a_sequence_never_read_the_next_one():
    # sequence 0 has 40 keys; its queries at 40..45 (past its last key, within its last chunk)
    # see its own keys only, as in the reference
    q, k, v = random_qkv(9, 32, 96, 4, 2, 32, F32)
    cu_q, cu_k = jnp.array([0, 16, 32], jnp.int32), jnp.array([0, 40, 96], jnp.int32)
    pos = jnp.concatenate([jnp.arange(30, 46), jnp.arange(40, 56)]).astype(jnp.int32)
    args = dict(block_size=16, top_k=3, q_positions=pos, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    out = moba_attention(q, k, v, **args, config=SMALL, interpret=True)
    assert_close(out, moba_attention_reference(q, k, v, **args), F32, "past the keys")


@pytest.mark.parametrize("prefix", [1, 7, 16])
def test_own_chunk_tiles_ending_anywhere_in_a_key_block(prefix):
    # one head, 16-row tiles: each tile of the own chunk stops at its last token, which with
    # these prefixes lands on, just past and mid-way into a 16-key block
    q, k, v = random_qkv(prefix, 96 - prefix, 96, 1, 1, 16, F32)
    for top_k in (1, 2):
        out = moba_attention(q, k, v, block_size=64, top_k=top_k, config=SMALL, interpret=True)
        want = moba_attention_reference(q, k, v, block_size=64, top_k=top_k)
        assert_close(out, want, F32, f"prefix {prefix}, top_k {top_k}")


def test_several_passes_over_the_tokens_give_the_same_result():
    q, k, v = random_qkv(14, 64, 64, 4, 2, 16, F32)
    tiny = MobaConfig(block_q=16, block_k=16, gate_block_q=16, max_partial_bytes=4096)
    out = moba_attention(q, k, v, block_size=16, top_k=2, config=tiny, interpret=True)
    want = moba_attention_reference(q, k, v, block_size=16, top_k=2)
    assert_close(out, want, F32, "4 passes")


def _check_ties_pick_the_lower_chunk(dtype, interpret):
    row = np.random.default_rng(9).standard_normal((1, 1, 16))
    k = jnp.asarray(np.tile(row, (64, 1, 1)), dtype)  # all pooled keys equal: every score ties
    q, _, _ = random_qkv(9, 64, 64, 2, 1, 16, dtype)
    sel = moba_select(q, k, block_size=8, top_k=3, config=SMALL, interpret=interpret)
    np.testing.assert_array_equal(
        np.asarray(sel), np.asarray(moba_selected_chunks(q, k, block_size=8, top_k=3))
    )
    assert (np.asarray(sel)[-1] == [7, 0, 1]).all()


def test_ties_pick_the_lower_chunk_like_the_reference():
    _check_ties_pick_the_lower_chunk(F32, interpret=True)


# T, S, N, K, block, config, dtype: a gate program scores the N / K heads of one kv head for a tile
# of tokens, rows (token, head) capped by the padded chunks Cp (rows * Cp <= 16384, >= 16 rows):
# 8 tokens a tile (Cp 256, GQA 8), 2 (Cp 1024, GQA 8), 1 (GQA 32 over the 16-row cap), 21 and
# 85 with a dead last row (GQA 3), 64 (a larger score tile: 256 x 256).
GATE_CASES = [
    (45, 3000, 8, 1, 16, SMALL, BF16),
    (45, 3000, 8, 2, 16, SMALL, F32),
    (9, 4000, 8, 1, 4, SMALL, BF16),
    (5, 4000, 32, 1, 4, SMALL, F32),
    (50, 100, 6, 2, 8, SMALL, BF16),
    (200, 200, 6, 2, 16, MobaConfig(), F32),
    (300, 3000, 8, 2, 16, MobaConfig(gate_scores=65536), BF16),  # 64 tokens x 4 heads a tile
]


@pytest.mark.parametrize("t,s,n,kv,block,config,dtype", GATE_CASES)
def test_gate_tiles_of_all_heads_of_a_kv_head(t, s, n, kv, block, config, dtype):
    q, k, _ = random_qkv(t + s + n, t, s, n, kv, 16, dtype)
    sel = moba_select(q, k, block_size=block, top_k=4, config=config, interpret=True)
    want = moba_selected_chunks(q, k, block_size=block, top_k=4)
    np.testing.assert_array_equal(np.asarray(sel), np.asarray(want))


# top_k, block_c, dtype: gate programs scoring 16 .. 256 chunks at a time (Cp 256), 2 .. 39 picks
@pytest.mark.parametrize(
    "top_k,block_c,dtype", [(3, 16, F32), (12, 16, BF16), (12, 64, F32), (40, 256, F32)]
)
def test_gate_skips_chunk_blocks_past_every_candidate(top_k, block_c, dtype):
    # 246 chunks of 4 keys in 3 sequences (one empty) and tokens at scattered positions: 16-token
    # tiles whose candidates span from one chunk block to all of them, across sequences
    block, n, kv = 4, 8, 2
    cu_q = jnp.array([0, 48, 48, 90, 170], jnp.int32)
    cu_k = jnp.array([0, 300, 300, 450, 980], jnp.int32)
    q, k, _ = random_qkv(top_k + block_c, 180, 980, n, kv, 16, dtype)  # tokens 170..179: padding
    rng = np.random.default_rng(block_c)
    pos = np.zeros(180, np.int32)
    for b in range(4):
        lo, hi = int(cu_q[b]), int(cu_q[b + 1])
        pos[lo:hi] = np.sort(rng.choice(int(cu_k[b + 1] - cu_k[b]), hi - lo, replace=False))
    pos = jnp.asarray(pos)
    args = dict(block_size=block, top_k=top_k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, q_positions=pos)
    layout = moba_layout(cu_q, cu_k, pos, 180, 980, block)
    kbar = chunk_means_pallas(k, layout, dtype=q.dtype, block_k=16, interpret=True, num_warps=4)
    assert kbar[0].shape[1] == 256
    sel = select_chunks_pallas(q, kbar, layout, slots=top_k, block_q=16, max_scores=16384,
                               interpret=True, num_warps=4, block_c=block_c)  # fmt: skip
    sel = np.asarray(jnp.where(sel >= 0, sel - layout.token_lo[:, None, None], -1))
    np.testing.assert_array_equal(
        sel, np.asarray(moba_select(q, k, **args, config=SMALL, interpret=True))
    )
    for b in (0, 2, 3):
        lo, hi, klo, khi = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        ref = moba_selected_chunks(q[lo:hi], k[klo:khi], block_size=block, top_k=top_k,
                                   q_positions=pos[lo:hi])  # fmt: skip
        np.testing.assert_array_equal(sel[lo:hi], np.asarray(ref), err_msg=f"seq {b}")
    assert (sel[170:] == -1).all()


@pytest.mark.parametrize("dtype,n", [(BF16, 8), (F32, 6)])
def test_lowers_to_triton(lower_for_gpu, dtype, n):
    """Pallas -> Triton IR of the four kernels (chunk means, gate, past-chunk attention, own chunk
    + merge); no GPU needed."""
    q = jax.ShapeDtypeStruct((1024, n, 128), dtype)
    k = jax.ShapeDtypeStruct((16384, 2, 128), dtype)  # 256 chunks: the gate's tile cap applies
    text = lower_for_gpu(moba_attention, q, k, k, block_size=64, top_k=3)
    assert text.count("__gpu$xla.gpu.triton") == 4


@pytest.mark.parametrize("n,kv", [(4, 4), (8, 2)])
def test_gradients_match_reference(n, kv):
    q, k, v = random_qkv(10, 40, 40, n, kv, 16, F32)
    args = dict(block_size=8, top_k=3)

    def loss(q, k, v):
        out = moba_attention(q, k, v, **args, config=SMALL, interpret=True)
        return jnp.sum(jnp.sin(out))

    def loss_ref(q, k, v):
        return jnp.sum(jnp.sin(moba_attention_dense_mask(q, k, v, **args)))

    got = jax.grad(loss, (0, 1, 2))(q, k, v)
    want = jax.grad(loss_ref, (0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", got, want):
        assert float(jnp.max(jnp.abs(b))) > 0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5,
                                   err_msg=f"d{name}")  # fmt: skip


def _largest_array(hlo_text: str) -> int:
    sizes = [1]
    for dims in re.findall(r"[a-z]+\d*\[([\d,]+)\]", hlo_text):
        sizes.append(int(np.prod([int(d) for d in dims.split(",") if d])))
    return max(sizes)


def test_selection_memory_is_per_token_top_k_not_per_chunk():
    """No array of the compiled program reaches T * N * C elements (a dense gate would)."""
    t, n, kv, h, block, top_k = 1024, 4, 2, 16, 4, 2
    chunks = t // block  # 256: the gate would be 8x the largest array we allow
    q, k, v = random_qkv(11, t, t, n, kv, h, F32)
    gate_size = t * n * chunks

    def compiled(fn):
        return jax.jit(fn).lower(q, k, v).compile()

    kernel = compiled(lambda q, k, v: moba_attention(q, k, v, block_size=block, top_k=top_k,
                                                     interpret=True))  # fmt: skip
    largest = _largest_array(kernel.as_text())
    assert largest < gate_size // 4, f"largest array {largest} vs gate {gate_size}"
    # the check can fail: the dense-mask reference holds a [T, N, C] gate and a [T, N, S] mask
    dense = compiled(lambda q, k, v: moba_attention_dense_mask(q, k, v, block_size=block,
                                                               top_k=top_k))  # fmt: skip
    assert _largest_array(dense.as_text()) >= gate_size
    temp = kernel.memory_analysis().temp_size_in_bytes
    assert temp < gate_size * 4, f"temp {temp} bytes vs float32 gate {gate_size * 4}"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block_size=0, top_k=2), "block_size"),
        (dict(block_size=16, top_k=0), "top_k"),
        (dict(block_size=16, top_k=2, cu_seqlens_q=jnp.array([0, 8])), "cu_seqlens"),
        (dict(block_size=1, top_k=2), "chunks"),
    ],
)
def test_bad_input_is_rejected(kwargs, match):
    q, k, v = random_qkv(0, 16, 16384, 2, 2, 16, F32)
    with pytest.raises(ValueError, match=match):
        moba_attention(q, k, v, **kwargs, interpret=True)


def test_bad_config_and_head_dim_are_rejected():
    with pytest.raises(ValueError, match="block_q"):
        MobaConfig(block_q=48)
    with pytest.raises(ValueError, match="gate_scores"):
        MobaConfig(gate_scores=3000)
    q, k, v = random_qkv(0, 16, 16, 2, 2, 24, F32)
    with pytest.raises(ValueError, match="head dim 24"):
        moba_attention(q, k, v, block_size=8, top_k=2, interpret=True)


@pytest.mark.parametrize(
    "head_dim, itemsize, want",
    [
        (128, 2, (256, 64, 8)),  # the default fits as it is
        (64, 4, (256, 64, 8)),
        (128, 4, (128, 32, 4)),  # float32: the former default
        (256, 2, (128, 32, 4)),
        (256, 4, (64, 16, 4)),
    ],
)
def test_tiles_shrink_to_fit_shared_memory(head_dim, itemsize, want):
    config = fit_shared_memory(MobaConfig(), head_dim, itemsize)
    assert (config.block_q, config.block_k, config.num_warps) == want
    size = (config.block_q + 2 * config.num_stages * config.block_k) * head_dim * itemsize
    assert size <= SHARED_MEMORY_BUDGET
    assert config.num_stages == MobaConfig().num_stages


@pytest.mark.parametrize("t, n, kv, slots, chunks, block_q", [
    (37, 32, 8, 2, 9, 16),  # 8-bit keys
    (50, 8, 2, 3, 300, 32),  # 16-bit keys: more than 256 chunks
    (6, 4, 4, 1, 1, 16),  # one chunk: every slot empty, no tiles
])  # fmt: skip
def test_work_list_tiles_hold_each_row_once_in_its_bucket(t, n, kv, slots, chunks, block_q):
    """Every filled (token, head, slot) row is in exactly one tile, every tile's rows read its
    bucket's chunk from its bucket's kv head, empty slots are in none, and `work_row_query`
    names each row's query row and slot."""
    rng = np.random.default_rng(t)
    sel = rng.integers(0, max(chunks - 1, 1), (t, n, slots))
    sel = np.where(rng.random((t, n, slots)) < 0.2, -1, sel) if chunks > 1 else np.full((t, n, slots), -1)
    keys = work_keys(jnp.asarray(sel, jnp.int32), kv, chunks, block_q)
    assert keys.dtype == (jnp.uint8 if chunks <= 256 else jnp.uint16)
    bucket, start, size, order = (np.asarray(a) for a in jax.jit(work_list, static_argnums=(1, 2, 3, 4))(
        keys, sel.size, kv, chunks, block_q))  # fmt: skip
    assert order.shape == (sel.size + block_q,)
    seen = []
    for b, s0, live in zip(bucket, start, size):
        rows = order[s0 : s0 + live]
        tn, slot = (np.asarray(a) for a in work_row_query(jnp.asarray(rows), slots, t, n, kv))
        tok, head = tn // n, tn % n
        np.testing.assert_array_equal(sel[tok, head, slot], b // kv)
        np.testing.assert_array_equal(head // (n // kv), b % kv)
        seen += (tn * slots + slot).tolist()
    want = np.flatnonzero(sel.reshape(-1) >= 0)
    assert sorted(seen) == want.tolist()
    assert (size <= block_q).all()


@pytest.mark.parametrize("t, n, kv, slots", [(37, 32, 8, 11), (5, 12, 4, 2), (9, 6, 2, 3), (4, 4, 4, 1)])
def test_partials_of_a_finish_tile_are_consecutive_rows(t, n, kv, slots):
    """partial_row is one-to-one into the slots * N * token_stride(T) rows (T rounded up to a
    multiple of 4), and for every slot the rows of a finish tile (consecutive tokens x the heads
    of one kv head) form one block starting at the tile's first row, which is what the finish
    kernel loads."""
    group = n // kv
    rows = finish_rows(MobaConfig(block_q=16), group)
    tn = np.arange(t * n)
    dest = np.stack([np.asarray(partial_row(tn, j, t, n, kv)) for j in range(slots)])
    assert len(set(dest.ravel().tolist())) == dest.size
    assert dest.min() >= 0 and dest.max() < slots * n * token_stride(t)
    per_tile = rows // group
    for j in range(slots):
        for h in range(kv):
            for tok0 in range(0, t, per_tile):
                r = np.arange(per_tile * group)
                tok, head = tok0 + r // group, h * group + r % group
                real = tok < t
                got = dest[j, (tok * n + head)[real]]
                base = int(partial_row(tok0 * n + h * group, j, t, n, kv))
                np.testing.assert_array_equal(got, base + r[real])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_gpu_kernel_matches_reference(dtype):
    from mobajax.moba import _gate, chunk_attention

    t, s, n, kv, h, block, top_k = 3000, 4096, 8, 2, 128, 256, 3
    q, k, v = random_qkv(12, t, s, n, kv, h, dtype)
    sel = moba_select(q, k, block_size=block, top_k=top_k)
    want_sel = moba_selected_chunks(q, k, block_size=block, top_k=top_k)
    flipped = np.asarray(jnp.any(jnp.sort(sel, -1) != jnp.sort(want_sel, -1), axis=-1))
    # the bf16 gate runs as two bf16 matmuls (about 2**-16 relative): near ties may flip
    assert flipped.mean() < (1e-2 if dtype == BF16 else 1e-4), flipped.mean()
    gate = _gate(q, k, block)
    score = lambda c: jnp.sum(jnp.take_along_axis(gate, jnp.maximum(c[..., 1:], 0), -1)  # noqa: E731
                              * (c[..., 1:] >= 0), -1)  # fmt: skip
    assert float(jnp.max(jnp.abs(score(sel) - score(want_sel)))) < 1e-3
    out = moba_attention(q, k, v, block_size=block, top_k=top_k)
    starts = jnp.arange(s // block, dtype=jnp.int32) * block
    lens = jnp.full_like(starts, block)
    want = chunk_attention(q, k, v, s - t + jnp.arange(t), sel, starts, lens, starts,
                           block_size=block, scale=h**-0.5)  # fmt: skip
    rel = float(jnp.linalg.norm((out - want).astype(F32)) / jnp.linalg.norm(want.astype(F32)))
    assert rel < (1e-2 if dtype == BF16 else 3e-3), rel  # Triton's float32 dot is tf32


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_gpu_ties_pick_the_lower_chunk(dtype):  # the picks' argmax under Triton
    _check_ties_pick_the_lower_chunk(dtype, interpret=False)


@pytest.mark.gpu
def test_gpu_ragged_and_gradients():
    cu_q = jnp.array([0, 700, 1500, 1800], jnp.int32)
    cu_k = jnp.array([0, 1000, 1800, 2900], jnp.int32)
    q, k, v = random_qkv(13, 1800, 2900, 8, 2, 64, F32)  # float32: selections match exactly
    args = dict(block_size=128, top_k=4, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    out = moba_attention(q, k, v, **args)
    want = moba_attention_reference(q, k, v, **args)
    rel = float(jnp.linalg.norm(out - want) / jnp.linalg.norm(want))
    assert rel < 3e-3, rel
    q, k, v = (x[:256] for x in (q, k, v))
    g = jax.grad(lambda q: jnp.sum(moba_attention(q, k, v, block_size=64, top_k=2) ** 2))(q)
    g_ref = jax.grad(
        lambda q: jnp.sum(moba_attention_reference(q, k, v, block_size=64, top_k=2) ** 2)
    )(q)
    rel = float(jnp.linalg.norm(g - g_ref) / jnp.linalg.norm(g_ref))
    assert rel < 3e-3, rel
