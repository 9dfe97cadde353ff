"""Attention over one KV chunk returning (out, lse), the exact merge of partial states, and
KV-sequence-parallel attention (`jax.shard_map`).

Log base: every lse here (taken or returned) is the NATURAL-log log-sum-exp of the scaled logits
q.k * scale over the visible keys of the chunk: lse = log(sum_j exp(q.k_j * scale)). A query that
sees no key of the chunk has out = 0 and lse = -inf, the identity of `merge_states`.

Visibility is causal by absolute position, as in `mobajax.attention.dense_attention_reference`:
query i sees key j when 0 <= k_positions[j] <= q_positions[i]; negative positions are padding.

Shapes: q [B, T, N, H], k/v [B, S, K, H], q_positions [B, T], k_positions [B, S] int32,
out [B, T, N, H] (q's dtype), lse [B, T, N] float32. N % K == 0 (GQA: the N // K query heads of a
kv head share every K/V tile the kernel loads).
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

HEAD_DIMS = (16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class AttentionChunkConfig:
    """Tuning of `attention_chunk`: block_m query rows (tokens x folded heads) per program,
    block_kv keys per tile (both powers of two, >= 16)."""

    block_m: int = 64
    block_kv: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_m", "block_kv"):
            value = getattr(self, name)
            if not (osm.is_power_of_two(value) and value >= 16):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")


def attention_chunk_kernel(
    q_pos_ref,  # [BQ] int32
    k_pos_ref,  # [S_pad] int32
    q_ref,  # [BQ, Gq_pad, H]
    k_ref,  # [S_pad, H]
    v_ref,  # [S_pad, H]
    o_ref,  # [BQ, Gq_pad, H]
    lse_ref,  # [BQ, Gq_pad] float32
    *,
    scale: float,
    block_kv: int,
):
    block_q, gq, head_dim = q_ref.shape
    rows = block_q * gq
    q = q_ref[...].reshape(rows, head_dim)
    q_pos = jnp.broadcast_to(q_pos_ref[...][:, None], (block_q, gq)).reshape(rows)

    def body(j, state):
        kv = pl.ds(j * block_kv, block_kv)
        k_pos = k_pos_ref[kv]  # [block_kv]
        key_ok = k_pos >= 0
        k = k_ref[kv, :]
        v = jnp.where(key_ok[:, None], v_ref[kv, :], 0).astype(v_ref.dtype)
        visible = key_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        s = jnp.where(visible, osm.qk_logits(q, k, scale), -jnp.inf)
        return osm.update(state, s, v)

    num_tiles = k_ref.shape[0] // block_kv
    state = lax.fori_loop(0, num_tiles, body, osm.init_state(rows, head_dim))
    out, lse = osm.finalize(state)
    o_ref[...] = out.reshape(block_q, gq, head_dim).astype(o_ref.dtype)
    lse_ref[...] = lse.reshape(block_q, gq)


def _check(q, k, v, q_positions, k_positions):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(
            f"expected q [B, T, N, H] and k, v [B, S, K, H] of equal shape, got q {q.shape}, "
            f"k {k.shape}, v {v.shape}"
        )
    b, t, n, h = q.shape
    if k.shape[0] != b or k.shape[3] != h:
        raise ValueError(f"k/v batch and head dim must match q's ({b}, {h}), got {k.shape}")
    if n % k.shape[2]:
        raise ValueError(f"query heads N={n} must be a multiple of kv heads K={k.shape[2]}")
    if h not in HEAD_DIMS:
        raise ValueError(f"head dim H={h} is not supported; allowed: {HEAD_DIMS}")
    if q_positions.shape != (b, t) or k_positions.shape != (b, k.shape[1]):
        raise ValueError(
            f"positions must be q_positions [B, T]={(b, t)} and k_positions [B, S]="
            f"{(b, k.shape[1])}, got {q_positions.shape} and {k_positions.shape}"
        )


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def attention_chunk(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    k_positions: jax.Array,
    *,
    scale: float | None = None,
    config: AttentionChunkConfig = AttentionChunkConfig(),
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Attention of q [B, T, N, H] to one KV chunk k/v [B, S, K, H] -> (out [B, T, N, H],
    lse [B, T, N] float32, NATURAL log). `scale` defaults to H ** -0.5."""
    _check(q, k, v, q_positions, k_positions)
    b, t, n, h = q.shape
    s_len, kv_heads = k.shape[1], k.shape[2]
    scale = h**-0.5 if scale is None else scale
    gq = n // kv_heads
    gq_pad = max(osm.next_power_of_two(gq), 1)
    block_q = max(16 // gq_pad, 1, min(config.block_m // gq_pad, osm.next_power_of_two(t)))
    block_kv = min(config.block_kv, max(16, osm.next_power_of_two(s_len)))
    t_pad = -(-t // block_q) * block_q
    s_pad = -(-s_len // block_kv) * block_kv

    q5 = q.reshape(b, t, kv_heads, gq, h)
    q5 = jnp.pad(q5, ((0, 0), (0, t_pad - t), (0, 0), (0, gq_pad - gq), (0, 0)))
    kp = jnp.pad(k, ((0, 0), (0, s_pad - s_len), (0, 0), (0, 0)))
    vp = jnp.pad(v, ((0, 0), (0, s_pad - s_len), (0, 0), (0, 0)))
    q_pos = jnp.pad(q_positions.astype(jnp.int32), ((0, 0), (0, t_pad - t)), constant_values=-1)
    k_pos = jnp.pad(k_positions.astype(jnp.int32), ((0, 0), (0, s_pad - s_len)), constant_values=-1)

    grid = (b, kv_heads, t_pad // block_q)
    kernel = functools.partial(attention_chunk_kernel, scale=scale, block_kv=block_kv)
    out, lse = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            pl.BlockSpec((None, block_q), lambda bi, ki, qi: (bi, qi)),
            pl.BlockSpec((None, s_pad), lambda bi, ki, qi: (bi, 0)),
            pl.BlockSpec((None, block_q, None, gq_pad, h), lambda bi, ki, qi: (bi, qi, ki, 0, 0)),
            pl.BlockSpec((None, s_pad, None, h), lambda bi, ki, qi: (bi, 0, ki, 0)),
            pl.BlockSpec((None, s_pad, None, h), lambda bi, ki, qi: (bi, 0, ki, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, block_q, None, gq_pad, h), lambda bi, ki, qi: (bi, qi, ki, 0, 0)),
            pl.BlockSpec((None, block_q, None, gq_pad), lambda bi, ki, qi: (bi, qi, ki, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q5.shape, q.dtype),
            jax.ShapeDtypeStruct(q5.shape[:-1], jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="attention_chunk",
    )(q_pos, k_pos, q5, kp, vp)
    out = out[:, :t, :, :gq].reshape(b, t, n, h)
    lse = lse[:, :t, :, :gq].reshape(b, t, n)
    return out, lse


def attention_chunk_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    k_positions: jax.Array,
    *,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Pure-jnp `attention_chunk`: (out [B, T, N, H] in q's dtype, lse [B, T, N] float32, natural
    log; out 0 and lse -inf for a query that sees no key)."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    scale = h**-0.5 if scale is None else scale
    qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
    exact = jax.lax.Precision.HIGHEST  # no TF32 on GPU: the reference must be float32-exact
    logits = jnp.einsum(
        "btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32, precision=exact
    )
    logits = logits * scale
    qp = q_positions[:, None, None, :, None]
    kp = k_positions[:, None, None, None, :]
    visible = (kp >= 0) & (kp <= qp)
    logits = jnp.where(visible, logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)  # -inf where nothing is visible
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    probs = jnp.where(visible, jnp.exp(logits - lse_safe[..., None]), 0.0)
    v_safe = jnp.where((k_positions >= 0)[:, :, None, None], v, 0).astype(v.dtype)
    out = jnp.einsum(
        "bkgts,bskh->btkgh",
        probs,
        v_safe.astype(jnp.float32),
        preferred_element_type=jnp.float32,
        precision=exact,
    )
    out = out.reshape(b, t, n, h).astype(q.dtype)
    lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, t, n)
    return out, lse


def merge_states(outs: jax.Array, lses: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Exact merge of C partial attention states over disjoint key sets.

    outs [C, ..., H] (each normalised over its own keys), lses [C, ...] NATURAL-log log-sum-exp
    -> (out [..., H] in outs' dtype, lse [...] float32 natural log). A part with lse = -inf
    contributes nothing (its out is ignored, even if NaN); if every part is -inf: out 0, lse -inf.
    """
    lses = lses.astype(jnp.float32)
    m = jnp.max(lses, axis=0)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lses - m_safe)  # [C, ...]: 0 for empty parts
    denom = jnp.sum(w, axis=0)
    parts = jnp.where(w[..., None] > 0, outs.astype(jnp.float32), 0.0)
    out = jnp.sum(w[..., None] * parts, axis=0) / jnp.where(denom == 0, 1.0, denom)[..., None]
    lse = jnp.where(denom == 0, -jnp.inf, m_safe + jnp.log(jnp.where(denom == 0, 1.0, denom)))
    return out.astype(outs.dtype), lse


def kv_parallel_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    k_positions: jax.Array,
    *,
    mesh: jax.sharding.Mesh,
    axis_name: str,
    scale: float | None = None,
    config: AttentionChunkConfig = AttentionChunkConfig(),
    interpret: bool = False,
    use_reference: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """KV-sequence-parallel attention: k/v/k_positions are sharded along S over `axis_name` of
    `mesh` (S divisible by that axis' size), q and q_positions are replicated. Each device runs
    `attention_chunk` on its slice; the partial states are merged exactly with one pmax and two
    psums (the collective form of `merge_states`). Returns (out [B, T, N, H], lse [B, T, N]
    float32, natural log), replicated; equal to unsharded attention.
    """
    shards = mesh.shape[axis_name]
    if k.shape[1] % shards:
        raise ValueError(
            f"kv length S={k.shape[1]} must be divisible by the {axis_name!r} axis size {shards}"
        )
    p = jax.sharding.PartitionSpec

    def local(q, k, v, qp, kp):
        if use_reference:
            out, lse = attention_chunk_reference(q, k, v, qp, kp, scale=scale)
        else:
            out, lse = attention_chunk(
                q, k, v, qp, kp, scale=scale, config=config, interpret=interpret
            )
        m = lax.pmax(lse, axis_name)
        m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
        w = jnp.exp(lse - m_safe)
        num = lax.psum(w[..., None] * out.astype(jnp.float32), axis_name)
        denom = lax.psum(w, axis_name)
        merged = num / jnp.where(denom == 0, 1.0, denom)[..., None]
        lse = jnp.where(denom == 0, -jnp.inf, m_safe + jnp.log(jnp.where(denom == 0, 1.0, denom)))
        return merged.astype(q.dtype), lse

    sharded = p(None, axis_name)
    in_specs = (p(), sharded, sharded, p(), sharded)
    fn = jax.shard_map(
        local, mesh=mesh, in_specs=in_specs, out_specs=(p(), p()), check_vma=False
    )
    args = (q, k, v, q_positions, k_positions)
    if jax.sharding.AxisType.Explicit in mesh.axis_types:  # types must match the specs
        args = [
            jax.reshard(x, jax.sharding.NamedSharding(mesh, spec))
            for x, spec in zip(args, in_specs)
        ]
    return jax.jit(fn)(*args)
