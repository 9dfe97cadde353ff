"""Model registry: HF `architectures[0]` -> config parser, Flax module and weight map.

The weight map is declarative: one row per HF tensor name (template over layers) giving the
param path in the Flax tree, the expected HF shape and whether the matrix is transposed
(HF stores linear weights [out, in], Flax kernels are [in, out]).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from mobajax.models.config import ModelConfig, parse_llama_family
from mobajax.models.llama import Decoder


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """Where one HF tensor goes: params[path], HF shape, transpose to [in, out] or not."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    transpose: bool = False


@dataclasses.dataclass(frozen=True)
class Architecture:
    family: str
    parse: Callable[[dict[str, Any]], ModelConfig]
    module: Callable[..., nn.Module]
    weight_map: Callable[[ModelConfig], dict[str, WeightSpec]]


# (HF name inside `model.layers.{i}.`, param path inside `layers_{i}`, shape, transpose, needed when)
_LLAMA_LAYER_ROWS: tuple[tuple[str, tuple[str, ...], Callable, bool, Callable], ...] = (
    ("input_layernorm.weight", ("input_norm", "scale"), lambda c: (c.hidden_size,), False, lambda c: True),
    ("post_attention_layernorm.weight", ("post_attention_norm", "scale"), lambda c: (c.hidden_size,), False, lambda c: True),
    ("self_attn.q_proj.weight", ("attn", "q_proj", "kernel"), lambda c: (c.num_heads * c.head_dim, c.hidden_size), True, lambda c: True),
    ("self_attn.k_proj.weight", ("attn", "k_proj", "kernel"), lambda c: (c.num_kv_heads * c.head_dim, c.hidden_size), True, lambda c: True),
    ("self_attn.v_proj.weight", ("attn", "v_proj", "kernel"), lambda c: (c.num_kv_heads * c.head_dim, c.hidden_size), True, lambda c: True),
    ("self_attn.o_proj.weight", ("attn", "o_proj", "kernel"), lambda c: (c.hidden_size, c.num_heads * c.head_dim), True, lambda c: True),
    ("self_attn.q_proj.bias", ("attn", "q_proj", "bias"), lambda c: (c.num_heads * c.head_dim,), False, lambda c: c.qkv_bias),
    ("self_attn.k_proj.bias", ("attn", "k_proj", "bias"), lambda c: (c.num_kv_heads * c.head_dim,), False, lambda c: c.qkv_bias),
    ("self_attn.v_proj.bias", ("attn", "v_proj", "bias"), lambda c: (c.num_kv_heads * c.head_dim,), False, lambda c: c.qkv_bias),
    ("self_attn.o_proj.bias", ("attn", "o_proj", "bias"), lambda c: (c.hidden_size,), False, lambda c: c.o_bias),
    ("self_attn.q_norm.weight", ("attn", "q_norm", "scale"), lambda c: (c.head_dim,), False, lambda c: c.qk_norm),
    ("self_attn.k_norm.weight", ("attn", "k_norm", "scale"), lambda c: (c.head_dim,), False, lambda c: c.qk_norm),
    ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), lambda c: (c.intermediate_size, c.hidden_size), True, lambda c: True),
    ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), lambda c: (c.intermediate_size, c.hidden_size), True, lambda c: True),
    ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), lambda c: (c.hidden_size, c.intermediate_size), True, lambda c: True),
    ("mlp.gate_proj.bias", ("mlp", "gate_proj", "bias"), lambda c: (c.intermediate_size,), False, lambda c: c.mlp_bias),
    ("mlp.up_proj.bias", ("mlp", "up_proj", "bias"), lambda c: (c.intermediate_size,), False, lambda c: c.mlp_bias),
    ("mlp.down_proj.bias", ("mlp", "down_proj", "bias"), lambda c: (c.hidden_size,), False, lambda c: c.mlp_bias),
)


def llama_weight_map(c: ModelConfig) -> dict[str, WeightSpec]:
    """HF tensor name -> WeightSpec for every tensor a Llama-family checkpoint must hold."""
    specs = {
        "model.embed_tokens.weight": WeightSpec(("embed", "embedding"), (c.vocab_size, c.hidden_size)),
        "model.norm.weight": WeightSpec(("norm", "scale"), (c.hidden_size,)),
    }
    if not c.tie_word_embeddings:
        specs["lm_head.weight"] = WeightSpec(("lm_head", "kernel"), (c.vocab_size, c.hidden_size), True)
    for i in range(c.num_layers):
        for name, path, shape, transpose, needed in _LLAMA_LAYER_ROWS:
            if needed(c):
                specs[f"model.layers.{i}.{name}"] = WeightSpec((f"layers_{i}", *path), shape(c), transpose)
    return specs


def _llama(**flags: bool) -> Architecture:
    return Architecture(
        family="llama",
        parse=functools.partial(parse_llama_family, family="llama", **flags),
        module=Decoder,
        weight_map=llama_weight_map,
    )


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": _llama(),
    "MistralForCausalLM": _llama(),
    "Qwen2ForCausalLM": _llama(qkv_bias=True, o_bias=False),
    "Qwen3ForCausalLM": _llama(qk_norm=True),
}

# Tensors some checkpoints carry that are not parameters (recomputed buffers).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def architecture_of(hf_config: dict[str, Any]) -> Architecture:
    """The registered Architecture for an HF config dict; ValueError naming the supported ones."""
    names = hf_config.get("architectures") or []
    if not names:
        raise ValueError(
            "config.json has no 'architectures' entry; supported architectures: "
            + ", ".join(sorted(ARCHITECTURES))
        )
    if names[0] not in ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {names[0]!r}; supported architectures: "
            + ", ".join(sorted(ARCHITECTURES))
        )
    return ARCHITECTURES[names[0]]
