"""`mobajax.bench.moba.pass_stages` on the CPU (interpret mode): it times every stage of one token
pass, a pass as long as `moba_attention`'s (`pass_tokens`, `tile_config`)."""

import dataclasses

import jax
import jax.numpy as jnp

from mobajax.bench.moba import pass_stages
from mobajax.pallas.moba_attention import MobaConfig, pass_tokens, tile_config

SMALL = MobaConfig(block_q=16, block_k=16, gate_block_q=16)


def _qkv(s):
    ks = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(ks[0], (s, 4, 16), jnp.float32),
            *(jax.random.normal(key, (s, 2, 16), jnp.float32) for key in ks[1:]))  # fmt: skip


def test_one_pass_times_every_stage():
    q, k, v = _qkv(128)
    stages = pass_stages(q, k, v, 32, 3, SMALL, reps=1, interpret=True)
    assert stages["pass_tokens"] == 128 and stages["passes"] == 1
    # no Mosaic in interpret mode
    assert stages["finish_kernel"] == stages["partials_kernel"] == stages["gate_kernel"] == "triton"
    names = ("gate_pass_s", "work_list_s", "past_partials_s", "own_chunk_and_merge_s", "own_chunk_only_s")
    assert all(stages[name] > 0 for name in names), stages


def test_top_k_one_has_no_past_stages():
    q, k, v = _qkv(64)
    stages = pass_stages(q, k, v, 32, 1, SMALL, reps=1, interpret=True)
    assert stages["work_list_s"] == stages["past_partials_s"] == 0.0 and stages["own_chunk_only_s"] > 0


def test_the_pass_length_follows_max_partial_bytes():
    q, k, v = _qkv(128)
    # partials of 48 tokens: 48 tokens x 4 heads x 2 past slots x 16 x 4 bytes
    config = dataclasses.replace(SMALL, max_partial_bytes=48 * 4 * 2 * 16 * 4)
    assert pass_tokens(tile_config(config, 32, 16, 4), 4, 3, 16, 4) == 48
    stages = pass_stages(q, k, v, 32, 3, config, reps=1, interpret=True)
    assert stages["pass_tokens"] == 48 and stages["passes"] == 3


def test_tile_config_caps_block_k_at_the_chunk_size():
    assert tile_config(MobaConfig(block_k=64), 20, 128, 2).block_k == 32
    assert tile_config(MobaConfig(block_k=64), 4, 128, 2).block_k == 16
    assert tile_config(MobaConfig(block_k=64), 4096, 128, 2).block_k == 64
