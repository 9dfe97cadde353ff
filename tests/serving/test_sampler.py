"""The on-device sampler against direct computations on small logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobajax.serving.sampler import SamplingArrays, sample, stops

V = 6


def arrays(rows, **overrides) -> SamplingArrays:
    base = dict(
        temperature=np.ones(rows, np.float32), top_k=np.zeros(rows, np.int32), top_p=np.ones(rows, np.float32),
        min_p=np.zeros(rows, np.float32), presence=np.zeros(rows, np.float32), frequency=np.zeros(rows, np.float32),
        repetition=np.ones(rows, np.float32), seeds=np.arange(rows, dtype=np.uint32), counters=np.zeros(rows, np.int32),
        min_tokens=np.zeros(rows, np.int32), stop_ids=np.full((rows, 4), -1, np.int32),
    )
    base.update(overrides)
    return SamplingArrays(**base)


LOGITS = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.04, 0.01], np.float32))


def draw(rows, flags=None, **overrides):
    flags = flags or dict(use_filters=True, use_penalties=False, num_logprobs=0)
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (rows, V))
    return np.asarray(jax.jit(lambda l, a: sample(l, a, **flags))(logits, arrays(rows, **overrides)).tokens)


def test_temperature_one_matches_the_distribution():
    tokens = draw(20000, flags=dict(use_filters=False, use_penalties=False, num_logprobs=0))
    freq = np.bincount(tokens, minlength=V) / len(tokens)
    np.testing.assert_allclose(freq, np.exp(LOGITS), atol=0.015)


@pytest.mark.parametrize(
    "overrides, allowed",
    [
        (dict(top_k=np.full(4000, 2, np.int32)), {0, 1}),
        (dict(top_p=np.full(4000, 0.75, np.float32)), {0, 1, 2}),  # 0.4 + 0.3 < 0.75 -> third kept
        (dict(min_p=np.full(4000, 0.3, np.float32)), {0, 1, 2}),  # p >= 0.3 * 0.4
        (dict(top_p=np.full(4000, 1e-6, np.float32)), {0}),
    ],
)
def test_filters_keep_exactly_the_allowed_tokens(overrides, allowed):
    assert set(np.unique(draw(4000, **overrides))) == allowed


def test_greedy_rows_ignore_randomness_and_filters():
    tokens = draw(64, temperature=np.zeros(64, np.float32), top_k=np.full(64, 3, np.int32))
    assert np.all(tokens == 0)


def test_seed_and_counter_determine_the_draw():
    a = draw(8, seeds=np.full(8, 7, np.uint32))
    assert len(set(a.tolist())) == 1  # same seed and counter in every row
    b = draw(8, seeds=np.full(8, 7, np.uint32), counters=np.arange(8, dtype=np.int32))
    assert len(set(b.tolist())) > 1


def test_penalties_and_min_tokens():
    flags = dict(use_filters=False, use_penalties=True, num_logprobs=0)
    counts = np.zeros((3, V), np.int32)
    counts[:, 0] = 2
    prompt_mask = np.zeros((3, V), bool)
    greedy = dict(temperature=np.zeros(3, np.float32), counts=counts, prompt_mask=prompt_mask)
    # frequency penalty 0.2 * 2 pushes token 0 (log 0.4) below token 1 (log 0.3)
    assert np.all(draw(3, flags, frequency=np.full(3, 0.2, np.float32), **greedy) == 1)
    assert np.all(draw(3, flags, presence=np.full(3, 0.2, np.float32), **greedy) == 0)  # 0.2 < log(0.4/0.3)
    assert np.all(draw(3, flags, repetition=np.full(3, 2.0, np.float32), **greedy) == 1)  # negative logit * 2
    stop = np.full((3, 4), -1, np.int32)
    stop[:, 0] = 0
    masked = draw(3, flags, stop_ids=stop, min_tokens=np.full(3, 2, np.int32), temperature=np.zeros(3, np.float32),
                  counts=np.zeros((3, V), np.int32), prompt_mask=prompt_mask)
    assert np.all(masked == 1)
    hit = np.asarray(stops(jnp.array([0, 0, 1]), arrays(3, stop_ids=stop, counters=np.array([1, 0, 5], np.int32),
                                                            min_tokens=np.array([2, 2, 0], np.int32))))
    assert hit.tolist() == [True, False, False]


def test_logprobs_of_the_raw_distribution():
    logits = jnp.broadcast_to(jnp.asarray(LOGITS * 3), (2, V))
    a = arrays(2, temperature=np.array([0.0, 0.5], np.float32))
    out = jax.jit(lambda l, a: sample(l, a, use_filters=False, use_penalties=False, num_logprobs=3))(logits, a)
    raw = jax.nn.log_softmax(logits[0])
    np.testing.assert_allclose(np.asarray(out.top_logprobs[0]), np.asarray(raw[:3]), atol=1e-6)
    assert out.top_ids[0].tolist() == [0, 1, 2]
    np.testing.assert_allclose(float(out.logprob[0]), float(raw[0]), atol=1e-6)
