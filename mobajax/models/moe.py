"""Sparse mixture-of-experts block of the Llama family (Mixtral, Qwen2-MoE, Qwen3-MoE).

Router in float32: softmax over the E experts, top-k, optionally renormalised to sum to 1
(`norm_topk_prob`; Mixtral always); one `router_top_k` kernel with the kernel impls. Tokens are
sorted by expert and the experts run as grouped matmuls (`mobajax.pallas.grouped_matmul`);
outputs are weighted and scattered back. Qwen2-MoE adds a dense shared expert scaled by
sigmoid(shared_expert_gate(x)).

With a mesh (`mobajax.parallel`), the experts run in a `jax.shard_map`: experts sharded over the
`expert` axis (their F dim over `tensor`). Tokens arrive split over the devices (data-parallel
around the MoE); each device all-gathers its expert group's tokens, runs only its local experts
on the assignments that go to them, and the partial outputs are summed and split back with a
`psum_scatter` (see `expert_parallel_experts`). No capacity: every assignment is computed, so
skewed routing drops nothing.

Shape letters: B batch, T tokens, D model dim, E experts, F expert MLP dim; A = tokens * top_k
assignments.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mobajax.models.config import MoEConfig
from mobajax.models.layers import GatedMLP, dense, dot_general, two_rows
from mobajax.pallas.grouped_matmul import grouped_matmul, grouped_matmul_mosaic, mosaic_config_for
from mobajax.pallas.moe_decode import fits, moe_decode
from mobajax.pallas.router_top_k import route_reference, router_top_k


def route(logits: jax.Array, top_k: int, normalize: bool, impl: str = "xla") -> tuple[jax.Array, jax.Array]:
    """Router logits [N, E] -> (weights [N, k] float32, experts [N, k] int32), HF semantics
    (`route_reference`): impl "xla" runs it as XLA ops, the kernel impls as one `router_top_k`."""
    if impl == "xla":
        return route_reference(logits, top_k, normalize)
    return router_top_k(logits, top_k, normalize)


def route_tokens(
    x: jax.Array, router: jax.Array, top_k: int, normalize: bool, impl: str = "xla"
) -> tuple[jax.Array, jax.Array]:
    """Tokens x [N, D] and router weights [D, E] -> `route` of the float32 logits x @ router.

    Every product is exact in float32 and summed in float32: 16-bit x and router of one dtype
    multiply on the tensor cores with float32 accumulation (their products fit float32); other
    dtypes as float32 at HIGHEST precision (no TF32 on the GPU). One token is a two-row GEMM (see
    `dot_general`); the kernel impls route both rows' logits with `num_tokens=1` rather than copy
    the first row out.
    """
    dims = (((1,), (0,)), ((), ()))
    if x.dtype == router.dtype and x.dtype in (jnp.bfloat16, jnp.float16):
        lhs, rhs, kw = x, router, {"preferred_element_type": jnp.float32}
    else:
        lhs, rhs, kw = x.astype(jnp.float32), router.astype(jnp.float32), {"precision": jax.lax.Precision.HIGHEST}
    if impl != "xla" and x.shape[0] == 1:
        logits = jax.lax.dot_general(two_rows(lhs), rhs, dims, **kw)
        return router_top_k(logits, top_k, normalize, num_tokens=1)
    return route(dot_general(lhs, rhs, dims, **kw), top_k, normalize, impl)


def expert_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, impl: str) -> jax.Array:
    """Grouped matmul x [A, K] (sorted by group) @ w [G, K, N] -> [A, N]; rows past the groups are 0
    for "xla" and unspecified for the kernels (callers mask them)."""
    if impl == "xla":
        return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32).astype(x.dtype)
    config = mosaic_config_for(w.shape[1], w.shape[2]) if impl == "mosaic" else None
    if config is None:  # "pallas", or shapes the Mosaic kernel does not take
        return grouped_matmul(x, w, group_sizes)
    return grouped_matmul_mosaic(x, w, group_sizes, config=config)


def run_experts(
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    *,
    first_expert: int | jax.Array = 0,
    impl: str = "xla",
) -> jax.Array:
    """sum_k weights[n, k] * expert_{experts[n, k]}(x[n]) over the experts held here -> [N, D] float32.

    x [N, D]; weights, experts [N, k]; gate, up [E_local, D, F]; down [E_local, F, D] hold experts
    first_expert .. first_expert + E_local - 1. Assignments to other experts contribute 0.
    With the kernels ("pallas", "mosaic"), at most E_local / 2 assignments (decode) and dims the
    decode kernels take, each assignment runs on its own (`moe_decode`); otherwise `grouped_experts`.
    """
    n, k = experts.shape
    num_local = gate.shape[0]
    local = experts - first_expert
    if impl != "xla" and n * k <= num_local // 2 and fits(x.shape[1], gate.shape[2]):
        return moe_decode(x, weights, local, gate, up, down)  # ids outside 0..E_local-1 contribute 0
    local = jnp.where((local >= 0) & (local < num_local), local, -1)
    return grouped_experts(x, weights, local, gate, up, down, impl=impl)


def grouped_experts(x, weights, experts, gate, up, down, *, impl: str = "xla") -> jax.Array:
    """`run_experts` by grouped matmuls: assignments sorted by expert, gathered, three grouped
    matmuls, scattered back. experts [N, k] are ids into gate/up/down, -1 for experts held
    elsewhere (they sort last and contribute 0) -> [N, D] float32."""
    n, k = experts.shape
    num_local = gate.shape[0]
    flat = experts.reshape(-1)
    held = flat >= 0
    key = jnp.where(held, flat, num_local)  # other experts' assignments sort last
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.bincount(key, length=num_local + 1)[:num_local].astype(jnp.int32)
    token = order // k
    xs = x[token]  # [A, D], grouped by expert
    h = nn.silu(expert_matmul(xs, gate, group_sizes, impl)) * expert_matmul(xs, up, group_sizes, impl)
    y = expert_matmul(h, down, group_sizes, impl).astype(jnp.float32)  # [A, D]
    scale = jnp.where(held[order], weights.reshape(-1)[order], 0.0)
    y = jnp.where(held[order][:, None], y, 0.0) * scale[:, None]  # kernel rows past the groups: unset
    return jnp.zeros((n, x.shape[1]), jnp.float32).at[token].add(y)


def token_axes(num_tokens: int, mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the tokens of an expert-parallel MoE layer are split over: ("data",
    "expert") when their product divides num_tokens, else ("data",) when that divides, else ()."""
    for axes in (("data", "expert"), ("data",)):
        if num_tokens % int(np.prod([mesh.shape[a] for a in axes])) == 0:
            return axes
    return ()


