"""models.layers: a one-token input runs as a two-row dot (XLA on the GPU turns one-row dots of
small matrices into slow multiply + reduce fusions) with unchanged results; Attention over a page
pool with the Pallas impl (q/k/v projections of a few rows in `decode_matmul`; q/k norm, rope and
the pool write in `rope_kv_write`) equals the XLA path."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mobajax.attention
from mobajax.attention import AttentionSpec, PagedKVCache
from mobajax.models import layers
from mobajax.models.config import RopeConfig
from mobajax.models.layers import Attention, dense
from tests.test_attention import build_paged_batch


def _dot_lhs_rows(fn, *args) -> list[tuple[int, ...]]:
    jaxpr = jax.make_jaxpr(fn)(*args)
    return [e.invars[0].aval.shape for e in jaxpr.eqns if e.primitive.name == "dot_general"]


@pytest.mark.parametrize("shape,rows", [((1, 1, 64), (1, 2, 64)), ((1, 64), (2, 64)), ((3, 64), (3, 64))])
def test_one_token_runs_as_two_rows_with_the_same_result(shape, rows):
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    layer = dense(32, "proj", True, jnp.float32)
    params = layer.init(jax.random.key(0), x)
    out = layer.apply(params, x)
    assert _dot_lhs_rows(lambda p, x: layer.apply(p, x), params, x) == [rows]
    want = x @ params["params"]["kernel"] + params["params"]["bias"]
    assert out.shape == (*shape[:-1], 32)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("decode,lens_cached,lens_new", [
    (True, [5, 40, 17], [1, 1, 1]),
    (True, [40], [1]),
    (False, [0, 21], [9, 3]),  # 12 rows: still `decode_matmul`
    (False, [0, 21], [9, 13]),  # 22 rows: XLA's merged q/k/v GEMM
])
def test_paged_pallas_attention_equals_xla(monkeypatch, qk_norm, decode, lens_cached, lens_new):
    """The Pallas impl (kernels in interpret mode) projects up to 16 rows with `decode_matmul`,
    normalises, rotates and writes k/v in one `rope_kv_write` and attends like the XLA path, which
    runs the steps as XLA ops + a scatter. q/k/v biases (Qwen2) where there is no q/k norm."""
    for name in ("rope_kv_write", "decode_matmul"):
        monkeypatch.setattr(layers, name, functools.partial(getattr(layers, name), interpret=True))
    for name in ("paged_prefill", "paged_decode"):
        kernel = functools.partial(getattr(mobajax.attention, name), interpret=True)
        monkeypatch.setattr(mobajax.attention, name, kernel)
    rng = np.random.default_rng(5)
    n, kh, h, page_size = 8, 2, 32, 16
    k_pages, v_pages, meta, positions = build_paged_batch(rng, lens_cached, lens_new, page_size, 12, kh, h)
    meta = dataclasses.replace(meta, decode=decode)
    x = jnp.asarray(rng.standard_normal((1, len(positions), 64)), jnp.float32)
    pos = jnp.asarray(positions, jnp.int32)[None]
    outs, jaxprs = {}, {}
    for impl in ("xla", "pallas"):
        module = Attention(n, kh, h, AttentionSpec(impl=impl), RopeConfig(theta=10000.0), qkv_bias=not qk_norm,
                           qk_norm=qk_norm)
        cache = PagedKVCache(jnp.asarray(k_pages), jnp.asarray(v_pages), meta)
        params = module.init(jax.random.key(0), x, pos, None)
        # norm scales away from 1 and biases away from 0, so a missing one would show
        params = jax.tree.map(lambda p: p * 1.5 + 0.1 if p.ndim == 1 else p, params)
        outs[impl] = module.apply(params, x, pos, cache)
        jaxprs[impl] = str(jax.make_jaxpr(lambda p, x, c, m=module: m.apply(p, x, pos, c))(params, x, cache))
    np.testing.assert_allclose(np.asarray(outs["pallas"][0]), np.asarray(outs["xla"][0]), atol=2e-5, rtol=2e-5)
    for pool in ("k_pages", "v_pages"):
        np.testing.assert_allclose(np.asarray(getattr(outs["pallas"][1], pool)),
                                   np.asarray(getattr(outs["xla"][1], pool)), atol=2e-5, rtol=2e-5)
    assert "rope_kv_write" in jaxprs["pallas"] and "kv_write" not in jaxprs["pallas"].replace("rope_kv_write", "")
    assert "rope_kv_write" not in jaxprs["xla"]
    assert ("decode_matmul" in jaxprs["pallas"]) == (len(positions) <= 16) and "decode_matmul" not in jaxprs["xla"]


@pytest.mark.parametrize("impl,tokens,want", [
    ("pallas", 1, {"rms_norm": 1, "decode_matmul": 1, "add_rms_norm": 1}),
    ("pallas", 17, {}),
    ("xla", 1, {}),
])
def test_decoder_layer_takes_the_decode_kernels_in_the_kernels_mode(impl, tokens, want):
    """With attention_impl "pallas" a decode-sized layer's input norm is one `rms_norm` kernel, its
    o projection a `decode_matmul` left split and its residual add + post-attention norm one
    `add_rms_norm`; more tokens, or the XLA impl, keep the XLA ops."""
    from mobajax.bench.moe import qwen3_30b_config
    from mobajax.models.llama import DecoderLayer

    config = dataclasses.replace(qwen3_30b_config(1, "xla", smoke=True), attention_impl=impl)
    x = jnp.ones((1, tokens, config.hidden_size), jnp.float32)
    pos = jnp.arange(tokens, dtype=jnp.int32)[None]
    layer = DecoderLayer(config, 0)
    params = jax.eval_shape(layer.init, jax.random.key(0), x, pos, None)  # traced only: no kernel runs on CPU
    jaxpr = jax.make_jaxpr(lambda p, x: layer.apply(p, x, pos, None))(params, x)
    names = [e.params.get("name") for e in jaxpr.eqns]  # the kernels' jitted wrappers
    assert {name: names.count(name) for name in ("rms_norm", "decode_matmul", "add_rms_norm") if name in names} == want


def test_decoder_layer_kernels_equal_xla(monkeypatch):
    """A decode-sized Qwen3-MoE layer in the kernels' mode (Pallas kernels in interpret mode; the
    attention over a contiguous cache) equals the XLA impl: the split o projection reduced in
    `add_rms_norm` with the residual add is the same sum."""
    from mobajax.attention import init_kv_cache
    from mobajax.bench.moe import qwen3_30b_config
    from mobajax.models.llama import DecoderLayer

    for name in ("rms_norm", "add_rms_norm", "decode_matmul"):
        monkeypatch.setattr(layers, name, functools.partial(getattr(layers, name), interpret=True))
    base = qwen3_30b_config(1, "xla", smoke=True)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 1, base.hidden_size)), jnp.float32)
    pos = jnp.full((1, 1), 7, jnp.int32)
    params = DecoderLayer(base, 0).init(jax.random.key(1), x, pos, None)
    params = jax.tree.map(lambda p: p * 1.5 + 0.1 if p.ndim == 1 else p, params)
    outs = {}
    for impl in ("xla", "pallas"):
        config = dataclasses.replace(base, attention_impl=impl)
        cache = init_kv_cache(1, 1, 16, base.num_kv_heads, base.head_dim, jnp.float32)[0]
        outs[impl] = DecoderLayer(config, 0).apply(params, x, pos, cache)[0]
    np.testing.assert_allclose(np.asarray(outs["pallas"]), np.asarray(outs["xla"]), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("tensor", [1, 2])
def test_tensor_parallel_projections_stay_xla_gemms(tensor):
    """Over a `tensor` mesh axis of several devices (weights sharded): no `decode_matmul`, and the
    o projection comes back whole even when a split output is asked for."""
    mesh = jax.sharding.AbstractMesh((1, 1, tensor), ("data", "expert", "tensor"))
    module = Attention(8, 2, 32, AttentionSpec(impl="pallas"), RopeConfig(theta=10000.0), mesh=mesh)
    x = jnp.ones((1, 1, 64), jnp.float32)
    pos = jnp.zeros((1, 1), jnp.int32)
    params = jax.eval_shape(module.init, jax.random.key(0), x, pos, None)
    out = jax.eval_shape(lambda p: module.apply(p, x, pos, None, split_output=True)[0], params)
    jaxpr = jax.make_jaxpr(lambda p: module.apply(p, x, pos, None, split_output=True)[0])(params)
    assert isinstance(out, layers.SplitSum) == (tensor == 1)
    assert any(e.params.get("name") == "decode_matmul" for e in jaxpr.eqns) == (tensor == 1)
