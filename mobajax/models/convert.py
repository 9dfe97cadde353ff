"""Checkpoint conversion: HF tensors -> Flax params, streamed tensor by tensor.

Sources are (HF name, array) streams: safetensors files (single or sharded with
`model.safetensors.index.json`) and GGUF files (via `gguf_import`). Every tensor is checked
against the architecture's weight map (unexpected names, shapes), cast to the target dtype and
placed in the params tree; missing tensors are reported by name at the end.

Stacked MoE expert params ([E, ...]) are filled slice by slice from per-expert tensors (in a host
buffer, moved to the device once complete) or at once from a fused tensor; a param counts as
present once every (path, expert) piece is filled, whichever storage filled it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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


def _missing_error(specs: dict[str, WeightSpec], present: set[str]) -> str | None:
    """The error for spec'd tensors whose pieces the present tensors leave unfilled, or None.

    Per-expert names are listed first; fused alternatives that would fill them are named too.
    Raises ValueError if two present tensors fill the same piece (per-expert and fused copies).
    """
    filled: dict[tuple, str] = {}
    for name in sorted(present):
        for piece in specs[name].pieces():
            if piece in filled:
                raise ValueError(f"tensors {filled[piece]} and {name} both hold parameter {'/'.join(piece[0])}")
            filled[piece] = name
    unfilled = {n: s for n, s in specs.items() if any(p not in filled for p in s.pieces())}
    missing = sorted(n for n, s in unfilled.items() if not s.alternative)
    if not missing:
        return None
    more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    fused = sorted(n for n, s in unfilled.items() if s.alternative)
    hint = f" (or the fused tensors {', '.join(fused[:4])})" if fused else ""
    return f"checkpoint is missing tensors: {', '.join(missing[:10])}{more}{hint}"


def check_names_and_shapes(shapes: dict[str, tuple[int, ...]], specs: dict[str, WeightSpec], tied: bool) -> None:
    """Raise before loading anything if tensors are missing, unexpected or of the wrong shape."""
    present = {n for n in shapes if not _is_ignored(n, specs, tied)}
    unexpected = sorted(present - specs.keys())
    if unexpected:
        raise ValueError(f"checkpoint has unexpected tensors: {', '.join(unexpected[:10])}")
    error = _missing_error(specs, present)
    if error:
        raise ValueError(error)
    for name in sorted(present):
        _check_shape(name, shapes[name], specs[name])


def _check_shape(name: str, found: tuple[int, ...], spec: WeightSpec) -> None:
    if tuple(found) != spec.shape:
        raise ValueError(f"tensor {name} has shape {tuple(found)}, expected {spec.shape}")


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


class _ExpertStacks:
    """Host buffers of stacked [E, ...] expert params, filled slice by slice."""

    def __init__(self, dtype: Any):
        self.dtype = np.dtype(dtype)
        self.buffers: dict[tuple[str, ...], np.ndarray] = {}
        self.filled: dict[tuple[str, ...], set[int]] = {}

    def put(self, path: tuple[str, ...], num_experts: int, expert: int, value: np.ndarray) -> np.ndarray | None:
        """Store slice `expert`; returns the whole stack once all experts are in, else None."""
        if path not in self.buffers:
            self.buffers[path] = np.empty((num_experts, *value.shape), self.dtype)
            self.filled[path] = set()
        self.buffers[path][expert] = value
        self.filled[path].add(expert)
        if len(self.filled[path]) < num_experts:
            return None
        del self.filled[path]
        return self.buffers.pop(path)


def _parts(xp: Any, spec: WeightSpec, value: Any) -> list:
    """The tensor transposed to Flax layout and cut into its fused params' equal blocks."""
    value = xp.swapaxes(value, -1, -2) if spec.transpose else value
    if not spec.fused_with:
        return [value]
    return xp.split(value, 1 + len(spec.fused_with), axis=-1 if spec.transpose else -2)


def _place(params: dict, stacks: _ExpertStacks, spec: WeightSpec, array: Any, dtype: Any) -> None:
    """Cast, transpose and split one checkpoint tensor into the params it fills."""
    paths = (spec.path, *spec.fused_with)
    if spec.expert is not None:  # one slice of a stacked param: via the host buffer
        for path, part in zip(paths, _parts(np, spec, np.asarray(array).astype(stacks.dtype))):
            stacked = stacks.put(path, spec.num_experts, spec.expert, part)
            if stacked is not None:
                _set(params, path, jnp.asarray(stacked))
        return
    for path, part in zip(paths, _parts(jnp, spec, jnp.asarray(array).astype(dtype))):
        _set(params, path, part)


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
    stacks = _ExpertStacks(dtype)
    seen = set()
    total = sum(not s.alternative for s in specs.values())
    for name, array in tqdm(tensors, total=total, desc=desc, unit="tensor", leave=False):
        if _is_ignored(name, specs, tied):
            continue
        if name not in specs:
            raise ValueError(f"checkpoint has unexpected tensors: {name}")
        spec = specs[name]
        _check_shape(name, array.shape, spec)
        _place(params, stacks, spec, array, dtype)
        seen.add(name)
    error = _missing_error(specs, seen)
    if error:
        raise ValueError(error)
    return params