def expert_parallel_experts(
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    *,
    mesh: Mesh,
    impl: str = "xla",
) -> jax.Array:
    """`run_experts` with experts sharded over mesh axis `expert` and F over `tensor` -> [N, D] float32.

    Tokens come and go split over `token_axes`. Split over `expert` too (the usual case: the
    layers around the MoE then run on a slice of the tokens per device, data-parallel), each
    device all-gathers its expert group's tokens, computes its local experts' (F-slice)
    contributions to all of them, and a psum over `tensor` plus a psum_scatter over `expert`
    returns every device the sums for its own tokens. Otherwise (tokens replicated over `expert`)
    one psum over (`expert`, `tensor`).
    """
    axes = token_axes(x.shape[0], mesh)
    spec = P(axes or None)

    def local(x, weights, experts, gate, up, down):
        if "expert" in axes:
            x, weights, experts = (jax.lax.all_gather(a, "expert", tiled=True) for a in (x, weights, experts))
        first = jax.lax.axis_index("expert") * gate.shape[0]
        out = run_experts(x, weights, experts, gate, up, down, first_expert=first, impl=impl)
        if "expert" in axes:
            return jax.lax.psum_scatter(jax.lax.psum(out, "tensor"), "expert", tiled=True)
        return jax.lax.psum(out, ("expert", "tensor"))

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(
            spec, spec, spec, P("expert", None, "tensor"), P("expert", None, "tensor"), P("expert", "tensor", None)
        ),
        out_specs=spec,
        check_vma=False,  # the kernels' pallas_calls declare no per-axis variance of their outputs
    )(x, weights, experts, gate, up, down)


class SparseMoE(nn.Module):
    """Router + routed experts (+ Qwen2-MoE shared expert): x [B, T, D] -> [B, T, D].

    Params: router [D, E]; experts/{gate_proj, up_proj} [E, D, F], experts/down_proj
    [E, F, D]; shared_expert (GatedMLP) and shared_expert_gate/kernel [D, 1] if present.
    mesh: if set, the experts run expert-parallel over it (`expert_parallel_experts`).
    """

    config: MoEConfig
    dtype: Any = jnp.float32
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        b, t, d = x.shape
        e, f = c.num_experts, c.intermediate_size
        router = self.param("router", nn.initializers.lecun_normal(), (d, e), self.dtype)
        gate, up, down = _Experts(e, d, f, self.dtype, name="experts")()
        flat = x.reshape(b * t, d)
        weights, chosen = route_tokens(flat, router, c.top_k, c.norm_topk_prob, c.impl)
        self.sow("intermediates", "chosen_experts", chosen)  # [B * T, top_k], with mutable=["intermediates"]
        if self.mesh is None:
            out = run_experts(flat, weights, chosen, gate, up, down, impl=c.impl)
        else:
            out = expert_parallel_experts(flat, weights, chosen, gate, up, down, mesh=self.mesh, impl=c.impl)
        if c.shared_expert_size:
            shared = GatedMLP(c.shared_expert_size, False, self.dtype, name="shared_expert")(flat)
            shared_gate = dense(1, "shared_expert_gate", False, self.dtype)(flat)
            out = out + jax.nn.sigmoid(shared_gate.astype(jnp.float32)) * shared.astype(jnp.float32)
        return out.astype(x.dtype).reshape(b, t, d)


class _Experts(nn.Module):
    """The stacked expert weights: (gate_proj [E, D, F], up_proj [E, D, F], down_proj [E, F, D])."""

    num_experts: int
    hidden_size: int
    intermediate_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        e, d, f = self.num_experts, self.hidden_size, self.intermediate_size
        init = nn.initializers.lecun_normal(batch_axis=(0,))
        return (
            self.param("gate_proj", init, (e, d, f), self.dtype),
            self.param("up_proj", init, (e, d, f), self.dtype),
            self.param("down_proj", init, (e, f, d), self.dtype),
        )
