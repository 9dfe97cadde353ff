"""`load_pretrained` and `forward`: the public entry points of `mobajax.models`.

`load_pretrained(path)` accepts an HF checkpoint directory (config.json + safetensors), a
`.gguf` file, a directory written by `save_pretrained` (Orbax params), or `"default"`, the
built-in SmolLM2-135M-Instruct (converted once from its GGUF and cached).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mobajax.models import checkpoint
from mobajax.models.config import MobaConfig, ModelConfig
from mobajax.models.convert import (
    check_names_and_shapes,
    convert_tensors,
    read_hf_config,
    resolve_dtype,
    safetensors_files,
    safetensors_shapes,
    stream_safetensors,
)
from mobajax.models.registry import architecture_of

DEFAULT = "default"


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A loaded model: frozen config, params tree, Flax module, tokenizer (or None).

    hf_config: the HF config dict it was built from; dtype: the params' dtype name.
    """

    config: ModelConfig
    params: Any
    module: nn.Module
    tokenizer: Any
    hf_config: dict
    dtype: str


def _build(hf_config: dict, tensors, shapes, dtype: str, tokenizer, desc: str) -> Pretrained:
    arch = architecture_of(hf_config)
    config = arch.parse(hf_config)
    specs = arch.weight_map(config)
    if shapes is not None:
        check_names_and_shapes(shapes, specs, config.tie_word_embeddings)
    params = convert_tensors(
        tensors, specs, tied=config.tie_word_embeddings, dtype=resolve_dtype(dtype), desc=desc
    )
    module = arch.module(config, resolve_dtype(dtype))
    return Pretrained(config, params, module, tokenizer, hf_config, dtype)


def _load_hf(path: str, dtype: str) -> Pretrained:
    from mobajax.models.tokenizer import load_hf_tokenizer

    hf_config = read_hf_config(path)
    architecture_of(hf_config)  # fail on the architecture before touching tensors
    files = safetensors_files(path)
    return _build(
        hf_config, stream_safetensors(files), safetensors_shapes(files), dtype,
        load_hf_tokenizer(path), f"loading {os.path.basename(os.path.normpath(path))}",
    )


def _load_gguf(path: str, dtype: str) -> Pretrained:
    from mobajax.models.gguf_import import read_gguf

    gguf = read_gguf(path)
    return _build(gguf.hf_config, gguf.tensors(), None, dtype, gguf.tokenizer, f"importing {os.path.basename(path)}")


def _load_converted(path: str, dtype: str) -> Pretrained:
    from mobajax.models.tokenizer import load_hf_tokenizer

    hf_config = read_hf_config(path)
    arch = architecture_of(hf_config)
    config = arch.parse(hf_config)
    saved_dtype = checkpoint.read_marker(path)["dtype"]
    module = arch.module(config, resolve_dtype(saved_dtype))
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *_dummy_inputs())["params"])
    params = checkpoint.restore_params(path, abstract)
    if dtype != saved_dtype:
        params = jax.tree.map(lambda x: x.astype(resolve_dtype(dtype)), params)
        module = arch.module(config, resolve_dtype(dtype))
    return Pretrained(config, params, module, load_hf_tokenizer(path), hf_config, dtype)


def _load_default(dtype: str) -> Pretrained:
    from mobajax.models.default_model import DEFAULT_MODEL_ID, cache_dir, default_gguf_path

    cached = os.path.join(cache_dir(), f"{DEFAULT_MODEL_ID}-{dtype}")
    if checkpoint.is_converted(cached):
        return _load_converted(cached, dtype)
    pretrained = _load_gguf(default_gguf_path(), dtype)
    save_pretrained(pretrained, cached)
    return pretrained


def _dummy_inputs() -> tuple[jax.Array, jax.Array]:
    return jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32)


def load_pretrained(path: str, *, dtype: str = "float32", moba: MobaConfig | None = None) -> Pretrained:
    """Load a model from an HF directory, a `.gguf` file, a converted directory or "default".

    moba: attend with MoBA block-sparse attention (see `MobaConfig`); None = full attention.
    """
    resolve_dtype(dtype)
    return with_moba(_load(path, dtype), moba)


def _load(path: str, dtype: str) -> Pretrained:
    if path == DEFAULT:
        return _load_default(dtype)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"{path} is a file but not a .gguf file; pass a .gguf file or a checkpoint directory")
        return _load_gguf(path, dtype)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"model path {path!r} does not exist; pass an HF checkpoint directory, a .gguf file or 'default'"
        )
    if checkpoint.is_converted(path):
        return _load_converted(path, dtype)
    return _load_hf(path, dtype)


def with_moba(pretrained: Pretrained, moba: MobaConfig | None) -> Pretrained:
    """The same model attending with MoBA (`moba`) or full attention (None); params are shared."""
    config = pretrained.config.with_moba(moba)
    return dataclasses.replace(pretrained, config=config, module=pretrained.module.clone(config=config))


def save_pretrained(pretrained: Pretrained, path: str) -> None:
    """Save converted params (Orbax), the HF config and the tokenizer to `path`."""
    if os.path.exists(os.path.join(path, "params")):
        raise FileExistsError(f"{path} already holds a converted checkpoint")
    checkpoint.save_converted(path, pretrained.hf_config, pretrained.params, pretrained.dtype, pretrained.tokenizer)


@functools.cache
def _jitted_apply(module: nn.Module):
    return jax.jit(lambda params, tokens, positions: module.apply({"params": params}, tokens, positions)[0])


def forward(pretrained: Pretrained, token_ids) -> np.ndarray:
    """Full-sequence forward without a cache: token ids [B, T] -> logits [B, T, V] (float32)."""
    tokens = np.asarray(token_ids)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"token_ids must be an integer array [B, T], got {tokens.dtype} {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= pretrained.config.vocab_size):
        raise ValueError(
            f"token ids must lie in [0, {pretrained.config.vocab_size}), got {tokens.min()}..{tokens.max()}"
        )
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    logits = _jitted_apply(pretrained.module)(pretrained.params, jnp.asarray(tokens, jnp.int32), jnp.asarray(positions))
    return np.asarray(logits)
