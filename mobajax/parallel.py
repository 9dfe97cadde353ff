"""Device mesh and parameter sharding: data, expert and tensor parallelism on one `Mesh`.

One `jax.sharding.Mesh` with the named axes `AXES` = ("data", "expert", "tensor"):
- tensor: attention heads and dense MLP columns. Column-parallel kernels (q/k/v, gate/up, lm_head)
  are split on their output axis, row-parallel ones (o_proj, down_proj) on their input axis; XLA's
  SPMD partitioner inserts the reductions (Megatron-style).
- expert: the E axis of the stacked expert params; MoE layers run in a `jax.shard_map`
  (`mobajax.models.moe.expert_parallel_experts`), so the module must know the mesh
  (`Decoder(config, dtype, mesh)`). Expert F dims are split over `tensor` too.
- data: replicas; a batch is split over it where it divides.
Everything else (embeddings, norms, routers) is replicated. The rules table `PARAM_RULES` maps
param paths to `PartitionSpec`s.

Multi-host: call `jax.distributed.initialize()` in every process first (one process per host,
or per GPU), then the same `make_mesh` over `jax.devices()` (all processes' devices) works
unchanged; JAX's runtime (NCCL on GPUs) carries the collectives. `tests/test_parallel.py` runs
this with two CPU processes.

Example (two CPU processes standing in for two hosts)::

    # process i of 2, started with the same coordinator address:
    jax.distributed.initialize("localhost:12345", num_processes=2, process_id=i)
    mesh = make_mesh(expert=jax.device_count())
    model = parallelize(load_pretrained(path), mesh)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "expert", "tensor")

# (regex over the "/"-joined param path, PartitionSpec); first match wins, no match = replicated.
PARAM_RULES: tuple[tuple[str, P], ...] = (
    (r"attn/(q|k|v)_proj/kernel$", P(None, "tensor")),
    (r"attn/(q|k|v)_proj/bias$", P("tensor")),
    (r"attn/o_proj/kernel$", P("tensor", None)),
    (r"(mlp|shared_expert)/(gate|up)_proj/kernel$", P(None, "tensor")),
    (r"(mlp|shared_expert)/(gate|up)_proj/bias$", P("tensor")),
    (r"(mlp|shared_expert)/down_proj/kernel$", P("tensor", None)),
    (r"experts/(gate|up)_proj$", P("expert", None, "tensor")),
    (r"experts/down_proj$", P("expert", "tensor", None)),
    (r"^lm_head/kernel$", P(None, "tensor")),
)


def make_mesh(*, data: int = 1, expert: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A mesh of shape (data, expert, tensor) over `devices` (default: all of `jax.devices()`).

    The product must equal the number of devices; ValueError otherwise. Neighbouring devices
    go to the `tensor` axis (the one with the most traffic).
    """
    devices = jax.devices() if devices is None else list(devices)
    for name, size in (("data", data), ("expert", expert), ("tensor", tensor)):
        if size < 1:
            raise ValueError(f"{name} parallel size must be >= 1, got {size}")
    if data * expert * tensor != len(devices):
        raise ValueError(
            f"data ({data}) x expert ({expert}) x tensor ({tensor}) = {data * expert * tensor} "
            f"must equal the number of devices ({len(devices)})"
        )
    return Mesh(np.asarray(devices).reshape(data, expert, tensor), AXES)


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def param_spec(name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The PartitionSpec of param `name` ("layers_0/attn/q_proj/kernel"); an axis that does not
    divide its dim is dropped (that dim replicated)."""
    for pattern, spec in PARAM_RULES:
        if re.search(pattern, name):
            return P(*(a if a is None or dim % mesh.shape[a] == 0 else None for a, dim in zip(spec, shape)))
    return P()


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """The NamedSharding tree of `params` (arrays or ShapeDtypeStructs) under `PARAM_RULES`."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, param_spec(_path_name(path), x.shape, mesh)), params
    )


def shard_params(params: Any, mesh: Mesh) -> Any:
    """`params` placed on the mesh by `param_shardings` (works on one host and on many)."""
    return jax.device_put(params, param_shardings(params, mesh))


def check_parallel(config, mesh: Mesh) -> None:
    """ValueError naming the config field that the mesh does not divide.

    Tensor parallelism splits attention by kv head; expert parallelism splits E and the
    expert (and shared-expert) F dims over `tensor`.
    """
    tp, ep = mesh.shape["tensor"], mesh.shape["expert"]
    if config.num_kv_heads % tp:
        raise ValueError(f"tensor parallel size {tp} must divide num_key_value_heads={config.num_kv_heads}")
    if ep > 1 and config.moe is None:
        raise ValueError(f"expert parallel size {ep} needs an MoE model; {config.architecture} is dense")
    if config.moe is not None:
        if config.moe.num_experts % ep:
            raise ValueError(f"expert parallel size {ep} must divide num_experts={config.moe.num_experts}")
        if config.moe.intermediate_size % tp:
            raise ValueError(
                f"tensor parallel size {tp} must divide the expert intermediate size {config.moe.intermediate_size}"
            )


def parallelize(pretrained, mesh: Mesh):
    """A `Pretrained` whose params are sharded over `mesh` and whose module knows it.

    The module's outputs equal the single-device ones (up to float summation order). Jit its
    apply as usual: the shardings of the params drive XLA's partitioner.
    """
    check_parallel(pretrained.config, mesh)
    module = pretrained.module.clone(mesh=mesh)
    return dataclasses.replace(pretrained, params=shard_params(pretrained.params, mesh), module=module)


def make_parallel(pretrained, *, tensor_parallel_size: int = 1, expert_parallel_size: int = 1, devices=None):
    """Shortcut for the engine's `--tensor-parallel-size` / `--expert-parallel-size` flags:
    the remaining devices become data-parallel replicas. Returns (parallel pretrained, mesh)."""
    devices = jax.devices() if devices is None else list(devices)
    per_replica = tensor_parallel_size * expert_parallel_size
    if per_replica < 1 or len(devices) % per_replica:
        raise ValueError(
            f"tensor ({tensor_parallel_size}) x expert ({expert_parallel_size}) parallel size must divide "
            f"the number of devices ({len(devices)})"
        )
    mesh = make_mesh(
        data=len(devices) // per_replica, expert=expert_parallel_size, tensor=tensor_parallel_size, devices=devices
    )
    return parallelize(pretrained, mesh), mesh
