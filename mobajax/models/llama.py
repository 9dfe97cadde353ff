"""The Llama decoder family: Llama (incl. Llama 3 rope scaling), Mistral, Qwen2, Qwen3 and the
MoE variants Mixtral, Qwen2-MoE, Qwen3-MoE (a `SparseMoE` block in place of the MLP on the layers
`config.is_moe_layer` selects).

One functional Flax Linen module: `Decoder(config, dtype).apply({"params": p}, tokens, positions,
caches)`. The KV cache is an explicit argument and result (no mutable collections).

Shape letters: B batch, T tokens, D model dim, V vocab.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mobajax.attention import KVCache, PagedKVCache
from mobajax.models.config import ModelConfig
from mobajax.models.layers import Attention, GatedMLP, RMSNorm, dense
from mobajax.models.moe import SparseMoE


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h)); x [B, T, D].

    The mlp is a GatedMLP (params "mlp") or, on MoE layers, a SparseMoE (params "moe").
    """

    config: ModelConfig
    layer: int
    dtype: Any = jnp.float32
    mesh: Mesh | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, positions: jax.Array, cache: KVCache | None
    ) -> tuple[jax.Array, KVCache | None]:
        c = self.config
        attn = Attention(
            num_heads=c.num_heads,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            spec=c.attention_spec(self.layer),
            rope=c.rope,
            qkv_bias=c.qkv_bias,
            o_bias=c.o_bias,
            qk_norm=c.qk_norm,
            norm_eps=c.rms_norm_eps,
            dtype=self.dtype,
            mesh=self.mesh,
            name="attn",
        )
        kernel = c.attention_impl == "pallas"  # the GPU kernels' mode
        normed = RMSNorm(c.rms_norm_eps, self.dtype, kernel, name="input_norm")(x)
        # in the kernels' mode a decode step's o projection stays split (`SplitSum`) and the
        # post-attention norm adds it to x in its own kernel
        h, cache = attn(normed, positions, cache, split_output=kernel)
        x, normed = RMSNorm(c.rms_norm_eps, self.dtype, kernel, name="post_attention_norm")(h, residual=x)
        if c.is_moe_layer(self.layer):
            mlp = SparseMoE(c.moe, self.dtype, self.mesh, name="moe")
        else:
            mlp = GatedMLP(c.intermediate_size, c.mlp_bias, self.dtype, name="mlp")
        return x + mlp(normed), cache


class Decoder(nn.Module):
    """Token ids [B, T] at positions [B, T] -> (logits [B, T, V] float32, caches).

    caches: None for a full-sequence forward, else one cache per layer (`KVCache`, see
    `mobajax.attention.init_kv_cache`, or the serving pool's `PagedKVCache`); the updated caches
    are returned. logits_index [R] int32: if given, logits only for those flat token rows of a
    B == 1 batch -> [1, R, V] (the LM head then skips the other rows).
    mesh: the device mesh of `mobajax.parallel` when params are sharded (MoE layers then run
    expert-parallel); None on one device. Dense layers need nothing from it (GSPMD).
    """

    config: ModelConfig
    dtype: Any = jnp.float32
    mesh: Mesh | None = None

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        caches: tuple[KVCache | PagedKVCache, ...] | None = None,
        logits_index: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[KVCache | PagedKVCache, ...] | None]:
        c = self.config
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype, name="embed")
        x = embed(tokens)
        new_caches = []
        for i in range(c.num_layers):
            layer = DecoderLayer(c, i, self.dtype, self.mesh, name=f"layers_{i}")
            x, cache = layer(x, positions, None if caches is None else caches[i])
            new_caches.append(cache)
        if logits_index is not None:
            x = x[:, logits_index]
        x = RMSNorm(c.rms_norm_eps, self.dtype, name="norm")(x)
        if c.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = dense(c.vocab_size, "lm_head", False, self.dtype)(x)
        return logits.astype(jnp.float32), (None if caches is None else tuple(new_caches))
