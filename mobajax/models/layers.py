"""Flax Linen building blocks shared by the decoder families.

Shape letters: B batch, T tokens, D model dim, N query heads, K kv heads, H head dim, F MLP dim.
Parameters are stored in the compute dtype of the module (`dtype`); norms compute in float32.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mobajax.attention import AttentionSpec, KVCache, PagedKVCache, attend
from mobajax.models.config import RopeConfig
from mobajax.models.rope import apply_rope, inverse_frequencies
from mobajax.pallas.decode_matmul import decode_matmul
from mobajax.pallas.decode_matmul import fits as decode_matmul_fits
from mobajax.pallas.rms_norm import add_rms_norm, rms_norm
from mobajax.pallas.rms_norm import fits as rms_norm_fits
from mobajax.pallas.rope_kv_write import fits as rope_kv_write_fits
from mobajax.pallas.rope_kv_write import rope_kv_write

KERNEL_ROWS = 16  # RMSNorm(kernel=True) takes the kernel up to this many rows


class SplitSum(NamedTuple):
    """An update to the residual stream still split in float32 partial sums: parts [M, S, D]; the
    update of row m is sum_s parts[m, s] rounded to the model dtype (a split-K projection that
    `RMSNorm(residual=...)` reduces, adds and normalises in one kernel)."""

    parts: jax.Array


class RMSNorm(nn.Module):
    """x / rms(x) * scale over the last axis, in float32, cast back to x's dtype.

    kernel: a few rows (decode, at most `KERNEL_ROWS`) go through the `rms_norm` kernel (one
    launch where XLA takes two). scale_only: return the scale [D] itself, for a kernel that
    applies the norm (`rope_kv_write`). residual: x is an update (an array like residual, or a
    `SplitSum` of its rows) added to residual first -> (residual + x, norm of it), the add in
    the same kernel (`add_rms_norm`).
    """

    eps: float
    dtype: Any = jnp.float32
    kernel: bool = False

    @nn.compact
    def __call__(self, x, scale_only: bool = False, residual: jax.Array | None = None):
        d = (residual if residual is not None else x).shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), self.dtype)
        if scale_only:
            return scale
        if residual is not None:
            rows = math.prod(residual.shape[:-1])
            update = x.parts if isinstance(x, SplitSum) else x.reshape(rows, d)
            if self._takes_kernel(residual):
                h, normed = add_rms_norm(update, residual.reshape(rows, d), scale, eps=self.eps)
                return h.reshape(residual.shape), normed.reshape(residual.shape)
            if update.ndim == 3:
                update = jnp.sum(update, axis=1)
            h = residual + update.astype(residual.dtype).reshape(residual.shape)
            return h, self._xla(h, scale)
        if self._takes_kernel(x):
            return rms_norm(x.reshape(-1, d), scale, eps=self.eps).reshape(x.shape)
        return self._xla(x, scale)

    def _takes_kernel(self, x: jax.Array) -> bool:
        rows = math.prod(x.shape[:-1])
        return self.kernel and rows <= KERNEL_ROWS and rms_norm_fits(x.shape[-1]) and x.dtype == self.dtype

    def _xla(self, x: jax.Array, scale: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale * normed.astype(x.dtype)


def two_rows(x: jax.Array) -> jax.Array:
    """One row x [..., 1, D] as two equal rows [..., 2, D] (a broadcast, which XLA fuses into the
    GEMM that reads it): the form that keeps a one-token dot a GEMM (see `dot_general`)."""
    return jnp.broadcast_to(x, (*x.shape[:-2], 2, x.shape[-1]))


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None) -> jax.Array:
    """`lax.dot_general` of lhs [..., K] with rhs [K, ...], one row of lhs computed as two.

    XLA on the GPU rewrites a one-row dot with a weight matrix under 10M elements (every
    projection of a 2048-wide model at batch 1) into a multiply + reduce fusion that reads the
    weights at a fraction of a GEMM's rate; with two rows it stays a GEMM. The second row is a
    broadcast, which XLA fuses into the GEMM (a concatenate took a kernel of its own).
    """
    (contract, _), batch = dimension_numbers
    if lhs.ndim >= 2 and math.prod(lhs.shape[:-1]) == 1 and tuple(contract) == (lhs.ndim - 1,) and not batch[0]:
        out = jax.lax.dot_general(two_rows(lhs), rhs, dimension_numbers, precision, preferred_element_type)
        return jax.lax.slice_in_dim(out, 0, 1, axis=lhs.ndim - 2)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)


class Dense(nn.Module):
    """x [..., I] @ kernel [I, O] (+ bias [O]) via `dot_general`: flax's nn.Dense parameters
    (names, shapes, initializers) in the module's dtype. weights_only: return (kernel, bias or
    None) for a kernel that does the product itself (`decode_matmul`)."""

    features: int
    use_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, weights_only: bool = False):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), self.dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.dtype) if self.use_bias else None
        if weights_only:
            return kernel, bias
        y = dot_general(x.astype(self.dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())))
        return y if bias is None else y + bias


def dense(features: int, name: str, use_bias: bool, dtype: Any) -> Dense:
    """A linear layer with kernel [in, out] (HF's weight transposed)."""
    return Dense(features, use_bias, dtype, name=name)


class GatedMLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)); x [B, T, D] -> [B, T, D]."""

    intermediate_size: int
    use_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gate = dense(self.intermediate_size, "gate_proj", self.use_bias, self.dtype)(x)
        up = dense(self.intermediate_size, "up_proj", self.use_bias, self.dtype)(x)
        return dense(x.shape[-1], "down_proj", self.use_bias, self.dtype)(nn.silu(gate) * up)


def tensor_sharded(fn, mesh: Mesh | None, in_specs, out_specs):
    """fn run on each device's shard of the `tensor` mesh axis (`jax.shard_map`), for Pallas
    kernels: XLA's SPMD partitioner runs a custom call on gathered, replicated operands (for the
    attention kernels, the whole page pool on every device). fn itself without such an axis."""
    if mesh is None or mesh.shape["tensor"] == 1:
        return fn
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _paged_cache_spec(cache: PagedKVCache) -> PagedKVCache:
    """The page pool's partition over `tensor` (kv heads, as the engine shards it), as shard_map specs."""
    pool = P(None, None, "tensor", None)
    return PagedKVCache(pool, pool, P(), None if cache.k_sums is None else P(None, "tensor", None))


