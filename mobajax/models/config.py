"""Frozen model configs, parsed from Hugging Face `config.json` dicts.

Both RoPE formats are read: the old `rope_theta` + `rope_scaling` keys and transformers 5's
`rope_parameters` dict. Configs are hashable so they can be static arguments of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mobajax.attention import AttentionSpec

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


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder config of the Llama family (Llama, Mistral, Qwen2, Qwen3).

    layer_windows: per layer, the sliding window (None = full attention).
    eos_token_ids: every id that ends generation.
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

    def attention_spec(self, layer: int) -> AttentionSpec:
        """The attention spec of layer `layer` (its sliding window, the chosen impl)."""
        window = self.layer_windows[layer] if self.layer_windows else None
        return AttentionSpec(impl=self.attention_impl, sliding_window=window)


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


def parse_llama_family(hf: dict[str, Any], family: str, **flags: bool) -> ModelConfig:
    """ModelConfig from an HF config dict of the Llama family.

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
        qkv_bias=flags.get("qkv_bias", attention_bias),
        o_bias=flags.get("o_bias", attention_bias),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=flags.get("qk_norm", False),
        layer_windows=_layer_windows(hf, num_layers),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf),
    )
