"""The model runner's page pool: copy-on-write copies a page's keys, values and key sums."""

import jax.numpy as jnp
import numpy as np

from mobajax.serving.model_runner import _copy_pages


def test_copy_pages_copies_keys_values_and_key_sums():
    rng = np.random.default_rng(0)
    k, v = (jnp.asarray(rng.standard_normal((6, 4, 2, 8)), jnp.float32) for _ in range(2))
    sums = jnp.asarray(rng.standard_normal((6, 2, 8)), jnp.float32)
    pools = ((k, v, sums), (v, k, None))  # a MoBA layer, then a full-attention layer
    (k1, v1, s1), (k2, v2, s2) = _copy_pages(pools, jnp.array([1, 4, 0]), jnp.array([3, 0, -1]))
    for new, old in ((k1, k), (v1, v), (s1, sums), (k2, v), (v2, k)):
        np.testing.assert_array_equal(new, np.asarray(old)[[4, 1, 2, 1, 4, 5]])
    assert s2 is None

