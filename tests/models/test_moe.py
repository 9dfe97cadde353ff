"""MoE models: parity with transformers (Mixtral, Qwen2-MoE, Qwen3-MoE), the router and the MoE
block against naive maths (single expert, forced routing, dynamic routing), fused/per-expert
checkpoint storage and the errors naming missing expert tensors."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mobajax.generate import generate_tokens
from mobajax.models import forward, load_pretrained
from mobajax.models.config import MoEConfig
from mobajax.models.layers import GatedMLP
from mobajax.models.moe import SparseMoE, route, route_tokens, run_experts
from tests.models.hf_checkpoints import SMALL, torch_greedy, torch_logits

RNG = np.random.RandomState(1)
TOKENS = RNG.randint(0, 128, size=(2, 29))
PROMPT = [int(t) for t in RNG.randint(0, 128, size=9)]

# name -> (config class, model class, config kwargs)
MOE_VARIANTS = {
    "mixtral": (
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        dict(num_local_experts=4, num_experts_per_tok=2),
    ),
    "qwen2_moe": (
        transformers.Qwen2MoeConfig,
        transformers.Qwen2MoeForCausalLM,
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
             mlp_only_layers=[1]),
    ),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, head_dim=32,
             num_hidden_layers=3, decoder_sparse_step=2),
    ),
}


def make_moe_checkpoint(path, variant: str, *, fused: bool = False, seed: int = 0):
    """A random tiny MoE model saved to `path`: per-expert tensors (what save_pretrained writes)
    or, with `fused`, the stacked tensors transformers 5 holds in memory. Returns the torch model."""
    config_cls, model_cls, extra = MOE_VARIANTS[variant]
    config = config_cls(**{**SMALL, **extra})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    if fused:
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return model


def _close(ours, theirs):
    assert np.abs(ours - theirs).max() <= 1e-4 * (theirs.max() - theirs.min())


@pytest.mark.parametrize("variant", sorted(MOE_VARIANTS))
def test_parity_with_transformers(tmp_path, variant):
    model = make_moe_checkpoint(tmp_path, variant)
    pretrained = load_pretrained(str(tmp_path))
    assert pretrained.config.moe is not None
    _close(forward(pretrained, TOKENS), torch_logits(model, TOKENS))
    ours = list(generate_tokens(pretrained, PROMPT, max_tokens=32, stop_ids=()))
    assert ours == torch_greedy(model, PROMPT, 32)


def test_config_fields(tmp_path):
    make_moe_checkpoint(tmp_path / "q2", "qwen2_moe")
    make_moe_checkpoint(tmp_path / "q3", "qwen3_moe")
    q2 = load_pretrained(str(tmp_path / "q2")).config
    assert (q2.moe.num_experts, q2.moe.top_k, q2.moe.intermediate_size) == (4, 2, 32)
    assert q2.moe.shared_expert_size == 48 and not q2.moe.norm_topk_prob
    assert q2.moe.layers == (True, False) and q2.qkv_bias and not q2.o_bias  # mlp_only_layers=[1]
    q3 = load_pretrained(str(tmp_path / "q3")).config
    assert q3.moe.layers == (False, True, False) and q3.moe.norm_topk_prob and q3.qk_norm  # sparse step 2
    assert q3.moe.shared_expert_size == 0


@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe"])
def test_fused_expert_tensors(tmp_path, variant):
    model = make_moe_checkpoint(tmp_path, variant, fused=True)
    from safetensors import safe_open

    with safe_open(os.path.join(tmp_path, "model.safetensors"), "np") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()
    _close(forward(load_pretrained(str(tmp_path)), TOKENS), torch_logits(model, TOKENS))


def _rewrite(path, edit):
    from safetensors.numpy import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_error_missing_expert_tensor(tmp_path):
    make_moe_checkpoint(tmp_path, "mixtral")
    _rewrite(tmp_path, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.block_sparse_moe\.experts\.3\.w2\.weight "
                                         r"\(or the fused tensors model\.layers\.1\.mlp\.experts\.down_proj\)"):
        load_pretrained(str(tmp_path))


def test_error_missing_fused_tensor_and_duplicates(tmp_path):
    make_moe_checkpoint(tmp_path / "fused", "qwen3_moe", fused=True)
    _rewrite(tmp_path / "fused", lambda t: t.pop("model.layers.1.mlp.experts.down_proj"))
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.mlp\.experts\.0\.down_proj\.weight, "
                                         r".*experts\.7\.down_proj\.weight "
                                         r"\(or the fused tensors model\.layers\.1\.mlp\.experts\.down_proj\)"):
        load_pretrained(str(tmp_path / "fused"))

    make_moe_checkpoint(tmp_path / "both", "qwen3_moe")
    extra = {"model.layers.1.mlp.experts.down_proj": np.zeros((8, 64, 32), np.float32)}
    _rewrite(tmp_path / "both", lambda t: t.update(extra))
    with pytest.raises(ValueError, match=r"both hold parameter layers_1/moe/experts/down_proj"):
        load_pretrained(str(tmp_path / "both"))


def test_error_bad_moe_config(tmp_path):
    make_moe_checkpoint(tmp_path, "qwen3_moe")
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    config["num_experts_per_tok"] = 9
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=r"num_experts_per_tok must lie in \[1, 8\], got 9"):
        load_pretrained(str(tmp_path))


# ---- router and MoE block against naive maths -------------------------------------------------


def test_router_probabilities():
    logits = jnp.asarray(RNG.standard_normal((50, 8)) * 3, jnp.float32)
    weights, experts = route(logits, 3, normalize=True)
    np.testing.assert_allclose(np.asarray(weights.sum(-1)), 1.0, rtol=1e-6)
    probs = np.asarray(jax.nn.softmax(logits))
    np.testing.assert_array_equal(np.sort(np.asarray(experts), -1), np.sort(np.argsort(-probs, -1)[:, :3], -1))
    raw, _ = route(logits, 3, normalize=False)
    np.testing.assert_allclose(np.asarray(raw), -np.sort(-probs, -1)[:, :3], rtol=1e-6)
    extreme = jnp.asarray([[1e30, -1e30, 0, 3e38], [-3e38] * 3 + [-1e30], [5e4, 5e4, 5e4, 5e4]], jnp.float32)
    for k in (1, 2, 4):
        w, e = route(extreme, k, normalize=True)
        assert np.isfinite(np.asarray(w)).all()
        np.testing.assert_allclose(np.asarray(w.sum(-1)), 1.0, rtol=1e-6)
        assert int(e[0, 0]) == 3
    w, _ = route(jnp.asarray(RNG.standard_normal((7, 1)), jnp.float32), 1, normalize=False)
    np.testing.assert_array_equal(np.asarray(w), 1.0)  # top-1 of 1: all weight on the one expert


def _moe_params(config: MoEConfig, d: int, seed: int):
    x = jnp.zeros((1, 3, d), jnp.float32)
    params = SparseMoE(config).init(jax.random.key(seed), x)["params"]
    return jax.tree.map(lambda p: p * 2.0, params)


def _naive_moe(params, x, config: MoEConfig, router_probs=None):
    """Per token, per chosen expert, in float64 numpy."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    flat = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    logits = flat @ p["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = probs / probs.sum(-1, keepdims=True) if router_probs is None else router_probs
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    out = np.zeros_like(flat)
    for n in range(flat.shape[0]):
        top = np.argsort(-probs[n], kind="stable")[: config.top_k]
        w = probs[n, top] / (probs[n, top].sum() if config.norm_topk_prob else 1.0)
        for e, weight in zip(top, w):
            ex = p["experts"]
            h = silu(flat[n] @ ex["gate_proj"][e]) * (flat[n] @ ex["up_proj"][e])
            out[n] += weight * (h @ ex["down_proj"][e])
        if config.shared_expert_size:
            s = p["shared_expert"]
            h = silu(flat[n] @ s["gate_proj"]["kernel"]) * (flat[n] @ s["up_proj"]["kernel"])
            out[n] += (h @ s["down_proj"]["kernel"]) / (1 + np.exp(-(flat[n] @ p["shared_expert_gate"]["kernel"])))
    return out.reshape(x.shape)


