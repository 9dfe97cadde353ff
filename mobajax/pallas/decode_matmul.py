"""A few rows times weight matrices (decode projections), streaming the weights (Pallas Triton).

At decode a projection is x [M <= 16, K] @ w [K, N]: the weights are read once and the FLOPs are
negligible, so the kernel's job is to stream w at the copy rate. Program (column block j, K split
s) computes x[:, rows_s] @ w[rows_s, block_j] as a [16, chunk] x [chunk, block_n] tensor-core dot
per loop step (rows of x past M are zero): Triton pipelines the weight tiles of a dot through
shared memory, which keeps enough loads in flight (the structure of `moe_decode`).

Several weights with the same K (the q, k and v projections) run in one launch and write one
[M, N_1 + N_2 + ...] result, the form their consumer reads whole (`rope_kv_write`).

With S > 1 splits of K (more programs for narrow outputs) the kernel writes float32 partial
sums [M, S, N] and one XLA reduction adds them, or (sum_splits=False) they are returned for a
consumer that adds them itself (`add_rms_norm`); with one split it writes the product itself.

Shapes: x [M, K], weights [K, N_i] -> [M, sum N_i] in x's dtype (float32 accumulation), or
float32 partial sums [M, S, sum N_i]. K and every N_i multiples of 16 (`fits`).
`interpret=True` runs it on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mobajax.pallas import online_softmax as osm

MMA_ROWS = 16  # the smallest M of a tensor-core dot, and the most rows the kernel takes
MIN_BLOCKS = 64  # column blocks that stream the weights without splitting K (automatic splits)
MIN_PROGRAMS = 128  # programs the automatic splits aim for below MIN_BLOCKS


@dataclasses.dataclass(frozen=True)
class DecodeMatmulConfig:
    """Tile sizes (powers of two, each shrunk to fit its dim): block_n columns per program,
    splits of K (float32 partials when > 1; None: one split when there are at least
    MIN_BLOCKS column blocks, else enough splits for MIN_PROGRAMS programs), chunk weight rows per
    loop step. Defaults: the best of the H100 sweeps at the Qwen3-30B-A3B q/k/v and o shapes
    (docs/benchmarks.md)."""

    block_n: int = 64
    splits: int | None = None
    chunk: int = 128
    num_warps: int = 4
    num_stages: int = 5

    def __post_init__(self):
        for name in ("block_n", "chunk"):
            value = getattr(self, name)
            if not osm.is_power_of_two(value) or value < MMA_ROWS:
                raise ValueError(f"{name} must be a power of two >= {MMA_ROWS}, got {value}")
        if self.splits is not None and not osm.is_power_of_two(self.splits):
            raise ValueError(f"splits must be a power of two or None, got {self.splits}")


def fits(rows: int, k: int, widths: Sequence[int]) -> bool:
    """Whether the kernel takes `rows` rows, contraction K and output widths N_i."""
    return 1 <= rows <= MMA_ROWS and all(n % MMA_ROWS == 0 for n in (k, *widths))


def _kernel(x_ref, *refs, bounds, chunk):
    *w_refs, out_ref = refs
    j, s = pl.program_id(0), pl.program_id(1)
    m, k = x_ref.shape
    splits = pl.num_programs(1)
    rows_per_split = k // splits
    block_n = out_ref.shape[1] // bounds[-1]
    row = jnp.arange(MMA_ROWS)
    live = (row < m)[:, None]
    dtype = w_refs[0].dtype
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None

    def product(w_ref, first_block):
        cols = pl.ds((j - first_block) * block_n, block_n)

        def body(i, acc):
            start = s * rows_per_split + i * chunk
            tile = (jnp.minimum(row, m - 1)[:, None], start + jnp.arange(chunk)[None, :])
            xs = plgpu.load(x_ref.at[tile], mask=live, other=0).astype(dtype)
            w = w_ref[pl.ds(start, chunk), cols]
            return acc + jnp.dot(xs, w, preferred_element_type=jnp.float32, precision=precision)

        acc = lax.fori_loop(0, rows_per_split // chunk, body, jnp.zeros((MMA_ROWS, block_n), jnp.float32))
        store = (row[:, None] * splits + s, j * block_n + jnp.arange(block_n)[None, :])
        plgpu.store(out_ref.at[store], acc.astype(out_ref.dtype), mask=live)

    if len(w_refs) == 1:
        product(w_refs[0], 0)
        return
    for w_ref, first, end in zip(w_refs, bounds[:-1], bounds[1:]):
        pl.when((j >= first) & (j < end))(functools.partial(product, w_ref, first))


@functools.partial(jax.jit, static_argnames=("config", "sum_splits", "interpret"))
def decode_matmul(
    x: jax.Array,
    weights: Sequence[jax.Array],
    *,
    config: DecodeMatmulConfig = DecodeMatmulConfig(),
    sum_splits: bool = True,
    interpret: bool = False,
) -> jax.Array:
    """x [M, K] @ concat(weights [K, N_i], axis=1) -> [M, sum N_i] in x's dtype; float32
    accumulation; M <= 16. sum_splits=False: the float32 partial sums [M, S, sum N_i] over the
    config's S splits of K instead."""
    weights = tuple(weights)
    if x.ndim != 2 or not weights or any(w.ndim != 2 or w.shape[0] != x.shape[1] for w in weights):
        raise ValueError(
            f"x must be [M, K] and weights [K, N_i], got {x.shape} and {[w.shape for w in weights]}"
        )
    if len({w.dtype for w in weights}) != 1:
        raise ValueError(f"weights must share one dtype, got {[str(w.dtype) for w in weights]}")
    m, k = x.shape
    widths = [w.shape[1] for w in weights]
    if not fits(m, k, widths):
        raise ValueError(
            f"decode_matmul takes 1..{MMA_ROWS} rows and K, N_i multiples of {MMA_ROWS}, got M={m}, K={k}, N={widths}"
        )
    block_n = functools.reduce(osm.fit_block, widths, config.block_n)
    blocks = sum(widths) // block_n
    splits = config.splits or (1 if blocks >= MIN_BLOCKS else osm.next_power_of_two(-(-MIN_PROGRAMS // blocks)))
    splits = osm.fit_block(splits, k // MMA_ROWS)
    chunk = osm.fit_block(config.chunk, k // splits)
    bounds = (0, *itertools.accumulate(n // block_n for n in widths))
    out_dtype = x.dtype if splits == 1 and sum_splits else jnp.float32
    whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))  # noqa: E731
    out = pl.pallas_call(
        functools.partial(_kernel, bounds=bounds, chunk=chunk),
        grid=(bounds[-1], splits),
        in_specs=[whole(x.shape)] + [whole(w.shape) for w in weights],
        out_specs=whole((splits * m, sum(widths))),
        out_shape=jax.ShapeDtypeStruct((splits * m, sum(widths)), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="decode_matmul",
    )(x, *weights)
    out = out.reshape(m, splits, -1)
    if not sum_splits:
        return out
    return out[:, 0] if splits == 1 else jnp.sum(out, axis=1).astype(x.dtype)
