"""MoE experts for a few tokens (decode): two kernels instead of sort + grouped matmuls + scatter.

With a handful of tokens (N * top_k assignments well below the number of experts) every
assignment reads its own expert's weights anyway, so the experts run per assignment:
1. `gate_up`: program (assignment p, F tile j) computes h[p, tile] = silu(x[t] @ gate[e]) *
   (x[t] @ up[e]) for t = p // top_k and e = experts[p], reading only expert e's columns;
2. `down`: program (token t, D tile j) sums weights[t, i] * h[t * top_k + i] @ down[e_i] over
   the token's assignments into out[t, tile] (float32).
A one-row matmul would waste the tensor cores, so both multiply and sum on the CUDA cores:
the step is bound by reading the chosen experts' weights. Assignments with expert -1 (an
expert held by another device under expert parallelism) contribute 0 and read nothing.

Pallas with the Triton lowering; `interpret=True` runs it on CPU. `moe_decode_reference` is the
same contract in plain jax.numpy.

Shape letters: N tokens, D model dim, E experts (held here), F expert MLP dim, k top-k,
P = N * k assignments.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class MoeDecodeConfig:
    """Tile sizes (powers of two; each shrinks to the largest power of two dividing its dim).

    block_f: F columns per `gate_up` program; block_d: D columns per `down` program;
    chunk: rows of a weight tile read per loop step in both kernels."""

    block_f: int = 32
    block_d: int = 32
    chunk: int = 128
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_f", "block_d", "chunk"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")


def _fit(block: int, dim: int) -> int:
    return min(block, dim & -dim)


def gate_up_kernel(experts_ref, x_ref, gate_ref, up_ref, h_ref, *, top_k: int, chunk: int):
    """experts_ref [P] int32; x_ref [N, D]; gate_ref, up_ref [E, D, block_f]; h_ref [P, block_f]."""
    p = pl.program_id(0)
    e = experts_ref[p]
    d = x_ref.shape[1]
    block_f = h_ref.shape[1]

    def body(i, acc):
        g, u = acc
        rows = pl.ds(i * chunk, chunk)
        xs = x_ref[p // top_k, rows].astype(jnp.float32)[:, None]
        g = g + jnp.sum(xs * gate_ref[e, rows, :].astype(jnp.float32), axis=0)
        u = u + jnp.sum(xs * up_ref[e, rows, :].astype(jnp.float32), axis=0)
        return g, u

    def compute():
        zero = jnp.zeros(block_f, jnp.float32)
        g, u = lax.fori_loop(0, d // chunk, body, (zero, zero))
        return jax.nn.silu(g) * u

    h = lax.cond(e >= 0, compute, lambda: jnp.zeros(block_f, jnp.float32))
    h_ref[p, :] = h.astype(h_ref.dtype)


def down_kernel(experts_ref, weights_ref, h_ref, down_ref, o_ref, *, top_k: int, chunk: int):
    """experts_ref, weights_ref [P]; h_ref [P, F]; down_ref [E, F, block_d]; o_ref [N, block_d] f32."""
    t = pl.program_id(0)
    f = h_ref.shape[1]
    block_d = o_ref.shape[1]

    def assignment(i, acc):
        p = t * top_k + i
        e = experts_ref[p]

        def body(c, y):
            rows = pl.ds(c * chunk, chunk)
            hs = h_ref[p, rows].astype(jnp.float32)[:, None]
            return y + jnp.sum(hs * down_ref[e, rows, :].astype(jnp.float32), axis=0)

        def compute():
            return weights_ref[p] * lax.fori_loop(0, f // chunk, body, jnp.zeros(block_d, jnp.float32))

        return acc + lax.cond(e >= 0, compute, lambda: jnp.zeros(block_d, jnp.float32))

    o_ref[t, :] = lax.fori_loop(0, top_k, assignment, jnp.zeros(block_d, jnp.float32))


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

    x [N, D]; weights [N, k]; experts [N, k] int, ids into gate/up [E, D, F] and down [E, F, D],
    -1 for an assignment whose expert is not held here (it contributes 0). The expert MLP's
    hidden activations are rounded to x's dtype between the two kernels, as in the grouped path.
    """
    _check(x, weights, experts, gate, up, down)
    n, top_k = experts.shape
    e, d, f = gate.shape
    bf, bd = _fit(config.block_f, f), _fit(config.block_d, d)
    flat = experts.reshape(-1).astype(jnp.int32)
    params = plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)

    def whole(shape):
        return pl.BlockSpec(shape, lambda i, j: (0,) * len(shape))

    h = pl.pallas_call(
        functools.partial(gate_up_kernel, top_k=top_k, chunk=_fit(config.chunk, d)),
        grid=(n * top_k, f // bf),
        in_specs=[
            whole((n * top_k,)),
            whole((n, d)),
            pl.BlockSpec((e, d, bf), lambda i, j: (0, 0, j)),
            pl.BlockSpec((e, d, bf), lambda i, j: (0, 0, j)),
        ],
        out_specs=pl.BlockSpec((n * top_k, bf), lambda i, j: (0, j)),
        out_shape=jax.ShapeDtypeStruct((n * top_k, f), x.dtype),
        compiler_params=params,
        interpret=interpret,
        name="moe_decode_gate_up",
    )(flat, x, gate, up)
    return pl.pallas_call(
        functools.partial(down_kernel, top_k=top_k, chunk=_fit(config.chunk, f)),
        grid=(n, d // bd),
        in_specs=[
            whole((n * top_k,)),
            whole((n * top_k,)),
            whole((n * top_k, f)),
            pl.BlockSpec((e, f, bd), lambda i, j: (0, 0, j)),
        ],
        out_specs=pl.BlockSpec((n, bd), lambda i, j: (0, j)),
        out_shape=jax.ShapeDtypeStruct((n, d), jnp.float32),
        compiler_params=params,
        interpret=interpret,
        name="moe_decode_down",
    )(flat, weights.reshape(-1).astype(jnp.float32), h, down)


def moe_decode_reference(x, weights, experts, gate, up, down) -> jax.Array:
    """The contract in plain jax.numpy: each assignment's expert MLP, gathered per assignment."""
    _check(x, weights, experts, gate, up, down)
    held = experts >= 0
    e = jnp.maximum(experts, 0)
    hp = lax.Precision.HIGHEST
    xf = x.astype(jnp.float32)
    g = jnp.einsum("nd,nkdf->nkf", xf, gate[e].astype(jnp.float32), precision=hp)
    u = jnp.einsum("nd,nkdf->nkf", xf, up[e].astype(jnp.float32), precision=hp)
    h = (jax.nn.silu(g) * u).astype(x.dtype).astype(jnp.float32)
    y = jnp.einsum("nkf,nkfd->nkd", h, down[e].astype(jnp.float32), precision=hp)
    return jnp.einsum("nk,nkd->nd", jnp.where(held, weights, 0.0).astype(jnp.float32), y, precision=hp)
