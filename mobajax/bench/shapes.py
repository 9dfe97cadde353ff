"""Random-weight models of real shapes for benchmarks (no checkpoint download).

`SHAPES` names HF config dicts of public models; `random_pretrained` builds a `Pretrained` with
random params of that shape (initialised on the default device, in the chosen dtype).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp

from mobajax.models import Pretrained
from mobajax.models.convert import resolve_dtype
from mobajax.models.registry import architecture_of

SHAPES: dict[str, dict] = {
    "llama3-8b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        rms_norm_eps=1e-5, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
        bos_token_id=128000, eos_token_id=128001,
    ),
    "smollm2-135m": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
        rms_norm_eps=1e-5, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    ),
    "qwen3-0.6b": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=1024, intermediate_size=3072,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        rms_norm_eps=1e-6, max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151645,
    ),
}


def hf_config_of(shape: str) -> dict:
    """A named shape, or the path of an HF config.json."""
    if shape in SHAPES:
        return dict(SHAPES[shape])
    if shape.endswith(".json"):
        with open(shape) as f:
            return json.load(f)
    raise ValueError(f"unknown model shape {shape!r}; use one of {sorted(SHAPES)} or a config.json path")


def random_pretrained(hf_config: dict, dtype: str = "bfloat16", seed: int = 0) -> Pretrained:
    """Pretrained with random params of the config's shape (no tokenizer)."""
    arch = architecture_of(hf_config)
    config = arch.parse(hf_config)
    module = arch.module(config, resolve_dtype(dtype))
    tokens = jnp.zeros((1, 1), jnp.int32)
    # Eager, not one jit: XLA's fusion passes take minutes on a whole-model init graph, while each
    # eager op compiles once per shape and is reused by every layer.
    params = module.init(jax.random.key(seed), tokens, tokens)["params"]
    return Pretrained(config, params, module, None, hf_config, dtype)


def param_bytes(params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
