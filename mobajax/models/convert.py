"""Checkpoint conversion: HF tensors -> Flax params, streamed tensor by tensor.

Sources are (HF name, array) streams: safetensors files (single or sharded with
`model.safetensors.index.json`) and GGUF files (via `gguf_import`). Every tensor is checked
against the architecture's weight map (unexpected names, shapes), cast to the target dtype and
placed in the params tree; missing tensors are reported by name at the end.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import safetensors
from tqdm.auto import tqdm

from mobajax.models.registry import IGNORED_SUFFIXES, WeightSpec

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


def resolve_dtype(dtype: str) -> Any:
    """jnp dtype for a dtype name; ValueError naming the allowed names."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def read_hf_config(path: str) -> dict[str, Any]:
    """The parsed config.json of an HF checkpoint directory."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint directory: it has no config.json")
    with open(config_path) as f:
        return json.load(f)


def safetensors_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory (sharded index first, then single file)."""
    index = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise FileNotFoundError(f"{SAFETENSORS_INDEX} in {path} names missing shard files: {missing}")
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, SAFETENSORS_SINGLE)
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"{path} has neither {SAFETENSORS_SINGLE} nor {SAFETENSORS_INDEX}")


def safetensors_shapes(files: list[str]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape over all files, read from headers only."""
    shapes = {}
    for file in files:
        with safetensors.safe_open(file, framework="flax") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def stream_safetensors(files: list[str]) -> Iterator[tuple[str, jax.Array]]:
    """(name, array) for every tensor, one at a time."""
    for file in files:
        with safetensors.safe_open(file, framework="flax") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _is_ignored(name: str, specs: dict[str, WeightSpec], tied: bool) -> bool:
    return name.endswith(IGNORED_SUFFIXES) or (tied and name == "lm_head.weight")


def check_names_and_shapes(shapes: dict[str, tuple[int, ...]], specs: dict[str, WeightSpec], tied: bool) -> None:
    """Raise before loading anything if tensors are missing, unexpected or of the wrong shape."""
    present = {n for n in shapes if not _is_ignored(n, specs, tied)}
    unexpected = sorted(present - specs.keys())
    if unexpected:
        raise ValueError(f"checkpoint has unexpected tensors: {', '.join(unexpected[:10])}")
    missing = sorted(specs.keys() - present)
    if missing:
        raise ValueError(f"checkpoint is missing tensors: {', '.join(missing[:10])}")
    for name in sorted(present):
        _check_shape(name, shapes[name], specs[name])


def _check_shape(name: str, found: tuple[int, ...], spec: WeightSpec) -> None:
    if tuple(found) != spec.shape:
        raise ValueError(f"tensor {name} has shape {tuple(found)}, expected {spec.shape}")


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def convert_tensors(
    tensors: Iterable[tuple[str, Any]],
    specs: dict[str, WeightSpec],
    *,
    tied: bool,
    dtype: Any,
    desc: str = "converting",
) -> dict:
    """Build the Flax params tree from an (HF name, array) stream.

    Arrays may be numpy or jax; each is shape-checked, cast to `dtype`, transposed where the
    spec says so and placed on the default device. Raises ValueError naming unexpected,
    missing or misshapen tensors.
    """
    params: dict = {}
    seen = set()
    for name, array in tqdm(tensors, total=len(specs), desc=desc, unit="tensor", leave=False):
        if _is_ignored(name, specs, tied):
            continue
        if name not in specs:
            raise ValueError(f"checkpoint has unexpected tensors: {name}")
        spec = specs[name]
        _check_shape(name, array.shape, spec)
        value = jnp.asarray(array).astype(dtype)
        _set(params, spec.path, value.T if spec.transpose else value)
        seen.add(name)
    missing = sorted(specs.keys() - seen)
    if missing:
        raise ValueError(f"checkpoint is missing tensors: {', '.join(missing[:10])}")
    return params
