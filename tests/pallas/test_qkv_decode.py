"""qkv_decode: the fused input norm + q/k/v projection + q/k norm + rope kernel in interpret mode
against the model's XLA path over a grid of shapes and options, the decoder wired to it, argument
errors, Triton lowering, GPU runs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.models.config import ModelConfig, RopeConfig
from mobajax.models.llama import Decoder
from mobajax.models.rope import inverse_frequencies
from mobajax.pallas import qkv_decode as qkv_module
from mobajax.pallas.qkv_decode import QkvDecodeConfig, qkv_decode, qkv_decode_reference
from tests.pallas.conftest import assert_close

F32, BF16 = jnp.float32, jnp.bfloat16
SMALL = QkvDecodeConfig(splits=2, chunk=16)


def _inputs(seed, m, d, n, k, h, dtype, *, input_norm=True, bias=False, qk_norm=False, rope=RopeConfig(theta=10000.0)):
    rng = np.random.default_rng(seed)

    def arr(shape, scale=1.0, offset=0.0):
        return jnp.asarray(offset + scale * rng.standard_normal(shape), dtype)

    inv_freq, factor = inverse_frequencies(rope, h)
    args = (arr((m, d), 3.0), jnp.asarray(rng.integers(0, 5000, m), jnp.int32), jnp.asarray(inv_freq),
            arr((d, n * h), d**-0.5), arr((d, k * h), d**-0.5), arr((d, k * h), d**-0.5))  # fmt: skip
    kw = {"eps": 1e-5, "attention_factor": factor}
    if input_norm:
        kw["norm_scale"] = arr((d,), 0.2, 1.0)
    if bias:
        kw.update(bq=arr((n * h,)), bk=arr((k * h,)), bv=arr((k * h,)))
    if qk_norm:
        kw.update(q_norm=arr((h,), 0.2, 1.0), k_norm=arr((h,), 0.2, 1.0))
    return args, kw


# (tokens, D, N, K, H, dtype, options)
CASES = [
    (1, 64, 4, 2, 32, F32, {}),
    (1, 64, 4, 2, 32, F32, {"qk_norm": True}),
    (3, 128, 8, 2, 64, F32, {"bias": True}),
    (16, 32, 2, 2, 32, F32, {"bias": True, "qk_norm": True}),
    (5, 48, 4, 1, 32, F32, {"input_norm": False}),
    (2, 64, 4, 4, 32, F32, {"rope": RopeConfig(theta=10000.0, rope_type="yarn", factor=4.0, original_max_position_embeddings=512)}),
    (1, 128, 4, 2, 64, BF16, {"qk_norm": True}),
    (7, 64, 2, 1, 128, BF16, {"bias": True}),
]


@pytest.mark.parametrize("m,d,n,k,h,dtype,options", CASES)
def test_kernel_matches_the_xla_path(m, d, n, k, h, dtype, options):
    args, kw = _inputs(m * 10 + h, m, d, n, k, h, dtype, **options)
    got = qkv_decode(*args, **kw, config=SMALL, interpret=True)
    want = qkv_decode_reference(*args, **kw)
    for name, g, w, heads in zip("qkv", got, want, (n, k, k)):
        assert g.shape == (m, heads, h) and g.dtype == dtype, name
        assert_close(g, w, dtype, name)


def test_every_head_is_its_own():
    """Permuting the weights' heads permutes the outputs: no program reads another's columns."""
    args, kw = _inputs(3, 2, 64, 4, 2, 32, F32, qk_norm=True)
    x, pos, inv_freq, wq, wk, wv = args
    perm = np.array([2, 0, 3, 1])
    wq_perm = wq.reshape(64, 4, 32)[:, perm].reshape(64, -1)
    q, k, v = qkv_decode(*args, **kw, config=SMALL, interpret=True)
    q2, k2, v2 = qkv_decode(x, pos, inv_freq, wq_perm, wk, wv, **kw, config=SMALL, interpret=True)
    np.testing.assert_array_equal(np.asarray(q2), np.asarray(q[:, perm]))
    np.testing.assert_array_equal(np.asarray(k2), np.asarray(k))
    np.testing.assert_array_equal(np.asarray(v2), np.asarray(v))


def _tiny_qwen3(impl: str) -> ModelConfig:
    return ModelConfig(
        architecture="Qwen3ForCausalLM", family="qwen3", vocab_size=64, hidden_size=64, intermediate_size=96,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-6, max_position_embeddings=512,
        rope=RopeConfig(theta=10000.0), qk_norm=True, qkv_bias=True, attention_impl=impl,
    )  # fmt: skip


@pytest.mark.parametrize("tokens", [1, 3])
def test_decoder_with_the_kernel_equals_the_xla_path(monkeypatch, tokens):
    """With the Pallas impl and at most 16 tokens the decoder runs `qkv_decode` (here in interpret
    mode) on the same parameters (same tree either way) and gives the XLA path's logits."""
    calls = []

    def interpreted(*args, **kw):
        calls.append(args[0].shape)
        return qkv_decode(*args, **kw, config=SMALL, interpret=True)

    monkeypatch.setattr(qkv_module, "qkv_decode", interpreted)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 64, (1, tokens)), jnp.int32)
    positions = jnp.arange(tokens, dtype=jnp.int32)[None] + 5
    xla, fused = Decoder(_tiny_qwen3("xla")), Decoder(_tiny_qwen3("pallas"))
    params = xla.init(jax.random.key(1), ids, positions)
    fused_params = fused.init(jax.random.key(1), ids, positions)
    assert jax.tree.map(jnp.shape, fused_params) == jax.tree.map(jnp.shape, params)
    assert calls, "the fused path was not taken"
    params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    want, _ = xla.apply(params, ids, positions)
    got, _ = fused.apply(params, ids, positions)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_longer_steps_keep_the_xla_path(monkeypatch):
    monkeypatch.setattr(qkv_module, "qkv_decode", lambda *a, **k: pytest.fail("qkv_decode called for 17 tokens"))
    ids = jnp.zeros((1, 17), jnp.int32)
    positions = jnp.arange(17, dtype=jnp.int32)[None]
    Decoder(_tiny_qwen3("pallas")).init(jax.random.key(0), ids, positions)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"x": jnp.zeros((17, 64))}, "1 <= M <= 16"),
        ({"inv_freq": jnp.zeros(12)}, "power of two"),
        ({"wk": jnp.zeros((64, 96))}, "wq must be"),
        ({"wq": jnp.zeros((64, 128), BF16)}, "share a dtype"),
        ({"positions": jnp.zeros(3, jnp.int32)}, "positions must be"),
        ({"bq": jnp.zeros(128)}, "bq, bk, bv"),
        ({"q_norm": jnp.ones(32)}, "q_norm and k_norm"),
        ({"norm_scale": jnp.ones(32)}, "norm_scale must be"),
    ],
)
def test_argument_errors_name_the_problem(change, message):
    args, kw = _inputs(0, 2, 64, 4, 2, 32, F32)
    named = dict(zip(("x", "positions", "inv_freq", "wq", "wk", "wv"), args), **kw)
    named.update(change)
    with pytest.raises(ValueError, match=message):
        qkv_decode(**named, interpret=True)


def test_config_checks():
    with pytest.raises(ValueError, match="chunk must be a power of two"):
        QkvDecodeConfig(chunk=24)


def test_lowers_to_triton(lower_for_gpu):
    """The default config lowers (Pallas -> Triton IR) at the Qwen3-30B-A3B shape, bf16."""
    args, kw = _inputs(0, 1, 2048, 32, 4, 128, BF16, qk_norm=True)
    assert "qkv_decode" in lower_for_gpu(qkv_decode, *args, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("m", [1, 16])
def test_gpu_matches_the_xla_path(m, dtype):
    args, kw = _inputs(m, m, 2048, 32, 4, 128, dtype, qk_norm=True, bias=True)
    got = jax.jit(functools.partial(qkv_decode, **kw))(*args)
    with jax.default_matmul_precision("highest"):
        want = qkv_decode_reference(*args, **kw)
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, dtype, name)
