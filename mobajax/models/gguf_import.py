"""Reading llama.cpp GGUF files as a Hugging Face-style config and a stream of float32 tensors.

`read_gguf(path)` returns a `GGUFCheckpoint`: `hf_config` (the `config.json` dict transformers
would write for the model), `tensors()` (a generator of `(hf_name, float32 array in HF layout)`,
dequantized one tensor at a time with the `gguf` package), and the tokenizer rebuilt from the
file's metadata. The model converter consumes `hf_config` and `tensors()` exactly as it consumes
a safetensors checkpoint.

Two differences from HF checkpoints are undone here:
- GGUF lists dimensions fastest-first (`[in, out]`); the arrays the reader maps are already in
  row-major HF order `[out, in]`, so we reshape to the reversed GGUF shape.
- llama.cpp's converter permutes the rows of `q_proj`/`k_proj` of `llama` models for interleaved
  (GPT-J style) rope; we invert it so HF's rotate-half rope applies. Qwen2/Qwen3 files keep HF's
  row order (llama.cpp runs them with NeoX-style rope).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import gguf
import numpy as np
from transformers import PreTrainedTokenizerFast

from mobajax.models.tokenizer import tokenizer_from_gguf_metadata


@dataclasses.dataclass(frozen=True)
class _Family:
    hf_architecture: str
    model_type: str
    permute_qk: bool  # llama.cpp permuted q/k rows for interleaved rope


# `general.architecture` -> HF model family. Mistral GGUFs use `llama`.
ARCHITECTURES: dict[str, _Family] = {
    "llama": _Family("LlamaForCausalLM", "llama", permute_qk=True),
    "qwen2": _Family("Qwen2ForCausalLM", "qwen2", permute_qk=False),
    "qwen3": _Family("Qwen3ForCausalLM", "qwen3", permute_qk=False),
}

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_NAME = re.compile(r"^(\w+)\.(weight|bias)$")
_ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1+ rope scaling, stored as per-frequency divisors

SUPPORTED_TENSOR_TYPES = frozenset(
    {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
    | set(getattr(gguf.quants, "_type_traits", {}))
)


def hf_tensor_name(gguf_name: str) -> str:
    """The HF parameter name of a GGUF tensor (`blk.3.attn_q.weight` -> `model.layers.3....`)."""
    if match := _BLOCK_NAME.match(gguf_name):
        layer, part, suffix = match.groups()
        if part in _BLOCK_TENSORS:
            return f"model.layers.{layer}.{_BLOCK_TENSORS[part]}.{suffix}"
    elif (match := _GLOBAL_NAME.match(gguf_name)) and match.group(1) in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[match.group(1)]}.{match.group(2)}"
    raise ValueError(
        f"Unsupported GGUF tensor {gguf_name!r} (known: token_embd, output_norm, output, "
        f"rope_freqs, blk.N.{{{', '.join(_BLOCK_TENSORS)}}})"
    )


def unpermute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's q/k row permutation (interleaved rope -> HF rotate-half rope).

    `weight` is `[n_head * H, ...]` (a weight `[N*H, D]` or a bias `[N*H]`).
    """
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _open_reader(path: str) -> gguf.GGUFReader:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No GGUF file at {path!r}")
    try:
        return gguf.GGUFReader(path)
    except Exception as error:  # the reader raises ValueError, IndexError, ... on bad input
        raise ValueError(f"{path!r} is not a readable GGUF file: {error}") from error


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """All key-value metadata of a GGUF file as Python values (str, int, float, bool, lists)."""
    reader = _open_reader(os.fspath(path))
    return {key: field.contents() for key, field in reader.fields.items()}


