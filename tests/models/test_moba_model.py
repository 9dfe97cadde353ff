"""MoBA in the models: config switch, hybrid layers, the same tokens through the dense and the
paged (serving) paths, training with optax, and the CLI flags."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mobajax.generate import generate_tokens, parse_args
from mobajax.models import MobaConfig, forward, load_pretrained, with_moba
from mobajax.serving.config import EngineConfig
from mobajax.serving.engine import LLMEngine
from mobajax.serving.model_runner import ModelRunner
from mobajax.serving.sampling_params import SamplingParams
from tests.models.hf_checkpoints import make_checkpoint

TOKENS = np.random.RandomState(0).randint(0, 128, size=(2, 70))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    make_checkpoint(path, "llama", tied=False, num_hidden_layers=3)
    return load_pretrained(str(path))


def test_top_k_covering_every_chunk_is_full_attention(model):
    moba = with_moba(model, MobaConfig(block_size=8, top_k=16, full_attention_layers=()))
    np.testing.assert_allclose(forward(moba, TOKENS), forward(model, TOKENS), atol=1e-5)


def test_sparse_moba_changes_logits_only_past_the_first_chunks(model):
    moba = with_moba(model, MobaConfig(block_size=8, top_k=2, full_attention_layers=()))
    full, sparse = forward(model, TOKENS), forward(moba, TOKENS)
    np.testing.assert_allclose(sparse[:, :16], full[:, :16], atol=1e-5)  # at most two chunks exist yet
    assert np.abs(sparse[:, 16:] - full[:, 16:]).max() > 1e-3


def test_hybrid_layers_and_validation(model):
    config = with_moba(model, MobaConfig(block_size=8, top_k=2, full_attention_layers=(-1,))).config
    assert config.moba.full_attention_layers == (2,)
    assert [config.attention_spec(i).moba is None for i in range(3)] == [False, False, True]
    with pytest.raises(ValueError, match=r"layers \[3\] are out of range for a model of 3 layers \(allowed: -3 .. 2\)"):
        with_moba(model, MobaConfig(8, 2, full_attention_layers=(3,)))
    with pytest.raises(ValueError, match="block_size and top_k must be >= 1"):
        MobaConfig(block_size=0)


@pytest.mark.parametrize("decode", [False, True])
def test_serving_paged_path_equals_dense_generator(model, decode):
    moba = with_moba(model, MobaConfig(block_size=8, top_k=2, full_attention_layers=(0,), decode=decode))
    prompts = [TOKENS[0, :45].tolist(), TOKENS[1, :23].tolist(), TOKENS[1, :9].tolist()]
    want = [list(generate_tokens(moba, p, max_tokens=16, stop_ids=())) for p in prompts]
    engine = LLMEngine(
        moba, EngineConfig(page_size=8, max_num_batched_tokens=16, max_num_seqs=4, warmup=False, decode_steps=4)
    )
    for i, p in enumerate(prompts):  # chunked prefill: 16-token chunks over the page pool
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert [done[str(i)].outputs[0].token_ids for i in range(3)] == want
    with pytest.raises(ValueError, match="MoBA block_size 8 must be a multiple of the page size 16"):
        LLMEngine(moba, EngineConfig(page_size=16, warmup=False))


def poison(pools, pages, rng):
    """pools with `pages` of every array (keys, values, key sums) overwritten by large garbage."""
    return jax.tree.map(lambda x: x.at[pages].set(1e4 * rng.standard_normal((len(pages), *x.shape[1:]))), pools)


@pytest.mark.parametrize("decode", [False, True])
def test_serving_page_sums_survive_reuse_prefix_hits_and_forks(model, decode):
    """Chunks of two pages (block_size 16, page_size 8) whose means come from the pool's page key
    sums. After a first round, every free page outside the prefix cache is filled with large garbage
    (keys, values and key sums); a second round reuses those pages, hits the prefix cache and forks
    (n = 2: copy-on-write of the shared last page). Outputs equal the dense generator's and every
    cached page's key sum is the sum of its keys."""
    moba = with_moba(model, MobaConfig(block_size=16, top_k=2, full_attention_layers=(0,), decode=decode))
    config = EngineConfig(page_size=8, num_pages=24, max_model_len=96, max_num_batched_tokens=16, max_num_seqs=4,
                          warmup=False, decode_steps=4)
    engine = LLMEngine(moba, config)
    assert [k_sums is None for _, _, k_sums in engine.runner.pools] == [True, False, False]  # MoBA layers only
    c = model.config
    extra = ModelRunner.page_bytes(moba.config, 8, jnp.float32) - ModelRunner.page_bytes(c, 8, jnp.float32)
    assert extra == 2 * c.num_kv_heads * c.head_dim * 4  # float32 key sums of the two MoBA layers
    rounds = [
        [(TOKENS[0, :50].tolist(), 1), (TOKENS[1, :30].tolist(), 1)],
        [(TOKENS[0, :40].tolist() + TOKENS[1, 30:50].tolist(), 1), (TOKENS[1, 20:53].tolist(), 2)],
    ]
    rng = np.random.default_rng(0)
    for r, prompts in enumerate(rounds):
        if r:
            stale = [p for p in engine.blocks.free_pages if p not in engine.blocks.hash_of_page]
            engine.runner.pools = poison(engine.runner.pools, np.asarray(stale), rng)
        for i, (p, n) in enumerate(prompts):
            engine.add_request(f"{r}.{i}", p, SamplingParams(n=n, temperature=0, max_tokens=16, ignore_eos=True))
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o for o in engine.step() if o.finished})
        for i, (p, n) in enumerate(prompts):
            want = list(generate_tokens(moba, p, max_tokens=16, stop_ids=()))
            assert [o.token_ids for o in done[f"{r}.{i}"].outputs] == [want] * n
    assert done["1.0"].num_cached_tokens >= 32
    cached = np.asarray(list(engine.blocks.hash_of_page))
    for k_pages, _, k_sums in engine.runner.pools:
        if k_sums is not None:
            np.testing.assert_allclose(k_sums[cached], k_pages[cached].sum(axis=1), rtol=1e-5, atol=1e-5)


def test_training_moba_into_the_model_with_optax(model):
    moba = with_moba(model, MobaConfig(block_size=8, top_k=2, full_attention_layers=()))
    tokens = jnp.asarray(TOKENS)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)

    def loss_fn(params):
        logits, _ = moba.module.apply({"params": params}, tokens[:, :-1], positions[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    optimizer = optax.adam(1e-2)
    params, state = moba.params, optimizer.init(moba.params)
    step = jax.jit(lambda p, s: (lambda loss, g: (loss, *optimizer.update(g, s, p)))(*jax.value_and_grad(loss_fn)(p)))
    losses = []
    for _ in range(4):
        loss, updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_cli_flags():
    args = parse_args(["--prompt", "hi", "--attention", "moba", "--moba-block-size", "64", "--moba-top-k", "4",
                       "--moba-full-attn-layers=-2,-1", "--moba-decode"])
    assert args.moba == MobaConfig(64, 4, (-2, -1), True)
    assert parse_args(["--prompt", "hi"]).moba is None
    assert parse_args(
        ["--prompt", "hi", "--attention", "moba", "--moba-full-attn-layers", ""]
    ).moba.full_attention_layers == ()
    with pytest.raises(SystemExit):
        parse_args(["--prompt", "hi", "--attention", "moba", "--moba-full-attn-layers", "last"])
    with pytest.raises(SystemExit):
        parse_args(["--prompt", "hi", "--attention", "moba", "--moba-top-k", "0"])
