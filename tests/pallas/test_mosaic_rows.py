"""mosaic_rows: the per-thread row copies, in a small Mosaic GPU kernel that gathers rows of x
into a slot and scatters them out (lowering on the CPU; on a Hopper GPU against numpy)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.pallas import mosaic_rows, mosaic_softmax


def _copy_rows(x, src, dest, out_rows):
    """out[dest[r]] = x[src[r]] for r < len(src) (a multiple of HALF) where dest[r] >= 0 (other
    rows of out: garbage)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def rows_of(tile, refs, r):
        del tile
        return mosaic_rows.load_i32(refs[0], r), mosaic_rows.load_i32(refs[1], r)

    rows = src.shape[0]
    gather, scatter, _ = mosaic_rows.row_copies(
        row_bytes=x.shape[1] * x.dtype.itemsize, rows_of=rows_of, num_refs=2, rows=rows
    )

    def kernel(x_ref, src_ref, dest_ref, out_ref):
        def body(slot, rows):
            gather(src_ref, x_ref, slot, rows, src_ref, dest_ref)
            scatter(rows, slot, out_ref)

        pl.run_scoped(
            body,
            plgpu.SMEM((rows // mosaic_rows.HALF, mosaic_rows.HALF, x.shape[1]), x.dtype,
                       transforms=mosaic_rows.slot_transforms()),  # fmt: skip
            plgpu.SMEM((2, rows), jnp.int32),
        )

    return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((out_rows, x.shape[1]), x.dtype))(x, src, dest)


def test_rows_must_be_whole_swizzle_rows():
    with pytest.raises(ValueError, match="row_bytes=96"):
        mosaic_rows.row_copies(row_bytes=96, rows_of=None)


def test_tiles_must_be_whole_warpgroup_halves():
    with pytest.raises(ValueError, match="rows=100: must be a multiple of 64"):
        mosaic_rows.row_copies(row_bytes=256, rows_of=None, rows=100)


@pytest.mark.parametrize("rows", [128, 192])
def test_lowers_to_mosaic_gpu(rows):
    shape = jax.ShapeDtypeStruct
    args = (shape((1000, 128), jnp.bfloat16), shape((rows,), jnp.int32), shape((rows,), jnp.int32))
    lowered = jax.jit(lambda x, s, d: _copy_rows(x, s, d, 300)).trace(*args)
    assert "mosaic_gpu" in lowered.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("h, rows", [(64, 128), (128, 128), (256, 128), (128, 192), (64, 256)])
def test_gpu_rows_go_where_their_index_says(h, rows):
    if not mosaic_softmax.on_hopper():
        pytest.skip("the Mosaic kernel needs a Hopper GPU")
    rng = np.random.default_rng(h + rows)
    x = jnp.asarray(rng.standard_normal((5000, h)), jnp.bfloat16)
    src = rng.integers(0, 5000, rows).astype(np.int32)  # repeats allowed
    dest = rng.permutation(300)[:rows].astype(np.int32)
    dest[::7] = -1  # rows not written
    out = np.asarray(_copy_rows(x, jnp.asarray(src), jnp.asarray(dest), 300))
    live = dest >= 0
    np.testing.assert_array_equal(out[dest[live]], np.asarray(x)[src[live]])
