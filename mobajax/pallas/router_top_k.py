"""MoE routing in one kernel: softmax over the experts, top-k, optional renormalisation.

XLA runs `route_reference` as five small kernels per layer (softmax, a copy, a sort for the top-k,
the renormalising softmax, a select), about 8 us at one decode token on an H100; here it is one
program per block of ROWS tokens that holds the block's [ROWS, E] probabilities in registers and
picks the k largest by k rounds of max + lowest index, so ties go to the lower expert index as in
`jax.lax.top_k`.

Shapes: logits [M, E] (any float dtype; computed in float32) -> (weights [M, k] float32,
experts [M, k] int32). Pallas with the Triton lowering; `interpret=True` runs it on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mobajax.pallas.online_softmax import next_power_of_two

ROWS = 16  # tokens per program (fewer when there are fewer tokens)
MAX_EXPERTS = 1024  # the [ROWS, E] float32 tile must fit in registers


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


def _kernel(logits_ref, weights_ref, experts_ref, *, top_k: int, normalize: bool, rows: int, e_pad: int, k_pad: int):
    m, e = weights_ref.shape[0], logits_ref.shape[1]
    row = pl.program_id(0) * rows + jnp.arange(rows)
    live_row = row < m
    col = jnp.arange(e_pad)
    real = col < e
    live = live_row[:, None] & real[None, :]
    logits = plgpu.load(logits_ref.at[row[:, None], jnp.minimum(col, e - 1)[None, :]], mask=live, other=-jnp.inf)
    logits = logits.astype(jnp.float32)
    logits = jnp.where(live_row[:, None], logits, 0.0)  # rows past M: finite, never stored
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


@functools.partial(jax.jit, static_argnames=("top_k", "normalize", "num_tokens", "interpret"))
def router_top_k(
    logits: jax.Array, top_k: int, normalize: bool, *, num_tokens: int | None = None, interpret: bool = False
) -> tuple[jax.Array, jax.Array]:
    """`route_reference` as one kernel: logits [M, E] -> (weights [M, k] float32, experts [M, k] int32).

    num_tokens: route only the first num_tokens rows (the rest are padding, e.g. the second row of
    a one-token GEMM, which a slice would have copied out); the outputs have num_tokens rows.
    """
    if logits.ndim != 2 or not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"logits must be a float [M, E] array, got {logits.dtype} {logits.shape}")
    e = logits.shape[1]
    m = logits.shape[0] if num_tokens is None else num_tokens
    if not 0 <= m <= logits.shape[0]:
        raise ValueError(f"num_tokens must be in 0..{logits.shape[0]} (the rows of logits), got {num_tokens}")
    if not 1 <= e <= MAX_EXPERTS:
        raise ValueError(f"the number of experts must be in 1..{MAX_EXPERTS}, got {e}")
    if not 1 <= top_k <= e:
        raise ValueError(f"top_k must be in 1..{e} (the number of experts), got {top_k}")
    if m == 0:
        return jnp.zeros((0, top_k), jnp.float32), jnp.zeros((0, top_k), jnp.int32)
    whole = lambda shape: pl.BlockSpec(shape, lambda i: (0, 0))  # noqa: E731 (rows picked in the kernel)
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
