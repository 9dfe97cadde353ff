"""MoE routing in one kernel: softmax over the experts, top-k, optional renormalisation.

XLA runs `route_reference` as five small kernels per layer (softmax, a copy, a sort for the top-k,
the renormalising softmax, a select), about 8 us at one decode token on an H100; here it is one
program per block of ROWS tokens that holds the block's [ROWS, E] probabilities in registers and
picks the k largest by k rounds of max + lowest index, so ties go to the lower expert index as in
`jax.lax.top_k`.

For a few tokens (decode) `router_logits` computes the logits too: program s streams one split
of the D rows of the router weights through tensor-core dots (exact float32 products, float32
sums) and writes the partial logits of its split, [S, M, E]; `router_top_k` sums the S partials
(in order) before the softmax.
That is two kernels where XLA ran a GEMM, its split-K sum and a copy (about 6 us at one token on an
H100, for a 1 MB router).

Shapes: logits [M, E] or partial logits [S, M, E] (any float dtype; computed in float32) ->
(weights [M, k] float32, experts [M, k] int32). Pallas with the Triton lowering; `interpret=True`
runs it on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mobajax.pallas.online_softmax import next_power_of_two

ROWS = 16  # tokens per program (fewer when there are fewer tokens); at most this many for router_logits
MAX_EXPERTS = 1024  # the [ROWS, E] float32 tile must fit in registers
LOGIT_SPLITS = 8  # router_logits programs (splits of D) at most
LOGIT_CHUNK = 64  # D rows per router_logits loop step at most


def route_reference(logits: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """Router logits [M, E] -> (weights [M, k] float32, experts [M, k] int32), HF semantics.

    Softmax in float32 over all experts, then the top-k probabilities (renormalised to sum to 1
    if `normalize`). Finite for any finite logits: the softmax subtracts the row maximum.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def _logits_kernel(x_ref, w_ref, out_ref, *, chunk: int, e_pad: int, exact_16bit: bool):
    """Program s: out[s] = x[:, D rows of split s] @ w[those rows] (float32), as [ROWS, chunk] x
    [chunk, E_pad] tensor-core dots whose rows past M are zero."""
    s = pl.program_id(0)
    m, e = out_ref.shape[1:]
    per_split = x_ref.shape[1] // out_ref.shape[0]
    row = jnp.arange(ROWS)
    col = jnp.arange(e_pad)
    real = col < e
    safe_row, safe_col = jnp.minimum(row, m - 1)[:, None], jnp.minimum(col, e - 1)[None, :]

    def body(i, acc):
        d = s * per_split + i * chunk + jnp.arange(chunk)
        x = plgpu.load(x_ref.at[safe_row, d[None, :]], mask=(row < m)[:, None], other=0.0)
        w = plgpu.load(w_ref.at[d[:, None], safe_col], mask=real[None, :], other=0.0)
        if not exact_16bit:  # float32 (or mixed) inputs: float32 products, no TF32
            x, w = x.astype(jnp.float32), w.astype(jnp.float32)
        precision = None if exact_16bit else lax.Precision.HIGHEST
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32, precision=precision)

    acc = lax.fori_loop(0, per_split // chunk, body, jnp.zeros((ROWS, e_pad), jnp.float32))
    store = (s, row[:, None], col[None, :])  # masked, not clamped
    plgpu.store(out_ref.at[store], acc, mask=(row < m)[:, None] & real[None, :])


def _kernel(logits_ref, weights_ref, experts_ref, *, top_k: int, normalize: bool, rows: int, e_pad: int, k_pad: int):
    m, e = logits_ref.shape[-2:]
    row = pl.program_id(0) * rows + jnp.arange(rows)
    live_row = row < m
    col = jnp.arange(e_pad)
    real = col < e
    live = live_row[:, None] & real[None, :]
    idx = (row[:, None], jnp.minimum(col, e - 1)[None, :])
    if logits_ref.ndim == 2:
        parts = [logits_ref.at[idx]]
    else:  # partial logits: summed in split order
        parts = [logits_ref.at[(s, *idx)] for s in range(logits_ref.shape[0])]
    logits = sum(plgpu.load(part, mask=live, other=0.0).astype(jnp.float32) for part in parts)
    logits = jnp.where(live, logits, jnp.where(live_row[:, None], -jnp.inf, 0.0))  # rows past M: finite, never stored
    p = jnp.exp(logits - jnp.max(logits, axis=1, keepdims=True))
    probs = p / jnp.sum(p, axis=1, keepdims=True)
    remaining = jnp.where(real[None, :], probs, -1.0)  # padded experts are never picked (probs >= 0)
    slot = jnp.arange(k_pad)

    def pick(j, carry):
        remaining, weights, experts = carry
        best = jnp.max(remaining, axis=1, keepdims=True)
        index = jnp.min(jnp.where(remaining == best, col[None, :], e_pad), axis=1, keepdims=True)
        weights = jnp.where(slot[None, :] == j, best, weights)
        experts = jnp.where(slot[None, :] == j, index, experts)
        remaining = jnp.where(col[None, :] == index, -1.0, remaining)
        return remaining, weights, experts

    init = (remaining, jnp.zeros((rows, k_pad), jnp.float32), jnp.zeros((rows, k_pad), jnp.int32))
    _, weights, experts = lax.fori_loop(0, top_k, pick, init)
    if normalize:
        weights = weights / jnp.sum(weights, axis=1, keepdims=True)
    store = (row[:, None], slot[None, :])  # masked, not clamped: a clamped duplicate would write too
    mask = live_row[:, None] & (slot < top_k)[None, :]
    plgpu.store(weights_ref.at[store], weights, mask=mask)
    plgpu.store(experts_ref.at[store], experts, mask=mask)


@functools.partial(jax.jit, static_argnames=("top_k", "normalize", "interpret"))
def router_top_k(
    logits: jax.Array, top_k: int, normalize: bool, *, interpret: bool = False
) -> tuple[jax.Array, jax.Array]:
    """`route_reference` as one kernel: logits [M, E] (or partial logits [S, M, E], summed over S
    first) -> (weights [M, k] float32, experts [M, k] int32)."""
    if logits.ndim not in (2, 3) or not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"logits must be a float [M, E] (or [S, M, E]) array, got {logits.dtype} {logits.shape}")
    m, e = logits.shape[-2:]
    if not 1 <= e <= MAX_EXPERTS:
        raise ValueError(f"the number of experts must be in 1..{MAX_EXPERTS}, got {e}")
    if not 1 <= top_k <= e:
        raise ValueError(f"top_k must be in 1..{e} (the number of experts), got {top_k}")
    if m == 0:
        return jnp.zeros((0, top_k), jnp.float32), jnp.zeros((0, top_k), jnp.int32)
    whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731 (rows picked in the kernel)
    rows, e_pad = min(ROWS, next_power_of_two(m)), next_power_of_two(e)
    kernel = functools.partial(
        _kernel, top_k=top_k, normalize=normalize, rows=rows, e_pad=e_pad, k_pad=next_power_of_two(top_k)
    )
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(m, rows),),
        in_specs=[whole(logits.shape)],
        out_specs=[whole((m, top_k)), whole((m, top_k))],
        out_shape=[jax.ShapeDtypeStruct((m, top_k), jnp.float32), jax.ShapeDtypeStruct((m, top_k), jnp.int32)],
        # one warp while the tile is small: the k rounds of reductions stay within the warp (shuffles)
        compiler_params=plgpu.CompilerParams(num_warps=1 if rows * e_pad <= 1024 else 4, num_stages=1),
        interpret=interpret,
        name="router_top_k",
    )(logits)


