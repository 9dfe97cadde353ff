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



def test_fused_decode_skips_rows_whose_input_token_is_negative():
    """A chained decode feeds the previous call's last tokens; -1 marks a row that stopped there:
    it samples nothing and writes no K/V, while the other rows decode."""
    from mobajax.bench.shapes import random_pretrained
    from mobajax.serving import batch
    from mobajax.serving.model_runner import Flags, ModelRunner

    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=32, intermediate_size=64,
               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=97, rms_norm_eps=1e-5,
               max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    pre = random_pretrained(cfg, "float32")
    runner = ModelRunner(pre.module, pre.params, num_pages=8, page_size=4, max_model_len=16, dtype=jnp.float32)
    steps = 3
    slots = np.array([[0, 16], [1, 17], [2, 18]], np.int32)  # row 0 in page 0, row 1 in page 4
    page_table = np.array([[0, 1, 2, 3], [4, 5, 6, 7]], np.int32)
    arrays = batch.sampling_arrays([], 2, [], 97, Flags())
    out = runner.decode(jnp.array([5, -1], jnp.int32), np.zeros(2, np.int32), slots, page_table,
                        np.full(2, steps, np.int32), arrays, Flags(), steps)
    tokens = np.asarray(out.tokens)
    assert (tokens[:, 0] >= 0).all() and (tokens[:, 1] == -1).all()
    k_pages = np.asarray(runner.pools[0][0])
    assert np.abs(k_pages[0, :3]).sum() > 0 and np.abs(k_pages[4]).sum() == 0
