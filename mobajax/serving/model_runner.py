"""The page pool and the jitted steps that run the model over it.

The pool is allocated once (per layer a [P, G, K, H] k/v pair, plus the page key sums [P, K, H]
float32 that the MoBA gate reads on MoBA layers, None elsewhere) and donated through every jitted
call, so it is updated in place and never copied. Two compiled step kinds, each on bucketed shapes
(powers of two) so recompilation is bounded:

- `step`: a flat ragged batch of T tokens from up to R sequences (prefill chunks and decodes mixed),
  logits only at the rows that sample, on-device sampling;
- `decode`: `num_steps` decode steps of R sequences inside one jit (a `fori_loop`), with sampling
  and stop checks (stop ids, max tokens) on device; used when no admission is pending.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mobajax.attention import PagedKVCache, PagedMetadata
from mobajax.serving.sampler import Sampled, SamplingArrays, sample, stops

Pools = tuple[tuple[jax.Array, jax.Array, jax.Array | None], ...]  # per layer (k, v, k_sums)


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class Flags(NamedTuple):
    """Static sampler variant: any row with top-k/top-p/min-p, with penalties, logprobs wanted."""

    use_filters: bool = False
    use_penalties: bool = False
    num_logprobs: int = 0


def _copy_pages(pools: Pools, src: jax.Array, dst: jax.Array) -> Pools:
    """Copy-on-write: page src[i] -> dst[i] (k, v and key sums) in every layer (dst < 0: no copy).
    An in-place scatter of a few pages into the donated pool (no conditional: that would copy it)."""
    num_pages = pools[0][0].shape[0]
    target = jnp.where(dst < 0, num_pages, dst)
    return jax.tree.map(lambda x: x.at[target].set(x[src], mode="drop"), pools)


def paged_forward(module, params, pools: Pools, tokens, positions, meta: PagedMetadata, logits_index):
    """The model over the page pool: tokens, positions [T] (a flat batch described by `meta`);
    pools: (k, v, k_sums) per layer -> (logits [T', V] at logits_index (all rows if None),
    updated pools)."""
    caches = tuple(PagedKVCache(k, v, meta, k_sums) for k, v, k_sums in pools)
    logits, caches = module.apply({"params": params}, tokens[None], positions[None], caches, logits_index)
    return logits[0], tuple((c.k_pages, c.v_pages, c.k_sums) for c in caches)


def _step(module, params, pools, copy_src, copy_dst, tokens, positions, meta, logits_index, arrays, *, flags: Flags):
    pools = _copy_pages(pools, copy_src, copy_dst)
    logits, pools = paged_forward(module, params, pools, tokens, positions, meta, logits_index)
    return pools, sample(logits, arrays, **flags._asdict())


def _decode(
    module, params, pools, tokens, positions, slots, page_table, remaining, arrays, *, flags: Flags, num_steps: int
):
    rows = tokens.shape[0]
    row_ids = jnp.arange(rows, dtype=jnp.int32)
    cu = jnp.arange(rows + 1, dtype=jnp.int32)

    def body(i, carry):
        pools, last, alive, counts, out = carry
        meta = PagedMetadata(jnp.where(alive, slots[i], -1), page_table, cu, positions + i + 1, row_ids, decode=True)
        logits, pools = paged_forward(module, params, pools, last, jnp.where(alive, positions + i, -1), meta, row_ids)
        step_arrays = arrays._replace(counters=arrays.counters + i, counts=counts)
        s = sample(logits, step_arrays, **flags._asdict())
        out = Sampled(*(o.at[i].set(x) for o, x in zip(out, s)))
        out = out._replace(tokens=out.tokens.at[i].set(jnp.where(alive, s.tokens, -1)))
        if counts is not None:
            counts = counts + jax.nn.one_hot(s.tokens, counts.shape[-1], dtype=counts.dtype) * alive[:, None]
        alive = alive & ~(stops(s.tokens, step_arrays) | (i + 1 >= remaining))
        return pools, jnp.where(alive, s.tokens, last), alive, counts, out

    k = flags.num_logprobs
    out = Sampled(
        jnp.full((num_steps, rows), -1, jnp.int32),
        jnp.zeros((num_steps, rows), jnp.float32),
        jnp.zeros((num_steps, rows, k), jnp.int32),
        jnp.zeros((num_steps, rows, k), jnp.float32),
    )
    init = (pools, tokens, (remaining > 0) & (tokens >= 0), arrays.counts, out)  # token < 0: a stopped row
    pools, _, _, _, out = jax.lax.fori_loop(0, num_steps, body, init)
    return pools, out


@jax.jit
def select_rows(tokens: jax.Array, rows: jax.Array) -> jax.Array:
    """tokens [R] int32 gathered at rows [R'] int32; -1 where rows < 0 (padding rows, stopped)."""
    return jnp.where(rows >= 0, tokens[jnp.maximum(rows, 0)], -1)


@dataclasses.dataclass
class ModelRunner:
    """Params + page pool + compiled steps for one model.

    module: the Flax decoder (its config's attention_impl picks XLA or Pallas attention); with
    sharded params, the jitted steps run SPMD over their mesh.
    """

    module: Any
    params: Any
    num_pages: int
    page_size: int
    max_model_len: int
    dtype: Any
    pool_sharding: Any = None  # NamedSharding of the k/v pools, e.g. kv heads over `tensor`; None: default device

    def __post_init__(self):
        c = self.module.config
        shape = (self.num_pages, self.page_size, c.num_kv_heads, c.head_dim)
        zeros = functools.partial(jnp.zeros, shape, self.dtype, device=self.pool_sharding)
        sums_sharding = self.pool_sharding
        if sums_sharding is not None:  # the pool's sharding without its page-slot axis
            spec = sums_sharding.spec
            sums_sharding = NamedSharding(sums_sharding.mesh, PartitionSpec(*spec[:1], *spec[2:]))
        sums = functools.partial(jnp.zeros, (self.num_pages, *shape[2:]), jnp.float32, device=sums_sharding)
        self.pools: Pools = tuple(
            (zeros(), zeros(), None if c.attention_spec(i).moba is None else sums()) for i in range(c.num_layers)
        )
        self.pages_per_seq = -(-self.max_model_len // self.page_size)
        self._step = jax.jit(functools.partial(_step, self.module), static_argnames=("flags",), donate_argnums=(1,))
        self._decode = jax.jit(
            functools.partial(_decode, self.module), static_argnames=("flags", "num_steps"), donate_argnums=(1,)
        )

    @staticmethod
    def page_bytes(config, page_size: int, dtype) -> int:
        """Bytes of one page across all layers (k and v, and the key sums of MoBA layers)."""
        kv = 2 * config.num_layers * page_size * jnp.dtype(dtype).itemsize
        sums = 4 * sum(config.attention_spec(i).moba is not None for i in range(config.num_layers))  # float32
        return (kv + sums) * config.num_kv_heads * config.head_dim

    def step(
        self, copies, tokens, positions, meta: PagedMetadata, logits_index, arrays: SamplingArrays, flags: Flags
    ) -> Sampled:
        width = max(len(logits_index), next_power_of_two(len(copies)))
        src = np.zeros(width, np.int32)
        dst = np.full(width, -1, np.int32)
        for i, (s, d) in enumerate(copies):
            src[i], dst[i] = s, d
        self.pools, sampled = self._step(
            self.params, self.pools, src, dst, tokens, positions, meta, logits_index, arrays, flags=flags
        )
        return sampled

    def decode(
        self, tokens, positions, slots, page_table, remaining, arrays: SamplingArrays, flags: Flags, num_steps: int
    ) -> Sampled:
        self.pools, sampled = self._decode(
            self.params, self.pools, tokens, positions, slots, page_table, remaining, arrays,
            flags=flags, num_steps=num_steps
        )
        return sampled
