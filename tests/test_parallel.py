"""Expert, tensor and data parallelism on 8 fake CPU devices equal one device (prefill and decode).

jax fixes its device count when it starts, so the checks run in a subprocess started with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (`_checks` below); this process only checks
the mesh and sharding rules, which need no devices.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mobajax.models.config import ModelConfig, MoEConfig, RopeConfig
from mobajax.parallel import check_parallel, make_mesh, param_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_moe_config(**moe_changes) -> ModelConfig:
    """Qwen2-MoE-like: layer 0 sparse (8 experts, top-2, shared expert), layer 1 dense."""
    moe = dict(num_experts=8, top_k=2, intermediate_size=32, norm_topk_prob=False, shared_expert_size=48,
               layers=(True, False))
    return ModelConfig(
        architecture="Qwen2MoeForCausalLM", family="llama", vocab_size=96, hidden_size=64,
        intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
        max_position_embeddings=128, rope=RopeConfig(theta=10000.0), qkv_bias=True,
        moe=MoEConfig(**{**moe, **moe_changes}),
    )


def test_param_rules():
    mesh = make_mesh(devices=jax.devices()[:1])
    assert param_spec("layers_0/attn/q_proj/kernel", (64, 64), mesh) == P(None, "tensor")
    assert param_spec("layers_0/attn/o_proj/kernel", (64, 64), mesh) == P("tensor", None)
    assert param_spec("layers_0/moe/experts/down_proj", (8, 32, 64), mesh) == P("expert", "tensor", None)
    assert param_spec("layers_0/moe/router", (64, 8), mesh) == P()
    assert param_spec("embed/embedding", (96, 64), mesh) == P()


def test_mesh_and_divisibility_errors():
    with pytest.raises(ValueError, match=r"must equal the number of devices \(1\)"):
        make_mesh(expert=2, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="tensor parallel size must be >= 1"):
        make_mesh(tensor=0)

    class FakeMesh:
        shape = {"data": 1, "expert": 3, "tensor": 1}

    with pytest.raises(ValueError, match="expert parallel size 3 must divide num_experts=8"):
        check_parallel(tiny_moe_config(), FakeMesh())
    FakeMesh.shape = {"data": 1, "expert": 1, "tensor": 4}
    with pytest.raises(ValueError, match="tensor parallel size 4 must divide num_key_value_heads=2"):
        check_parallel(tiny_moe_config(), FakeMesh())


def test_parallel_equals_single_device_on_8_cpu_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", "from tests.test_parallel import _checks; _checks()"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "all parallel checks passed" in result.stdout


def _close(ours, ref, what):
    ours, ref = np.asarray(ours), np.asarray(ref)
    err = np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-6)
    assert err <= 1e-5, f"{what}: relative error {err}"
    print(f"{what}: relative error {err:.1e}")


def _prefill_and_decode(module, params, tokens, next_tokens, config):
    """Logits of a cached prefill of tokens [B, T] and of one decode step of next_tokens [B, 1]."""
    from mobajax.attention import init_kv_cache

    b, t = tokens.shape
    caches = init_kv_cache(config.num_layers, b, 32, config.num_kv_heads, config.head_dim, jnp.float32)
    step = jax.jit(lambda p, x, pos, c: module.apply({"params": p}, x, pos, c))
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    prefill, caches = step(params, tokens, positions, caches)
    decode, _ = step(params, next_tokens, jnp.full((b, 1), t, jnp.int32), caches)
    return prefill, decode


def _checks():
    """Run in the 8-device subprocess."""
    from mobajax.models.llama import Decoder
    from mobajax.models.moe import expert_parallel_experts, run_experts
    from mobajax.models.pretrained import Pretrained
    from mobajax.parallel import parallelize

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    config = tiny_moe_config()
    module = Decoder(config, jnp.float32)
    # 32 prefill tokens split over every mesh's (data, expert) devices; the 4 decode tokens are
    # too few for expert=8, which then runs them replicated over `expert`
    tokens = jnp.asarray(rng.integers(0, 96, (4, 8)), jnp.int32)
    next_tokens = jnp.asarray(rng.integers(0, 96, (4, 1)), jnp.int32)
    params = module.init(jax.random.key(0), tokens, jnp.zeros_like(tokens))["params"]
    params = jax.tree.map(lambda x: x * 3.0 if x.ndim > 1 else x, params)  # spread the router logits
    skewed = jax.tree.map(lambda x: x, params)
    skewed["layers_0"]["moe"]["router"] = jnp.zeros_like(params["layers_0"]["moe"]["router"])  # ties: experts 0, 1

    for name, p in (("dynamic routing", params), ("all tokens to experts 0 and 1", skewed)):
        ref_prefill, ref_decode = _prefill_and_decode(module, p, tokens, next_tokens, config)
        for shape in (dict(expert=8), dict(expert=4, tensor=2), dict(data=2, expert=2, tensor=2),
                      dict(data=4, tensor=2)):
            loaded = Pretrained(config, p, module, None, {}, "float32")
            par = parallelize(loaded, make_mesh(**shape))
            assert par.module.mesh is not None and par.config == config
            prefill, decode = _prefill_and_decode(par.module, par.params, tokens, next_tokens, config)
            _close(prefill, ref_prefill, f"{name} {shape} prefill")
            _close(decode, ref_decode, f"{name} {shape} decode")

    # all assignments to one expert (top-1): the device holding it gets every token, nothing dropped;
    # 40 tokens go split over the devices (all-gather + reduce-scatter), 41 replicated (all-reduce)
    moe = params["layers_0"]["moe"]["experts"]
    w = (moe["gate_proj"], moe["up_proj"], moe["down_proj"])
    for n, collective in ((40, "reduce-scatter"), (41, "all-reduce")):
        x = jnp.asarray(rng.standard_normal((n, 64)), jnp.float32)
        experts = jnp.full((n, 1), 5, jnp.int32)
        weights = jnp.ones((n, 1), jnp.float32)
        ref = run_experts(x, weights, experts, *w)
        assert np.abs(np.asarray(ref)).min(axis=1).max() > 0  # every token got the expert's output
        for shape in (dict(expert=8), dict(expert=4, tensor=2)):
            fn = jax.jit(lambda *a, mesh=make_mesh(**shape): expert_parallel_experts(*a, mesh=mesh))
            assert collective in fn.lower(x, weights, experts, *w).compile().as_text()
            _close(fn(x, weights, experts, *w), ref, f"one expert, {n} tokens, {shape}")
    # the GPU kernels trace inside the shard_map (decode kernels for 1 token, grouped for 40)
    for impl in ("pallas", "mosaic"):
        for n in (1, 40):
            x, experts, weights = jnp.zeros((n, 64)), jnp.zeros((n, 1), jnp.int32), jnp.ones((n, 1))
            fn = jax.jit(lambda *a, impl=impl: expert_parallel_experts(*a, mesh=make_mesh(expert=8), impl=impl))
            fn.trace(x, weights, experts, *w)
    _paged_pallas_attention_checks()
    print("all parallel checks passed")


def _paged_pallas_attention_checks():
    """Paged Attention with the Pallas kernels (interpret mode) over tensor=2 equals one device: the
    kernels run per device (shard_map) on its heads and its shard of the page pool, never on a
    gathered pool. Head dim 32 takes `rope_kv_write`, 16 the XLA rope and `kv_write`."""
    import dataclasses
    import functools

    import mobajax.attention
    from mobajax.attention import AttentionSpec, PagedKVCache
    from mobajax.models import layers
    from mobajax.models.layers import Attention
    from tests.test_attention import build_paged_batch

    for module, names in ((layers, ("rope_kv_write", "decode_matmul")),
                          (mobajax.attention, ("paged_prefill", "paged_decode", "kv_write"))):
        for name in names:
            setattr(module, name, functools.partial(getattr(module, name), interpret=True))
    mesh = make_mesh(tensor=2, devices=jax.devices()[:2])
    shard = lambda x, *spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, P(*spec)))  # noqa: E731
    rng = np.random.default_rng(3)
    for h, qk_norm in ((32, True), (16, False)):
        for decode, cached, new in ((True, [5, 40, 17], [1, 1, 1]), (False, [0, 21], [9, 3])):
            k_pages, v_pages, meta, positions = build_paged_batch(rng, cached, new, 16, 12, 2, h)
            cache = PagedKVCache(jnp.asarray(k_pages), jnp.asarray(v_pages), dataclasses.replace(meta, decode=decode))
            x = jnp.asarray(rng.standard_normal((1, len(positions), 64)), jnp.float32)
            pos = jnp.asarray(positions, jnp.int32)[None]
            spec = AttentionSpec(impl="pallas")
            one = Attention(8, 2, h, spec, RopeConfig(theta=10000.0), qk_norm=qk_norm)
            params = one.init(jax.random.key(0), x, pos, None)["params"]
            params = jax.tree.map(lambda p: p * 1.5 + 0.1 if p.ndim == 1 else p, params)
            ref, ref_cache = one.apply({"params": params}, x, pos, cache)
            par = Attention(8, 2, h, spec, RopeConfig(theta=10000.0), qk_norm=qk_norm, mesh=mesh)
            columns = {"o_proj": ("tensor", None)}  # the rest column-parallel
            sharded = {name: {"kernel": shard(p["kernel"], *columns.get(name, (None, "tensor")))}
                       if "kernel" in p else p for name, p in params.items()}  # fmt: skip
            pool = (None, None, "tensor", None)
            par_cache = cache._replace(k_pages=shard(cache.k_pages, *pool), v_pages=shard(cache.v_pages, *pool))
            step = jax.jit(lambda p, x, c, m=par, pos=pos: m.apply({"params": p}, x, pos, c))
            out, out_cache = step(sharded, x, par_cache)
            what = f"paged Pallas attention, tensor=2, H={h}, decode={decode}"
            assert "shard_map" in str(jax.make_jaxpr(step)(sharded, x, par_cache)), what
            assert len(out_cache.k_pages.sharding.device_set) == 2, what
            _close(out, ref, what)
            _close(out_cache.k_pages, ref_cache.k_pages, what + " k pool")
            _close(out_cache.v_pages, ref_cache.v_pages, what + " v pool")


def test_two_process_expert_parallel_on_cpu():
    """Multi-host in miniature: two processes joined by `jax.distributed.initialize()` (one CPU
    device each, gloo collectives), experts split across them, output equal to one device."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    code = ("import sys; from tests.test_parallel import _multihost_worker; "
            "_multihost_worker(int(sys.argv[1]), int(sys.argv[2]))")
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(i), str(port)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, out[-4000:]
        assert f"process {i} of 2: expert-parallel equals one device" in out