def logits_fit(d: int) -> bool:
    """Whether `router_logits` takes model dim D (a multiple of 16, the smallest dot)."""
    return d % 16 == 0


@functools.partial(jax.jit, static_argnames=("interpret",))
def router_logits(x: jax.Array, w: jax.Array, *, interpret: bool = False) -> jax.Array:
    """Partial router logits of a few tokens: x [M, D] (M <= ROWS, D a multiple of 16), w [D, E]
    (any float dtypes) -> [S, M, E] float32 whose sum over S is x @ w: S <= LOGIT_SPLITS splits
    of D, every product exact in float32 (16-bit inputs of one dtype on the tensor cores, others
    as float32 at HIGHEST precision) and summed in float32."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"x must be [M, D] and w [D, E], got {x.shape} and {w.shape}")
    m, d = x.shape
    e = w.shape[1]
    if not 1 <= m <= ROWS:
        raise ValueError(f"router_logits takes 1..{ROWS} tokens, got {m}")
    if not logits_fit(d):
        raise ValueError(f"router_logits needs D a multiple of 16, got {d}")
    if not 1 <= e <= MAX_EXPERTS:
        raise ValueError(f"the number of experts must be in 1..{MAX_EXPERTS}, got {e}")
    e_pad = max(16, next_power_of_two(e))
    chunk = min(LOGIT_CHUNK, d & -d)
    splits = min(LOGIT_SPLITS, (d // chunk) & -(d // chunk))
    exact_16bit = x.dtype == w.dtype and x.dtype in (jnp.bfloat16, jnp.float16)
    whole = lambda shape: pl.BlockSpec(shape, lambda s: (0,) * len(shape))  # noqa: E731
    return pl.pallas_call(
        functools.partial(_logits_kernel, chunk=chunk, e_pad=e_pad, exact_16bit=exact_16bit),
        grid=(splits,),
        in_specs=[whole((m, d)), whole((d, e))],
        out_specs=whole((splits, m, e)),
        out_shape=jax.ShapeDtypeStruct((splits, m, e), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
        name="router_logits",
    )(x, w)