def test_single_expert_top1_equals_dense_mlp():
    config = MoEConfig(num_experts=1, top_k=1, intermediate_size=32)
    params = _moe_params(config, 16, 0)
    x = jnp.asarray(RNG.standard_normal((2, 5, 16)), jnp.float32)
    dense = {k: {"kernel": params["experts"][k][0]} for k in ("gate_proj", "up_proj", "down_proj")}
    expected = GatedMLP(32).apply({"params": dense}, x)
    np.testing.assert_allclose(np.asarray(SparseMoE(config).apply({"params": params}, x)), np.asarray(expected),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", [True, False])
def test_static_routing_router_forced(norm):
    """A zero router gives uniform probabilities: ties go to the lowest experts (0 .. k-1)."""
    config = MoEConfig(num_experts=6, top_k=2, intermediate_size=32, norm_topk_prob=norm)
    params = _moe_params(config, 16, 1)
    params["router"] = jnp.zeros_like(params["router"])
    x = jnp.asarray(RNG.standard_normal((1, 9, 16)), jnp.float32)
    weights, experts = route(jnp.zeros((9, 6)), 2, norm)
    np.testing.assert_array_equal(np.asarray(experts), [[0, 1]] * 9)
    np.testing.assert_allclose(np.asarray(weights), 0.5 if norm else 1 / 6, rtol=1e-6)
    ours, state = SparseMoE(config).apply({"params": params}, x, mutable=["intermediates"])
    np.testing.assert_allclose(np.asarray(ours), _naive_moe(params, x, config, np.full((9, 6), 1 / 6)),
                               rtol=1e-4, atol=1e-5)
    (chosen,) = state["intermediates"]["chosen_experts"]  # the routing, for benchmarks and analysis
    np.testing.assert_array_equal(np.asarray(chosen), [[0, 1]] * 9)


@pytest.mark.parametrize("shared", [0, 24])
@pytest.mark.parametrize("norm", [True, False])
def test_dynamic_routing(shared, norm):
    config = MoEConfig(num_experts=8, top_k=3, intermediate_size=32, norm_topk_prob=norm, shared_expert_size=shared)
    params = _moe_params(config, 16, 2)
    x = jnp.asarray(RNG.standard_normal((3, 7, 16)), jnp.float32)
    ours = SparseMoE(config).apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(ours), _naive_moe(params, x, config), rtol=1e-4, atol=1e-5)


