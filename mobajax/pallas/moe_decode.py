"""MoE experts for a few tokens (decode): two kernels instead of sort + grouped matmuls + scatter.

With a handful of tokens (N * top_k assignments well below the number of experts) every
assignment reads its own expert's weights anyway, so the experts run per assignment:
1. `gate_up`: program (assignment p, F tile j, D split s) computes x[t, rows] @ gate[e][rows,
   tile] and the same with up over its split's D rows into float32 partials g, u [P, S, F], for
   t = p // top_k and e = experts[p]. Splitting D gives enough programs for one token;
2. h = silu(sum_s g) * sum_s u, rounded to x's dtype (one small XLA fusion) [P, F];
3. `down`: program (assignment p, D tile j, F split s) writes y[p, s, tile] = weights[p] *
   h[p, rows] @ down[e][rows, tile] (float32); the sum over splits and over a token's
   assignments is a reduction XLA fuses into what follows.
The one-row products run on the tensor cores as [16, chunk] x [chunk, block] dots whose rows
past the first are zero: Triton pipelines the weight tiles of a dot through shared memory, which
keeps enough loads in flight to stream the weights (elementwise multiply-sum loops measured
20-40% of the copy bandwidth, see docs/benchmarks.md). Assignments with an expert id outside
0..E-1 (an expert held by another device under expert parallelism) contribute 0 and read
nothing. No atomics: the result is deterministic.

Pallas with the Triton lowering; `interpret=True` runs it on CPU. `moe_decode_reference` is the
same contract in plain jax.numpy. D and F must be multiples of 16 (`fits`).

Shape letters: N tokens, D model dim, E experts (held here), F expert MLP dim, k top-k,
P = N * k assignments, S splits of the contraction.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mobajax.pallas import online_softmax as osm

MMA_ROWS = 16  # the smallest M of a tensor-core dot; row 0 holds the one real row


@dataclasses.dataclass(frozen=True)
class MoeDecodeConfig:
    """Tile sizes (powers of two; each shrinks to fit its dim, never below 16 rows or columns).

    block_f: F columns per `gate_up` program; splits: D splits per `gate_up` assignment;
    block_d: D columns per `down` program; down_splits: F splits per `down` assignment;
    chunk: weight rows per loop step in both kernels."""

    block_f: int = 128
    splits: int = 8
    block_d: int = 64
    down_splits: int = 2
    chunk: int = 32
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_f", "splits", "block_d", "down_splits", "chunk"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        for name in ("block_f", "block_d", "chunk"):
            if getattr(self, name) < MMA_ROWS:
                raise ValueError(f"{name} must be at least {MMA_ROWS}, got {getattr(self, name)}")


def fits(d: int, f: int) -> bool:
    """Whether the kernels take model dim D and expert MLP dim F (multiples of 16)."""
    return d % MMA_ROWS == 0 and f % MMA_ROWS == 0


def _split(splits: int, dim: int) -> int:
    """Splits of dim (a power of two <= splits) leaving whole 16-row multiples per split."""
    return osm.fit_block(splits, dim // MMA_ROWS)


def _one_row(v: jax.Array, dtype) -> jax.Array:
    """v [chunk] -> [MMA_ROWS, chunk] in dtype: row 0 is v, the others 0."""
    rows = jnp.broadcast_to(v.astype(dtype)[None, :], (MMA_ROWS, v.shape[0]))
    return jnp.where(lax.broadcasted_iota(jnp.int32, rows.shape, 0) == 0, rows, jnp.zeros_like(rows))


def _precision(dtype):
    """float32 weights multiply exactly (Triton's default float32 dot is TF32)."""
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def gate_up_kernel(experts_ref, x_ref, gate_ref, up_ref, g_ref, u_ref, *, top_k: int, chunk: int):
    """experts_ref [P] int32; x_ref [N, D]; gate_ref, up_ref [E, D, block_f]; g_ref, u_ref
    [P, S, block_f] float32 partial products over each split's D rows."""
    p, s = pl.program_id(0), pl.program_id(2)
    e = experts_ref[p]
    rows_per_split = x_ref.shape[1] // g_ref.shape[1]
    block_f = g_ref.shape[2]
    dtype = gate_ref.dtype

    def body(i, acc):
        g, u = acc
        rows = pl.ds(s * rows_per_split + i * chunk, chunk)
        xs = _one_row(x_ref[p // top_k, rows], dtype)
        dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32, precision=_precision(dtype))
        return g + dot(xs, gate_ref[e, rows, :]), u + dot(xs, up_ref[e, rows, :])

    def compute():
        zero = jnp.zeros((MMA_ROWS, block_f), jnp.float32)
        g, u = lax.fori_loop(0, rows_per_split // chunk, body, (zero, zero))
        return jnp.sum(g, axis=0), jnp.sum(u, axis=0)

    zero = jnp.zeros(block_f, jnp.float32)
    g, u = lax.cond((e >= 0) & (e < gate_ref.shape[0]), compute, lambda: (zero, zero))
    g_ref[p, s, :] = g
    u_ref[p, s, :] = u


def down_kernel(experts_ref, weights_ref, h_ref, down_ref, y_ref, *, chunk: int):
    """experts_ref, weights_ref [P]; h_ref [P, F]; down_ref [E, F, block_d]; y_ref [P, S,
    block_d] float32 partial products over each split's F rows, times weights[p]."""
    p, s = pl.program_id(0), pl.program_id(2)
    e = experts_ref[p]
    rows_per_split = h_ref.shape[1] // y_ref.shape[1]
    block_d = y_ref.shape[2]
    dtype = down_ref.dtype

    def body(c, acc):
        rows = pl.ds(s * rows_per_split + c * chunk, chunk)
        hs = _one_row(h_ref[p, rows], dtype)
        return acc + jnp.dot(hs, down_ref[e, rows, :], preferred_element_type=jnp.float32, precision=_precision(dtype))

    def compute():
        acc = lax.fori_loop(0, rows_per_split // chunk, body, jnp.zeros((MMA_ROWS, block_d), jnp.float32))
        return weights_ref[p] * jnp.sum(acc, axis=0)

    y_ref[p, s, :] = lax.cond((e >= 0) & (e < down_ref.shape[0]), compute, lambda: jnp.zeros(block_d, jnp.float32))


def _check(x, weights, experts, gate, up, down) -> None:
    if x.ndim != 2 or weights.ndim != 2 or experts.shape != weights.shape or experts.shape[0] != x.shape[0]:
        raise ValueError(
            f"x must be [N, D] and weights, experts [N, top_k], got {x.shape}, {weights.shape}, {experts.shape}"
        )
    e, d, f = gate.shape
    if up.shape != (e, d, f) or down.shape != (e, f, d) or d != x.shape[1]:
        raise ValueError(
            f"gate, up must be [E, D={x.shape[1]}, F] and down [E, F, D], got {gate.shape}, {up.shape}, {down.shape}"
        )
    if not fits(d, f):
        raise ValueError(f"D={d} and F={f} must be multiples of {MMA_ROWS} for the MoE decode kernels")
    if not jnp.issubdtype(experts.dtype, jnp.integer):
        raise ValueError(f"experts must be integer expert ids, got {experts.dtype}")


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def moe_decode(
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    *,
    config: MoeDecodeConfig = MoeDecodeConfig(),
    interpret: bool = False,
) -> jax.Array:
    """sum_i weights[n, i] * expert_{experts[n, i]}(x[n]) -> [N, D] float32 (SwiGLU experts).

    x [N, D]; weights [N, k]; experts [N, k] int, ids into gate/up [E, D, F] and down [E, F, D];
    an id outside 0..E-1 is an expert not held here (it contributes 0). The expert MLP's hidden
    activations are rounded to x's dtype between the two kernels, as in the grouped path.
    """
    _check(x, weights, experts, gate, up, down)
    n, top_k = experts.shape
    flat = experts.reshape(-1).astype(jnp.int32)
    g, u = moe_gate_up(x, flat, gate, up, config=config, interpret=interpret)
    h = (jax.nn.silu(jnp.sum(g, axis=1)) * jnp.sum(u, axis=1)).astype(x.dtype)
    y = moe_down(h, flat, weights.reshape(-1).astype(jnp.float32), down, config=config, interpret=interpret)
    return jnp.sum(y.reshape(n, top_k * y.shape[1], -1), axis=1)


def _params(config: MoeDecodeConfig):
    return plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def _whole(shape):
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def moe_gate_up(x, experts, gate, up, *, config: MoeDecodeConfig, interpret: bool = False):
    """The first kernel: x [N, D]; experts [P] int32 (assignment p belongs to token p // (P / N));
    gate, up [E, D, F] -> float32 partial products (g, u) [P, S, F] over S splits of D."""
    n, d = x.shape
    p = experts.shape[0]
    f = gate.shape[2]
    bf, splits = osm.fit_block(config.block_f, f), _split(config.splits, d)
    partial = jax.ShapeDtypeStruct((p, splits, f), jnp.float32)
    return pl.pallas_call(
        functools.partial(gate_up_kernel, top_k=p // n, chunk=osm.fit_block(config.chunk, d // splits)),
        grid=(p, f // bf, splits),
        in_specs=[
            _whole((p,)),
            _whole((n, d)),
            pl.BlockSpec((gate.shape[0], d, bf), lambda i, j, s: (0, 0, j)),
            pl.BlockSpec((gate.shape[0], d, bf), lambda i, j, s: (0, 0, j)),
        ],
        out_specs=[pl.BlockSpec((p, splits, bf), lambda i, j, s: (0, 0, j))] * 2,
        out_shape=[partial, partial],
        compiler_params=_params(config),
        interpret=interpret,
        name="moe_decode_gate_up",
    )(experts, x, gate, up)


def moe_down(h, experts, weights, down, *, config: MoeDecodeConfig, interpret: bool = False):
    """The second kernel: h [P, F]; experts [P] int32; weights [P] float32; down [E, F, D] ->
    y [P, S, D] float32 with sum_s y[p, s] = weights[p] * h[p] @ down[experts[p]]."""
    p, f = h.shape
    e, _, d = down.shape
    bd, splits = osm.fit_block(config.block_d, d), _split(config.down_splits, f)
    return pl.pallas_call(
        functools.partial(down_kernel, chunk=osm.fit_block(config.chunk, f // splits)),
        grid=(p, d // bd, splits),
        in_specs=[
            _whole((p,)),
            _whole((p,)),
            _whole((p, f)),
            pl.BlockSpec((e, f, bd), lambda i, j, s: (0, 0, j)),
        ],
        out_specs=pl.BlockSpec((p, splits, bd), lambda i, j, s: (0, 0, j)),
        out_shape=jax.ShapeDtypeStruct((p, splits, d), jnp.float32),
        compiler_params=_params(config),
        interpret=interpret,
        name="moe_decode_down",
    )(experts, weights, h, down)


def moe_decode_reference(x, weights, experts, gate, up, down) -> jax.Array:
    """The contract in plain jax.numpy: each assignment's expert MLP, gathered per assignment."""
    _check(x, weights, experts, gate, up, down)
    held = (experts >= 0) & (experts < gate.shape[0])
    e = jnp.where(held, experts, 0)
    hp = lax.Precision.HIGHEST
    xf = x.astype(jnp.float32)
    g = jnp.einsum("nd,nkdf->nkf", xf, gate[e].astype(jnp.float32), precision=hp)
    u = jnp.einsum("nd,nkdf->nkf", xf, up[e].astype(jnp.float32), precision=hp)
    h = (jax.nn.silu(g) * u).astype(x.dtype).astype(jnp.float32)
    y = jnp.einsum("nkf,nkfd->nkd", h, down[e].astype(jnp.float32), precision=hp)
    return jnp.einsum("nk,nkd->nd", jnp.where(held, weights, 0.0).astype(jnp.float32), y, precision=hp)