def _multihost_worker(process_id: int, port: int):
    """One of the two processes of `test_two_process_expert_parallel_on_cpu`."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    from jax.sharding import NamedSharding

    from mobajax.models.moe import expert_parallel_experts, run_experts

    assert jax.device_count() == 2 and jax.local_device_count() == 1
    mesh = make_mesh(expert=jax.device_count())
    rng = np.random.default_rng(0)  # same seed: every process holds the same global arrays
    x = rng.standard_normal((12, 16)).astype(np.float32)
    experts = rng.integers(0, 4, (12, 2)).astype(np.int32)
    weights = rng.random((12, 2)).astype(np.float32)
    gate, up = (rng.standard_normal((4, 16, 32)).astype(np.float32) / 4 for _ in range(2))
    down = rng.standard_normal((4, 32, 16)).astype(np.float32) / 6
    args = (x, weights, experts, gate, up, down)
    ref = np.asarray(run_experts(*(jnp.asarray(a) for a in args)))

    def put(a, spec):
        return jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda index: a[index])

    specs = (P(), P(), P(), P("expert"), P("expert"), P("expert"))
    run = jax.jit(lambda *a: expert_parallel_experts(*a, mesh=mesh), out_shardings=NamedSharding(mesh, P()))
    out = np.asarray(run(*(put(a, s) for a, s in zip(args, specs))).addressable_data(0))
    _close(out, ref, f"process {process_id}")
    print(f"process {process_id} of 2: expert-parallel equals one device")
