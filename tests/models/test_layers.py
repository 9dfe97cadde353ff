"""models.layers.dot_general: a one-token input runs as a two-row dot (XLA on the GPU turns
one-row dots of small matrices into slow multiply + reduce fusions) with unchanged results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.models.layers import dense


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