class Attention(nn.Module):
    """Self-attention with RoPE, GQA, optional q/k/v bias and q/k RMSNorm (Qwen3).

    x [B, T, D], positions [B, T] -> ([B, T, D], updated cache). The attention itself goes
    through `mobajax.attention.attend` (the single dispatch point). split_output: with the Pallas
    impl and a few rows, the o projection's float32 partial sums as a `SplitSum` [B * T, S, D]
    (from `decode_matmul`), for `RMSNorm(residual=...)` to add up with the residual add (only
    where D suits its kernel). mesh: the device mesh when the params are sharded; over a `tensor`
    axis of several devices the Pallas kernels run per device on its heads (`tensor_sharded`)
    and the projections stay XLA GEMMs (a kernel would gather the weights).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    spec: AttentionSpec
    rope: RopeConfig
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    mesh: Mesh | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, positions: jax.Array, cache: KVCache | None, split_output: bool = False
    ) -> tuple[jax.Array | SplitSum, KVCache | None]:
        b, t, d = x.shape
        n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
        tensor = 1 if self.mesh is None else self.mesh.shape["tensor"]
        inv_freq, rope_factor = inverse_frequencies(self.rope, h)
        projections = [dense(f * h, name, self.qkv_bias, self.dtype) for f, name in
                       ((n, "q_proj"), (k, "k_proj"), (k, "v_proj"))]  # fmt: skip
        paged_kernels = isinstance(cache, PagedKVCache) and self.spec.impl == "pallas"
        heads = P(None, None, "tensor", None)  # [1, T, heads, H] split over `tensor`
        if paged_kernels and rope_kv_write_fits(n // tensor, k // tensor, h):
            # q/k norms, rope and the pool write in one kernel, which reads the three projections
            # as one [T, N + 2K, H] array. A few rows (decode) get it from `decode_matmul` (one
            # launch for the three weights, faster than XLA's GEMMs there), more rows from XLA's
            # merged q/k/v GEMM, whose output is that array.
            if tensor == 1 and decode_matmul_fits(b * t, d, (n * h, k * h, k * h)):
                weights, biases = zip(*(proj(x, weights_only=True) for proj in projections))
                parts = [decode_matmul(x.reshape(b * t, d), weights)]
                if self.qkv_bias:
                    parts = [parts[0] + jnp.concatenate(biases)]
            else:
                parts = [proj(x)[0] for proj in projections]  # concatenated per device under TP
            scales = {}
            if self.qk_norm:  # the norms' scales [H] (the zeros only give the shape)
                head = jnp.zeros((h,), self.dtype)
                scales = {name: RMSNorm(self.norm_eps, self.dtype, name=name[0] + "_norm")(head, scale_only=True)
                          for name in ("q_scale", "k_scale")}  # fmt: skip

            def write_and_attend(parts, scales, positions, cache):
                qkv = jnp.concatenate(parts, axis=-1).reshape(parts[0].shape[0], -1, h)
                q0, k_pages, v_pages = rope_kv_write(
                    qkv, positions[0], cache.meta.slots, cache.k_pages, cache.v_pages, inv_freq,
                    num_heads=qkv.shape[1] - 2 * cache.k_pages.shape[2], attention_factor=rope_factor,
                    eps=self.norm_eps, **scales,
                )  # fmt: skip
                cache = cache._replace(k_pages=k_pages, v_pages=v_pages)
                return attend(q0[None], None, None, positions, cache, self.spec, scale=h**-0.5)

            in_specs = ([P(None, "tensor")] * len(parts), P(), P(), _paged_cache_spec(cache))
            run = tensor_sharded(write_and_attend, self.mesh, in_specs, (heads, _paged_cache_spec(cache)))
            out, cache = run(parts, scales, positions, cache)
        else:
            q, key, value = (proj(x).reshape(b, t, -1, h) for proj in projections)
            if self.qk_norm:
                q = RMSNorm(self.norm_eps, self.dtype, name="q_norm")(q)
                key = RMSNorm(self.norm_eps, self.dtype, name="k_norm")(key)
            q = apply_rope(q, positions, inv_freq, rope_factor)
            key = apply_rope(key, positions, inv_freq, rope_factor)
            run = functools.partial(attend, spec=self.spec, scale=h**-0.5)
            if paged_kernels:  # kv_write and the paged attention kernels
                in_specs = (heads, heads, heads, P(), _paged_cache_spec(cache))
                run = tensor_sharded(run, self.mesh, in_specs, (heads, _paged_cache_spec(cache)))
            out, cache = run(q, key, value, positions, cache)
        out = out.reshape(b, t, n * h)
        o_proj = dense(d, "o_proj", self.o_bias, self.dtype)
        split = split_output and self.spec.impl == "pallas" and tensor == 1 and not self.o_bias
        if split and decode_matmul_fits(b * t, n * h, (d,)) and rms_norm_fits(d):
            weight, _ = o_proj(out, weights_only=True)
            return SplitSum(decode_matmul(out.reshape(b * t, n * h), (weight,), sum_splits=False)), cache
        return o_proj(out), cache
