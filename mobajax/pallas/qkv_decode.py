"""Attention inputs for a few tokens (decode) in one kernel: the layer's input RMSNorm, the q/k/v
projections (+ bias), the q/k RMSNorm (Qwen3) and the rotary embedding.

At one decode token XLA runs these as about eight kernels per layer (the norm's reduction and its
scaling, the GEMM, two q/k norm reductions, two rotate-half concatenations, a slice): 21 us per
layer of the Qwen3-30B-A3B shape on an H100, where reading the weights takes 7 us. Here program j
computes head j of q (j < N), k (N <= j < N + K) or v (the rest) for all tokens: it takes the
sums of squares of x's rows, then streams its head's two column halves [D, H/2] of the weight
through [16, chunk] x [chunk, H/2] tensor-core dots (rows past M are padding), and applies bias,
norm and rotation to the two halves in registers (rotate-half pairs column i with i + H/2).
Roundings follow the XLA path (`qkv_decode_reference`): the normalised input, the projection, the
normalised q/k and the rotated q/k are each rounded to x's dtype.

Pallas with the Triton lowering; `interpret=True` runs it on CPU.

Shape letters: M tokens (at most 16), D model dim, N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mobajax.pallas.moe_decode import MMA_ROWS, dot_precision

MAX_TOKENS = MMA_ROWS  # the tokens share the rows of one tensor-core dot


@dataclasses.dataclass(frozen=True)
class QkvDecodeConfig:
    """splits: programs per head, each over D / splits rows (a power of two, shrunk to leave
    whole chunks); chunk: rows of D per loop step (a power of two >= 16, shrunk to divide D)."""

    splits: int = 16
    chunk: int = 128
    num_warps: int = 8
    num_stages: int = 1

    def __post_init__(self):
        if self.chunk < MMA_ROWS or self.chunk & (self.chunk - 1):
            raise ValueError(f"chunk must be a power of two >= {MMA_ROWS}, got {self.chunk}")
        if self.splits < 1 or self.splits & (self.splits - 1):
            raise ValueError(f"splits must be a power of two, got {self.splits}")


def fits(hidden_size: int, head_dim: int) -> bool:
    """Whether the kernel takes model dim D (a multiple of 16) and head dim H (a power of two
    in 32..512: each half feeds a dot of at least 16 columns)."""
    return hidden_size % MMA_ROWS == 0 and 32 <= head_dim <= 512 and head_dim & (head_dim - 1) == 0


def qkv_decode_kernel(
    x_ref,  # [M, D]
    inv_rms_ref,  # [M] float32: 1 / rms of x's rows (unread without the input norm)
    pos_ref,  # [M] int32
    inv_freq_ref,  # [H/2] float32
    scale_ref,  # [D] input norm scale (unread without the input norm)
    wq_ref,  # [D, N*H]
    wk_ref,  # [D, K*H]
    wv_ref,  # [D, K*H]
    bq_ref,  # [N*H] (unread without bias)
    bk_ref,  # [K*H]
    bv_ref,  # [K*H]
    qn_ref,  # [H] q norm scale (unread without the q/k norm)
    kn_ref,  # [H]
    _,  # [N + 2K] int32 zeros: the arrival counters (aliased to count_ref)
    q_ref,  # [M, N*H] (out)
    k_ref,  # [M, K*H] (out)
    v_ref,  # [M, K*H] (out)
    partial_ref,  # [S, M, (N + 2K) * H] float32 (out, scratch): each split's product
    count_ref,  # [N + 2K] int32 (out): programs of each head done
    *,
    eps: float,
    attention_factor: float,
    chunk: int,
    input_norm: bool,
    bias: bool,
    qk_norm: bool,
    interpret: bool,
):
    j, split = pl.program_id(0), pl.program_id(1)
    splits = partial_ref.shape[0]
    m, d = x_ref.shape
    half = inv_freq_ref.shape[0]
    num_heads, num_kv_heads = q_ref.shape[1] // (2 * half), k_ref.shape[1] // (2 * half)
    dtype = x_ref.dtype
    f32 = jnp.float32
    row = jnp.arange(MMA_ROWS)
    live = row < m
    safe = jnp.minimum(row, m - 1)  # padding rows repeat the last token and are never stored
    cols = j * 2 * half + jnp.arange(half)[None, :]  # the head's first half in partial_ref

    def x_tile(i):  # [16, chunk] float32
        return plgpu.load(x_ref.at[safe[:, None], i * chunk + jnp.arange(chunk)[None, :]]).astype(f32)

    def input_tile(i):  # the dot's left operand in the weights' dtype
        if not input_norm:
            return x_tile(i).astype(dtype)
        inv_rms = plgpu.load(inv_rms_ref.at[safe])[:, None]
        return scale_ref[pl.ds(i * chunk, chunk)] * (x_tile(i) * inv_rms).astype(dtype)

    def project(w_ref, head):  # this split's share of the head's two column halves -> partial_ref
        c0 = head * 2 * half
        steps = d // splits // chunk
        dot = functools.partial(jnp.dot, preferred_element_type=f32, precision=dot_precision(w_ref.dtype))

        def body(i, acc):
            step = split * steps + i
            rows, xs = pl.ds(step * chunk, chunk), input_tile(step)
            return acc[0] + dot(xs, w_ref[rows, pl.ds(c0, half)]), acc[1] + dot(xs, w_ref[rows, pl.ds(c0 + half, half)])

        zero = jnp.zeros((MMA_ROWS, half), f32)
        lo, hi = lax.fori_loop(0, steps, body, (zero, zero))
        plgpu.store(partial_ref.at[split, row[:, None], cols], lo, mask=live[:, None])
        plgpu.store(partial_ref.at[split, row[:, None], cols + half], hi, mask=live[:, None])

    def total(b_ref, head):  # the head's product summed over the splits, rounded like the Dense layer
        lo = hi = jnp.zeros((MMA_ROWS, half), f32)
        for s in range(splits):  # volatile: past the SM-local L1, other SMs wrote them
            load = functools.partial(plgpu.load, mask=live[:, None], other=0.0, volatile=True)
            lo, hi = lo + load(partial_ref.at[s, row[:, None], cols]), hi + load(partial_ref.at[s, row[:, None], cols + half])
        lo, hi = lo.astype(dtype), hi.astype(dtype)
        if bias:
            c0 = head * 2 * half
            lo, hi = lo + b_ref[pl.ds(c0, half)], hi + b_ref[pl.ds(c0 + half, half)]
        return lo.astype(f32), hi.astype(f32)

    def norm_and_rotate(lo, hi, norm_ref):
        if qk_norm:
            inv = lax.rsqrt((jnp.sum(lo * lo, axis=1) + jnp.sum(hi * hi, axis=1)) / (2 * half) + eps)[:, None]
            lo = (norm_ref[pl.ds(0, half)] * (lo * inv).astype(dtype)).astype(f32)
            hi = (norm_ref[pl.ds(half, half)] * (hi * inv).astype(dtype)).astype(f32)
        angles = plgpu.load(pos_ref.at[safe]).astype(f32)[:, None] * inv_freq_ref[...][None, :]
        cos, sin = jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor
        return lo * cos - hi * sin, hi * cos + lo * sin

    def store(o_ref, head, lo, hi):
        out = head * 2 * half + jnp.arange(half)[None, :]
        plgpu.store(o_ref.at[row[:, None], out], lo.astype(o_ref.dtype), mask=live[:, None])
        plgpu.store(o_ref.at[row[:, None], out + half], hi.astype(o_ref.dtype), mask=live[:, None])

    is_q, is_v = j < num_heads, j >= num_heads + num_kv_heads
    is_k = ~is_q & ~is_v
    kv_head = jnp.where(is_v, j - num_heads - num_kv_heads, j - num_heads)
    pl.when(is_q)(lambda: project(wq_ref, j))
    pl.when(is_k)(lambda: project(wk_ref, kv_head))
    pl.when(is_v)(lambda: project(wv_ref, kv_head))
    if not interpret:  # every thread's partial stored before the (release) arrival below
        plgpu.debug_barrier()
    last = plgpu.atomic_add(count_ref, j, jnp.array(1, jnp.int32)) == splits - 1  # acquire: the other splits' stores are visible

    @pl.when(last & is_q)
    def _():
        store(q_ref, j, *norm_and_rotate(*total(bq_ref, j), qn_ref))

    @pl.when(last & is_k)
    def _():
        store(k_ref, kv_head, *norm_and_rotate(*total(bk_ref, kv_head), kn_ref))

    @pl.when(last & is_v)
    def _():
        store(v_ref, kv_head, *total(bv_ref, kv_head))


def _check(x, positions, inv_freq, wq, wk, wv, norm_scale, biases, q_norm, k_norm) -> None:
    if x.ndim != 2 or not 1 <= x.shape[0] <= MAX_TOKENS:
        raise ValueError(f"x must be [M, D] with 1 <= M <= {MAX_TOKENS} tokens, got {x.shape}")
    m, d = x.shape
    h = 2 * inv_freq.shape[0]
    if positions.shape != (m,) or inv_freq.ndim != 1:
        raise ValueError(f"positions must be [M={m}] and inv_freq [H/2], got {positions.shape}, {inv_freq.shape}")
    if not fits(d, h):
        raise ValueError(f"D={d} must be a multiple of {MMA_ROWS} and H={h} a power of two in 32..512")
    if wq.ndim != 2 or wq.shape[0] != d or wq.shape[1] % h or wk.shape != wv.shape or wk.shape[0] != d or wk.shape[1] % h:
        raise ValueError(f"wq must be [D={d}, N*{h}] and wk, wv [D, K*{h}], got {wq.shape}, {wk.shape}, {wv.shape}")
    if wq.shape[1] % wk.shape[1]:
        raise ValueError(f"the query heads ({wq.shape[1] // h}) must be a multiple of the kv heads ({wk.shape[1] // h})")
    if {wq.dtype, wk.dtype, wv.dtype} != {x.dtype}:
        raise ValueError(f"x and the weights must share a dtype, got {x.dtype}, {wq.dtype}, {wk.dtype}, {wv.dtype}")
    if norm_scale is not None and norm_scale.shape != (d,):
        raise ValueError(f"norm_scale must be [D={d}], got {norm_scale.shape}")
    if any(b is not None for b in biases) and [None if b is None else b.shape for b in biases] != [
        (wq.shape[1],), (wk.shape[1],), (wv.shape[1],)
    ]:
        raise ValueError(f"bq, bk, bv must all be given, as [N*H], [K*H], [K*H]; got {[getattr(b, 'shape', None) for b in biases]}")
    if (q_norm is None) != (k_norm is None) or (q_norm is not None and (q_norm.shape, k_norm.shape) != ((h,), (h,))):
        raise ValueError(f"q_norm and k_norm must both be [H={h}] or both None")


@functools.partial(jax.jit, static_argnames=("eps", "attention_factor", "config", "interpret"))
def qkv_decode(
    x: jax.Array,
    positions: jax.Array,
    inv_freq: jax.Array,
    wq: jax.Array,
    wk: jax.Array,
    wv: jax.Array,
    *,
    norm_scale: jax.Array | None = None,
    bq: jax.Array | None = None,
    bk: jax.Array | None = None,
    bv: jax.Array | None = None,
    q_norm: jax.Array | None = None,
    k_norm: jax.Array | None = None,
    eps: float = 1e-6,
    attention_factor: float = 1.0,
    config: QkvDecodeConfig = QkvDecodeConfig(),
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [M, D] at positions [M] -> rotated q [M, N, H], rotated k [M, K, H] and v [M, K, H]
    in x's dtype.

    norm_scale [D]: if given, x is RMS-normalised with it first (the decoder layer's input norm).
    wq [D, N*H], wk, wv [D, K*H] (kernels [in, out]); optional biases bq [N*H], bk, bv [K*H];
    optional q/k norm scales q_norm, k_norm [H]; inv_freq [H/2] float32 and attention_factor as
    `mobajax.models.rope.inverse_frequencies` gives them; eps for both norms.
    """
    biases = (bq, bk, bv)
    _check(x, positions, inv_freq, wq, wk, wv, norm_scale, biases, q_norm, k_norm)
    m, d = x.shape
    h = 2 * inv_freq.shape[0]
    unread, unread_f32 = jnp.zeros((1,), x.dtype), jnp.zeros((1,), jnp.float32)
    xf = x.astype(jnp.float32)
    inv_rms = lax.rsqrt(jnp.mean(xf * xf, axis=1) + eps)  # one reduction XLA can fuse into x's producer
    heads = (wq.shape[1] + 2 * wk.shape[1]) // h
    splits = min(config.splits, d // MMA_ROWS & -(d // MMA_ROWS))
    chunk = min(config.chunk, (d // splits) & -(d // splits))
    kernel = functools.partial(
        qkv_decode_kernel, eps=float(eps), attention_factor=float(attention_factor), chunk=chunk,
        input_norm=norm_scale is not None, bias=bq is not None, qk_norm=q_norm is not None, interpret=interpret,
    )  # fmt: skip
    out_shape = [jax.ShapeDtypeStruct((m, w.shape[1]), x.dtype) for w in (wq, wk, wv)]
    out_shape += [jax.ShapeDtypeStruct((splits, m, heads * h), jnp.float32), jax.ShapeDtypeStruct((heads,), jnp.int32)]
    q, k, v, _, _ = pl.pallas_call(
        kernel,
        grid=(heads, splits),
        out_shape=out_shape,
        input_output_aliases={13: 4},
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="qkv_decode",
    )(
        x, unread_f32 if norm_scale is None else inv_rms, positions.astype(jnp.int32), inv_freq.astype(jnp.float32),
        unread if norm_scale is None else norm_scale, wq, wk, wv,
        *(unread if b is None else b for b in biases),
        unread if q_norm is None else q_norm, unread if k_norm is None else k_norm,
        jnp.zeros((heads,), jnp.int32),
    )  # fmt: skip
    return q.reshape(m, -1, h), k.reshape(m, -1, h), v.reshape(m, -1, h)


def qkv_decode_reference(
    x, positions, inv_freq, wq, wk, wv, *, norm_scale=None, bq=None, bk=None, bv=None, q_norm=None,
    k_norm=None, eps=1e-6, attention_factor=1.0,
):  # fmt: skip
    """The contract in plain jax.numpy: the model's XLA path (norm, dense layers, q/k norm, rope)."""
    # imported here: mobajax.models imports this module
    from mobajax.models.layers import rms_norm
    from mobajax.models.rope import apply_rope

    _check(x, positions, inv_freq, wq, wk, wv, norm_scale, (bq, bk, bv), q_norm, k_norm)
    m, h = x.shape[0], 2 * inv_freq.shape[0]
    if norm_scale is not None:
        x = rms_norm(x, norm_scale, eps)

    def project(w, b):
        y = jnp.dot(x, w, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32).astype(x.dtype)
        return (y if b is None else y + b).reshape(1, m, -1, h)

    q, k, v = project(wq, bq), project(wk, bk), project(wv, bv)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    pos = positions[None]
    q, k = apply_rope(q, pos, inv_freq, attention_factor), apply_rope(k, pos, inv_freq, attention_factor)
    return q[0], k[0], v[0]
