"""Frozen model configs, parsed from Hugging Face `config.json` dicts.

Both RoPE formats are read: the old `rope_theta` + `rope_scaling` keys and transformers 5's
`rope_parameters` dict. Configs are hashable so they can be static arguments of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mobajax.attention import AttentionSpec
from mobajax.moba_masks import MobaSpec

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF semantics; rotate-half convention).

    rope_type: one of `ROPE_TYPES`. factor: linear/llama3/yarn scaling factor.
    low_freq_factor, high_freq_factor: llama3. original_max_position_embeddings: llama3/yarn.
    beta_fast, beta_slow, attention_factor, mscale, mscale_all_dim, truncate: yarn.
    """

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


MOE_IMPLEMENTATIONS = ("xla", "pallas", "mosaic")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Sparse MoE block settings (HF semantics).

    num_experts: E routed experts; top_k: experts per token; intermediate_size: F of one expert.
    norm_topk_prob: renormalise the top-k softmax probabilities to sum to 1 (Mixtral: always).
    shared_expert_size: F of the Qwen2-MoE shared expert (0 = none); its output is scaled by
      sigmoid(shared_expert_gate(x)).
    layers: per layer, True where the layer is sparse (from `decoder_sparse_step` and
      `mlp_only_layers`); dense layers use the model's `intermediate_size`.
    impl: the grouped-matmul backend of the experts: "xla" (`lax.ragged_dot`, any backend),
      "pallas" (Pallas Triton kernel, GPU), "mosaic" (Pallas Mosaic GPU kernel, Hopper).
    """

    num_experts: int
    top_k: int
    intermediate_size: int
    norm_topk_prob: bool = True
    shared_expert_size: int = 0
    layers: tuple[bool, ...] = ()
    impl: str = "xla"

    def __post_init__(self):
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must lie in [1, {self.num_experts}], got {self.top_k}")
        if self.impl not in MOE_IMPLEMENTATIONS:
            raise ValueError(f"moe impl {self.impl!r} is not one of {MOE_IMPLEMENTATIONS}")


@dataclasses.dataclass(frozen=True)
class MobaConfig:
    """attention = "moba": MoBA block-sparse attention (semantics: the project's MoBA spec).

    block_size: keys per chunk; top_k: chunks per query, its own included. full_attention_layers:
    layers that keep full attention (hybrid; the MoBA paper's Llama-8B-1M keeps the last 3).
    decode: MoBA for decode steps too; by default only steps computing several tokens of a
    sequence (prefill, chunked prefill) use MoBA and decode attends fully, as the paper evaluates.
    """

    block_size: int = 512
    top_k: int = 3
    full_attention_layers: tuple[int, ...] = (-3, -2, -1)
    decode: bool = False

    def __post_init__(self):
        if self.block_size < 1 or self.top_k < 1:
            raise ValueError(f"MoBA block_size and top_k must be >= 1, got {self.block_size} and {self.top_k}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder config of the Llama family (Llama, Mistral, Qwen2, Qwen3, and the MoE variants
    Mixtral, Qwen2-MoE, Qwen3-MoE).

    layer_windows: per layer, the sliding window (None = full attention).
    eos_token_ids: every id that ends generation.
    moe: the mixture-of-experts settings (None = dense model: every layer has a GatedMLP).
    moba: MoBA block-sparse attention settings (None = full attention everywhere); see `with_moba`.
    """

    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    layer_windows: tuple[int | None, ...] = ()
    attention_impl: str = "xla"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    moe: MoEConfig | None = None
    moba: MobaConfig | None = None

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer `layer` has a sparse MoE block (else a dense GatedMLP)."""
        return self.moe is not None and self.moe.layers[layer]

    def attention_spec(self, layer: int) -> AttentionSpec:
        """The attention spec of layer `layer` (its sliding window, the chosen impl, MoBA or not).

        MoBA layers use the XLA path: the Pallas paged kernels have no MoBA mode yet."""
        window = self.layer_windows[layer] if self.layer_windows else None
        if self.moba is None or layer in self.moba.full_attention_layers:
            return AttentionSpec(impl=self.attention_impl, sliding_window=window)
        spec = MobaSpec(self.moba.block_size, self.moba.top_k, self.moba.decode)
        return AttentionSpec(impl="xla", sliding_window=window, moba=spec)

    def with_moba(self, moba: MobaConfig | None) -> ModelConfig:
        """This config with MoBA attention (None: full attention); full_attention_layers may count
        from the end (-1 = last layer) and are stored as non-negative indices."""
        if moba is None:
            return dataclasses.replace(self, moba=None)
        bad = [i for i in moba.full_attention_layers if not -self.num_layers <= i < self.num_layers]
        if bad:
            raise ValueError(
                f"MoBA full-attention layers {bad} are out of range for a model of {self.num_layers} layers "
                f"(allowed: {-self.num_layers} .. {self.num_layers - 1})"
            )
        layers = tuple(sorted({i % self.num_layers for i in moba.full_attention_layers}))
        return dataclasses.replace(self, moba=dataclasses.replace(moba, full_attention_layers=layers))


def _require(hf: dict[str, Any], key: str) -> Any:
    if key not in hf or hf[key] is None:
        raise ValueError(f"config.json has no {key!r}, which a {hf.get('model_type')} model needs")
    return hf[key]


def parse_rope(hf: dict[str, Any]) -> RopeConfig:
    """RoPE parameters from either `rope_parameters` (transformers 5) or `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {ROPE_TYPES}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1.0 is not supported")
    original = params.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    if rope_type in ("llama3", "yarn") and original is None:
        original = hf.get("max_position_embeddings")
    factor = params.get("factor")
    if factor is None:
        factor = hf["max_position_embeddings"] / original if rope_type == "yarn" else 1.0
    optional = ("attention_factor", "mscale", "mscale_all_dim")
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(factor),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        truncate=bool(params.get("truncate", True)),
        **{k: (None if params.get(k) is None else float(params[k])) for k in optional},
    )


def _layer_windows(hf: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    window = hf.get("sliding_window")
    if window is None or hf.get("use_sliding_window") is False:
        return (None,) * num_layers
    layer_types = hf.get("layer_types")
    if layer_types is None:
        if "use_sliding_window" in hf:  # Qwen2/Qwen3: window up to max_window_layers
            start = hf.get("max_window_layers", num_layers)
            return tuple(None if i < start else window for i in range(num_layers))
        return (window,) * num_layers  # Mistral: every layer
    return tuple(window if t == "sliding_attention" else None for t in layer_types)


def _eos_ids(hf: dict[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


MOE_KINDS = ("mixtral", "routed", "shared")


def parse_moe(hf: dict[str, Any], num_layers: int, kind: str) -> MoEConfig:
    """MoEConfig from a Mixtral / Qwen2-MoE / Qwen3-MoE config dict.

    kind: "mixtral" (experts of size `intermediate_size`, always renormalised), "routed"
    (Qwen3-MoE: `moe_intermediate_size`, `norm_topk_prob`) or "shared" (Qwen2-MoE: plus a shared
    expert). The expert count is `num_experts` or `num_local_experts` (both spellings occur).
    """
    assert kind in MOE_KINDS, kind
    mixtral = kind == "mixtral"
    num_experts = hf.get("num_experts") or hf.get("num_local_experts")
    if not num_experts:
        raise ValueError(
            f"config.json has no 'num_experts' / 'num_local_experts', which a {hf.get('model_type')} model needs"
        )
    step = int(hf.get("decoder_sparse_step") or 1)
    if step < 1:
        raise ValueError(f"decoder_sparse_step must be >= 1, got {step}")
    mlp_only = set(hf.get("mlp_only_layers") or ())
    bad = sorted(i for i in mlp_only if not 0 <= i < num_layers)
    if bad:
        raise ValueError(f"mlp_only_layers names layers {bad} outside [0, {num_layers})")
    return MoEConfig(
        num_experts=int(num_experts),
        top_k=int(_require(hf, "num_experts_per_tok")),
        intermediate_size=int(_require(hf, "intermediate_size" if mixtral else "moe_intermediate_size")),
        norm_topk_prob=True if mixtral else bool(hf.get("norm_topk_prob", False)),
        shared_expert_size=int(_require(hf, "shared_expert_intermediate_size")) if kind == "shared" else 0,
        layers=tuple(i not in mlp_only and (i + 1) % step == 0 for i in range(num_layers)),
    )


def parse_llama_family(hf: dict[str, Any], family: str, moe: str | None = None, **flags: bool) -> ModelConfig:
    """ModelConfig from an HF config dict of the Llama family.

    moe: None (dense) or one of `MOE_KINDS` (see `parse_moe`).
    flags: per-architecture switches (qkv_bias, o_bias, qk_norm) that override config keys.
    """
    num_heads = _require(hf, "num_attention_heads")
    hidden = _require(hf, "hidden_size")
    num_layers = _require(hf, "num_hidden_layers")
    attention_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        architecture=hf["architectures"][0],
        family=family,
        vocab_size=_require(hf, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_require(hf, "intermediate_size"),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hidden // num_heads,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        rope=parse_rope(hf),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=flags.get("qkv_bias", bool(hf.get("qkv_bias", attention_bias))),
        o_bias=flags.get("o_bias", attention_bias),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=flags.get("qk_norm", False),
        layer_windows=_layer_windows(hf, num_layers),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf),
        moe=None if moe is None else parse_moe(hf, num_layers, moe),
    )
