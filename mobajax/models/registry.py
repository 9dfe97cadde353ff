"""Model registry: HF `architectures[0]` -> config parser, Flax module and weight map.

The weight map is declarative: one row per HF tensor name (template over layers) giving the
param path in the Flax tree, the expected HF shape and whether the matrix is transposed
(HF stores linear weights [out, in], Flax kernels are [in, out]).

MoE experts are stacked params ([E, D, F] / [E, F, D]). Checkpoints store them one tensor per
expert (`...experts.3.w1.weight`, `...experts.3.gate_proj.weight`: what transformers 5's
`save_pretrained` writes) or fused as transformers 5 holds them in memory (`experts.gate_up_proj`
[E, 2F, D], `experts.down_proj` [E, D, F]); the map lists both, the fused ones as alternatives.
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
    """Where one HF tensor goes: params[path], HF shape, transpose to [in, out] or not.

    transpose: swap the last two axes (HF [.., out, in] -> Flax [.., in, out]).
    num_experts: E if params[path] is a stacked [E, ...] expert param, else 0.
    expert: the slice params[path][expert] this per-expert tensor fills; None = all experts.
    fused_with: params concatenated after `path` along the HF out axis (-2) in equal blocks
      (transformers 5's `gate_up_proj` holds gate then up).
    alternative: another storage of tensors the map also lists one by one (fused experts): it
      may replace them, and is never reported missing by itself.
    """

    path: tuple[str, ...]
    shape: tuple[int, ...]
    transpose: bool = False
    num_experts: int = 0
    expert: int | None = None
    fused_with: tuple[tuple[str, ...], ...] = ()
    alternative: bool = False

    def pieces(self) -> list[tuple[tuple[str, ...], int | None]]:
        """The (param path, expert or None) pieces this tensor fills."""
        paths = (self.path, *self.fused_with)
        if not self.num_experts:
            return [(p, None) for p in paths]
        experts = range(self.num_experts) if self.expert is None else (self.expert,)
        return [(p, e) for p in paths for e in experts]


@dataclasses.dataclass(frozen=True)
class Architecture:
    family: str
    parse: Callable[[dict[str, Any]], ModelConfig]
    module: Callable[..., nn.Module]
    weight_map: Callable[[ModelConfig], dict[str, WeightSpec]]


# (HF name inside `model.layers.{i}.`, param path inside `layers_{i}`, shape, transpose, needed when)
_LLAMA_LAYER_ROWS: tuple[tuple[str, tuple[str, ...], Callable, bool, Callable], ...] = (
    ("input_layernorm.weight", ("input_norm", "scale"), lambda c: (c.hidden_size,), False, lambda c: True),
    ("post_attention_layernorm.weight", ("post_attention_norm", "scale"), lambda c: (c.hidden_size,),
     False, lambda c: True),
    ("self_attn.q_proj.weight", ("attn", "q_proj", "kernel"), lambda c: (c.num_heads * c.head_dim, c.hidden_size),
     True, lambda c: True),
    ("self_attn.k_proj.weight", ("attn", "k_proj", "kernel"), lambda c: (c.num_kv_heads * c.head_dim, c.hidden_size),
     True, lambda c: True),
    ("self_attn.v_proj.weight", ("attn", "v_proj", "kernel"), lambda c: (c.num_kv_heads * c.head_dim, c.hidden_size),
     True, lambda c: True),
    ("self_attn.o_proj.weight", ("attn", "o_proj", "kernel"), lambda c: (c.hidden_size, c.num_heads * c.head_dim),
     True, lambda c: True),
    ("self_attn.q_proj.bias", ("attn", "q_proj", "bias"), lambda c: (c.num_heads * c.head_dim,),
     False, lambda c: c.qkv_bias),
    ("self_attn.k_proj.bias", ("attn", "k_proj", "bias"), lambda c: (c.num_kv_heads * c.head_dim,),
     False, lambda c: c.qkv_bias),
    ("self_attn.v_proj.bias", ("attn", "v_proj", "bias"), lambda c: (c.num_kv_heads * c.head_dim,),
     False, lambda c: c.qkv_bias),
    ("self_attn.o_proj.bias", ("attn", "o_proj", "bias"), lambda c: (c.hidden_size,), False, lambda c: c.o_bias),
    ("self_attn.q_norm.weight", ("attn", "q_norm", "scale"), lambda c: (c.head_dim,), False, lambda c: c.qk_norm),
    ("self_attn.k_norm.weight", ("attn", "k_norm", "scale"), lambda c: (c.head_dim,), False, lambda c: c.qk_norm),
    ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), lambda c: (c.intermediate_size, c.hidden_size),
     True, lambda c: True),
    ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), lambda c: (c.intermediate_size, c.hidden_size),
     True, lambda c: True),
    ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), lambda c: (c.hidden_size, c.intermediate_size),
     True, lambda c: True),
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
            if needed(c) and not (c.is_moe_layer(i) and name.startswith("mlp.")):
                specs[f"model.layers.{i}.{name}"] = WeightSpec((f"layers_{i}", *path), shape(c), transpose)
        if c.is_moe_layer(i):
            specs.update(_moe_layer_specs(c, i))
    return specs


# Per-expert HF names of one MoE layer: (block prefix, gate name, up name, down name).
_MIXTRAL_EXPERTS = ("block_sparse_moe", "w1", "w3", "w2")
_QWEN_EXPERTS = ("mlp", "gate_proj", "up_proj", "down_proj")


def _moe_layer_specs(c: ModelConfig, i: int) -> dict[str, WeightSpec]:
    """Router, experts (per-expert and fused alternatives) and shared expert of MoE layer i."""
    m, d, layer = c.moe, c.hidden_size, f"model.layers.{i}"
    e, f = m.num_experts, m.intermediate_size
    block, gate, up, down = _MIXTRAL_EXPERTS if c.architecture == "MixtralForCausalLM" else _QWEN_EXPERTS
    moe = (f"layers_{i}", "moe")
    experts = (*moe, "experts")
    specs = {f"{layer}.{block}.gate.weight": WeightSpec((*moe, "router"), (e, d), True)}
    if block != "mlp":  # transformers 5 in memory renames Mixtral's block_sparse_moe to mlp
        specs[f"{layer}.mlp.gate.weight"] = WeightSpec((*moe, "router"), (e, d), True, alternative=True)
    for x in range(e):
        prefix = f"{layer}.{block}.experts.{x}"
        specs[f"{prefix}.{gate}.weight"] = WeightSpec((*experts, "gate_proj"), (f, d), True, e, x)
        specs[f"{prefix}.{up}.weight"] = WeightSpec((*experts, "up_proj"), (f, d), True, e, x)
        specs[f"{prefix}.{down}.weight"] = WeightSpec((*experts, "down_proj"), (d, f), True, e, x)
    specs[f"{layer}.mlp.experts.gate_up_proj"] = WeightSpec(
        (*experts, "gate_proj"), (e, 2 * f, d), True, e, fused_with=((*experts, "up_proj"),), alternative=True
    )
    specs[f"{layer}.mlp.experts.down_proj"] = WeightSpec((*experts, "down_proj"), (e, d, f), True, e, alternative=True)
    if m.shared_expert_size:
        s = m.shared_expert_size
        shared = (*moe, "shared_expert")
        for name, shape in (("gate_proj", (s, d)), ("up_proj", (s, d)), ("down_proj", (d, s))):
            specs[f"{layer}.mlp.shared_expert.{name}.weight"] = WeightSpec((*shared, name, "kernel"), shape, True)
        specs[f"{layer}.mlp.shared_expert_gate.weight"] = WeightSpec(
            (*moe, "shared_expert_gate", "kernel"), (1, d), True
        )
    return specs


def _llama(moe: str | None = None, **flags: bool) -> Architecture:
    return Architecture(
        family="llama",
        parse=functools.partial(parse_llama_family, family="llama", moe=moe, **flags),
        module=Decoder,
        weight_map=llama_weight_map,
    )


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": _llama(),
    "MistralForCausalLM": _llama(),
    "Qwen2ForCausalLM": _llama(qkv_bias=True, o_bias=False),
    "Qwen3ForCausalLM": _llama(qk_norm=True),
    "MixtralForCausalLM": _llama(moe="mixtral"),
    "Qwen2MoeForCausalLM": _llama(moe="shared", o_bias=False),
    "Qwen3MoeForCausalLM": _llama(moe="routed", qk_norm=True),
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
