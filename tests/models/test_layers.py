"""models.layers: a one-token input of `dot_general` runs as a two-row dot (XLA on the GPU turns
one-row dots of small matrices into slow multiply + reduce fusions) with unchanged results; the
"pallas" Attention runs its q/k norms and rotations as one kernel with the XLA path's params and
results."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mobajax.models.layers
from mobajax.attention import AttentionSpec
from mobajax.models.config import RopeConfig
from mobajax.models.layers import Attention, dense


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


@pytest.mark.parametrize("qk_norm", [False, True])
def test_pallas_attention_norms_and_rotates_in_one_kernel(monkeypatch, qk_norm):
    calls = []
    kernel = mobajax.models.layers.qk_norm_rope

    def interpreted(*args, **kwargs):
        calls.append(sorted(kwargs))
        return kernel(*args, **kwargs, interpret=True)

    monkeypatch.setattr(mobajax.models.layers, "qk_norm_rope", interpreted)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 64)), jnp.float32)
    positions = jnp.asarray([[0, 1, 2], [7, 8, 9]], jnp.int32)
    module = functools.partial(Attention, 4, 2, 16, rope=RopeConfig(theta=10000.0), qk_norm=qk_norm)
    xla = module(AttentionSpec(impl="xla"))
    params = xla.init(jax.random.key(0), x, positions, None)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)  # scales != 1
    want, _ = xla.apply(params, x, positions, None)
    got, _ = module(AttentionSpec(impl="pallas")).apply(params, x, positions, None)
    assert calls == [["attention_factor", "eps"] + (["k_scale", "q_scale"] if qk_norm else [])]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