@dataclasses.dataclass(frozen=True, eq=False)
class GGUFCheckpoint:
    """A GGUF file read as an HF checkpoint.

    Attributes:
      path: the file.
      hf_config: transformers-style `config.json` dict (`architectures`, `model_type`, ...).
      tokenizer: rebuilt from the file's metadata.
      metadata: the file's raw key-value metadata.
      tensor_names: HF names of the tensors `tensors()` yields, in file order.
    """

    path: str
    hf_config: dict[str, Any]
    tokenizer: PreTrainedTokenizerFast
    metadata: Mapping[str, Any] = dataclasses.field(repr=False)
    tensor_names: tuple[str, ...] = dataclasses.field(repr=False)
    _reader: gguf.GGUFReader = dataclasses.field(repr=False)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield `(hf_name, float32 array in HF layout)` one tensor at a time."""
        n_head = self.hf_config["num_attention_heads"]
        n_kv_head = self.hf_config["num_key_value_heads"]
        permute = ARCHITECTURES[self.metadata["general.architecture"]].permute_qk
        for tensor in self._reader.tensors:
            if tensor.name == _ROPE_FREQS:
                continue
            name = hf_tensor_name(tensor.name)
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            try:
                values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            except NotImplementedError as error:
                raise ValueError(_quant_error(tensor)) from error
            values = np.array(values, dtype=np.float32).reshape(shape)
            if permute and ".self_attn.q_proj." in name:
                values = unpermute_qk(values, n_head)
            elif permute and ".self_attn.k_proj." in name:
                values = unpermute_qk(values, n_kv_head)
            yield name, values


def _quant_error(tensor: Any) -> str:
    supported = ", ".join(sorted(t.name for t in SUPPORTED_TENSOR_TYPES))
    return (
        f"Unsupported GGUF quantization type {tensor.tensor_type.name} of tensor {tensor.name!r}; "
        f"supported: {supported}"
    )


def _get(metadata: Mapping[str, Any], key: str, default: Any = ..., *, scalar: bool = True) -> Any:
    if key not in metadata:
        if default is ...:
            raise ValueError(f"GGUF metadata is missing the required key {key!r}")
        return default
    value = metadata[key]
    if scalar and isinstance(value, list):
        if not value or any(v != value[0] for v in value):
            raise ValueError(f"GGUF metadata {key!r} varies per layer ({value}); not supported")
        value = value[0]
    return value


def _llama3_rope_scaling(
    factors: np.ndarray, head_dim: int, theta: float
) -> dict[str, Any] | None:
    """Recover HF's `rope_type: llama3` parameters from llama.cpp's `rope_freqs` divisors.

    Only the wavelength thresholds `original / low_freq_factor` and `original / high_freq_factor`
    are determined by the divisors; we fix `low_freq_factor = 1` (as in every Llama 3 release),
    which makes the other values come out as published.
    """
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if factors.shape != (head_dim // 2,):
        raise ValueError(f"GGUF rope_freqs has shape {factors.shape}; expected ({head_dim // 2},)")
    if np.allclose(factors, 1.0):
        return None
    factor = float(factors.max())
    inv_wavelen = theta ** (-np.arange(0, head_dim, 2) / head_dim) / (2 * math.pi)
    middle = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    if middle.sum() < 2:
        raise ValueError("GGUF rope_freqs cannot be matched to Llama 3 rope scaling")
    smooth = (1 / factors[middle] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(inv_wavelen[middle], smooth, 1)  # smooth = a/wavelen + b
    original = round(-slope / intercept)
    low = -intercept * original / slope
    high = low + original / slope
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": float(low),
        "high_freq_factor": float(high),
        "original_max_position_embeddings": int(original),
    }
    if not np.allclose(_llama3_divisors(scaling, head_dim, theta), factors, rtol=1e-3):
        raise ValueError("GGUF rope_freqs cannot be matched to Llama 3 rope scaling")
    return scaling


def _llama3_divisors(scaling: Mapping[str, Any], head_dim: int, theta: float) -> np.ndarray:
    """llama.cpp's `rope_freqs` for HF `rope_type: llama3` parameters (its converter's formula)."""
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    old, low, high = (
        scaling["original_max_position_embeddings"],
        scaling["low_freq_factor"],
        scaling["high_freq_factor"],
    )
    smooth = (old / wavelen - low) / (high - low)
    middle = 1 / ((1 - smooth) / scaling["factor"] + smooth)
    out = np.where(wavelen < old / high, 1.0, middle)
    return np.where(wavelen > old / low, scaling["factor"], out)


def _rope_scaling(metadata: Mapping[str, Any], arch: str) -> dict[str, Any] | None:
    kind = metadata.get(f"{arch}.rope.scaling.type")
    if kind is None and f"{arch}.rope.scale_linear" in metadata:
        return {"rope_type": "linear", "factor": float(metadata[f"{arch}.rope.scale_linear"])}
    if kind in (None, "none"):
        return None
    factor = float(_get(metadata, f"{arch}.rope.scaling.factor"))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        return {
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": int(
                _get(metadata, f"{arch}.rope.scaling.original_context_length")
            ),
        }
    raise ValueError(
        f"Unsupported GGUF {arch}.rope.scaling.type {kind!r}; supported: none, linear, yarn"
    )


def _hf_config(metadata: Mapping[str, Any], reader: gguf.GGUFReader) -> dict[str, Any]:
    arch = metadata["general.architecture"]
    family = ARCHITECTURES[arch]
    names = {tensor.name: tensor for tensor in reader.tensors}
    hidden = int(_get(metadata, f"{arch}.embedding_length"))
    n_head = int(_get(metadata, f"{arch}.attention.head_count"))
    n_kv_head = int(_get(metadata, f"{arch}.attention.head_count_kv", n_head))
    head_dim = int(_get(metadata, f"{arch}.attention.key_length", hidden // n_head))
    value_dim = int(_get(metadata, f"{arch}.attention.value_length", head_dim))
    rope_dim = int(_get(metadata, f"{arch}.rope.dimension_count", head_dim))
    if value_dim != head_dim or rope_dim != head_dim:
        raise ValueError(
            f"GGUF with key_length {head_dim}, value_length {value_dim}, rope.dimension_count "
            f"{rope_dim}: only equal head sizes with full rotary embedding are supported"
        )
    theta = float(_get(metadata, f"{arch}.rope.freq_base", 10000.0))
    if "token_embd.weight" not in names:
        raise ValueError("GGUF file has no token_embd.weight tensor")
    tokens = metadata.get("tokenizer.ggml.tokens")
    default_vocab = len(tokens) if tokens else int(names["token_embd.weight"].shape[1])
    config: dict[str, Any] = {
        "architectures": [family.hf_architecture],
        "model_type": family.model_type,
        "hidden_size": hidden,
        "intermediate_size": int(_get(metadata, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_get(metadata, f"{arch}.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv_head,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(_get(metadata, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "max_position_embeddings": int(_get(metadata, f"{arch}.context_length")),
        "vocab_size": int(_get(metadata, f"{arch}.vocab_size", default_vocab)),
        "tie_word_embeddings": "output.weight" not in names,
    }
    if family.model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
        config["mlp_bias"] = False
    elif family.model_type == "qwen3":
        config["attention_bias"] = False
    for key in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{key}" in metadata:
            config[key] = int(metadata[f"tokenizer.ggml.{key}"])
    rope_scaling = _rope_scaling(metadata, arch)
    if _ROPE_FREQS in names:
        if rope_scaling is not None:
            raise ValueError("GGUF has both rope_freqs and rope.scaling metadata; not supported")
        freqs = gguf.quants.dequantize(names[_ROPE_FREQS].data, names[_ROPE_FREQS].tensor_type)
        rope_scaling = _llama3_rope_scaling(freqs, head_dim, theta)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def read_gguf(path: str | os.PathLike[str]) -> GGUFCheckpoint:
    """Open a GGUF file: config, tokenizer, and a lazy tensor stream.

    Raises:
      FileNotFoundError: no file at `path`.
      ValueError: not a GGUF file, unsupported `general.architecture`, a required metadata key
        missing (named), an unsupported tensor or quantization type (named).
    """
    path = os.fspath(path)
    reader = _open_reader(path)
    metadata = {key: field.contents() for key, field in reader.fields.items()}
    arch = metadata.get("general.architecture")
    if arch is None:
        raise ValueError(
            f"GGUF metadata of {path!r} is missing the required key 'general.architecture'"
        )
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"Unsupported GGUF general.architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    for tensor in reader.tensors:
        if tensor.tensor_type not in SUPPORTED_TENSOR_TYPES:
            raise ValueError(_quant_error(tensor))
    names = tuple(hf_tensor_name(t.name) for t in reader.tensors if t.name != _ROPE_FREQS)
    return GGUFCheckpoint(
        path=path,
        hf_config=_hf_config(metadata, reader),
        tokenizer=tokenizer_from_gguf_metadata(metadata),
        metadata=metadata,
        tensor_names=names,
        _reader=reader,
    )