def test_run_experts_local_slice_and_skew():
    """Experts held here are first_expert..; other assignments add 0; all tokens on one expert."""
    config = MoEConfig(num_experts=4, top_k=2, intermediate_size=32)
    ex = _moe_params(config, 16, 3)["experts"]
    w = (ex["gate_proj"], ex["up_proj"], ex["down_proj"])
    x = jnp.asarray(RNG.standard_normal((10, 16)), jnp.float32)
    experts = jnp.asarray(RNG.randint(0, 4, (10, 2)), jnp.int32)
    weights = jnp.asarray(RNG.random((10, 2)), jnp.float32)
    full = run_experts(x, weights, experts, *w)
    halves = sum(run_experts(x, weights, experts, *(a[i:i + 2] for a in w), first_expert=i) for i in (0, 2))
    np.testing.assert_allclose(np.asarray(halves), np.asarray(full), rtol=1e-5, atol=1e-6)
    one = jnp.full((10, 2), 3, jnp.int32)
    skew = run_experts(x, weights, one, *w)
    h = jax.nn.silu(x @ w[0][3]) * (x @ w[1][3])
    np.testing.assert_allclose(np.asarray(skew), np.asarray((h @ w[2][3]) * weights.sum(-1, keepdims=True)),
                               rtol=1e-5, atol=1e-5)


def test_one_token_router_is_a_two_row_float32_gemm_at_highest_precision():
    """At one token the router's [1, D] x [D, E] product runs as two rows (XLA on the GPU turns a
    one-row dot with a small matrix into a multiply + reduce) and at HIGHEST precision (no TF32)."""
    config = MoEConfig(num_experts=8, top_k=2, intermediate_size=32, norm_topk_prob=True)
    x = jnp.ones((1, 1, 64), jnp.float32)
    module = SparseMoE(config)
    params = module.init(jax.random.key(0), x)["params"]
    jaxpr = jax.make_jaxpr(lambda p, x: module.apply({"params": p}, x))(params, x)
    router = [e for e in jaxpr.eqns if e.primitive.name == "dot_general" and e.invars[1].aval.shape == (64, 8)]
    assert [e.invars[0].aval.shape for e in router] == [(2, 64)]
    assert router[0].params["precision"] == (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("impl", ["xla", "pallas", "mosaic"])
def test_kernel_impls_route_with_one_kernel(impl):
    """The kernel impls route with one `router_top_k` kernel (XLA runs `route_reference` as
    five small kernels); "xla" keeps the XLA ops, which also run on CPU."""
    x = jnp.ones((1, 3, 64), jnp.float32)
    config = MoEConfig(num_experts=8, top_k=2, intermediate_size=32, norm_topk_prob=True)
    params = SparseMoE(config).init(jax.random.key(0), x)["params"]
    module = SparseMoE(MoEConfig(num_experts=8, top_k=2, intermediate_size=32, norm_topk_prob=True, impl=impl))
    jaxpr = str(jax.make_jaxpr(lambda p, x: module.apply({"params": p}, x))(params, x))
    assert ("router_top_k" in jaxpr) == (impl != "xla")
    one = jax.make_jaxpr(lambda p, x: module.apply({"params": p}, x))(params, x[:, :1])
    router = [e for e in one.eqns if e.primitive.name == "dot_general" and e.invars[1].aval.shape == (64, 8)]
    assert [e.invars[0].aval.shape for e in router] == [(2, 64)]  # one token: a two-row GEMM


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16bit_router_logits_are_exact_float32_products(dtype):
    """A 16-bit model's router dot takes its 16-bit operands with float32 accumulation (their
    products are exact in float32) and gives the float32 logits of the same values."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((5, 64)), dtype)
    router = jnp.asarray(rng.standard_normal((64, 8)) / 8, dtype)
    jaxpr = jax.make_jaxpr(lambda x, w: route_tokens(x, w, 2, True))(x, router)
    dot = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert [e.invars[0].aval.dtype for e in dot] == [dtype] and dot[0].params["preferred_element_type"] == jnp.float32
    weights, experts = route_tokens(x, router, 2, True)
    want = np.asarray(x, np.float64) @ np.asarray(router, np.float64)
    want_w, want_e = route(jnp.asarray(want, jnp.float32), 2, True)
    np.testing.assert_array_equal(np.asarray(experts), np.asarray(want_e))
    np.testing.assert_allclose(np.asarray(weights), np.asarray(want_w), rtol=1e-6)
