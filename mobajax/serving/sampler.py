"""On-device sampling with per-row parameters (vLLM semantics).

Order: penalties (repetition on prompt and output tokens, frequency and presence on output
tokens), min_tokens (stop ids masked), then greedy rows take the argmax; the others divide by
the temperature, apply top-k, top-p and min-p, and draw with a per-row key derived from the
row's seed and its generated-token count (so a seeded request samples the same tokens whatever
else is in the batch). Logprobs are of the raw model distribution (natural log).

Shape letters: S sample rows, V vocabulary, W stop ids per row, L logprobs per row.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

NUM_TOP_LOGPROBS = 20


class SamplingArrays(NamedTuple):
    """Per-row parameters, all [S] unless noted.

    seeds: uint32; counters: tokens generated so far (the key's step). stop_ids [S, W]: ids that
    end the sequence (EOS unless ignore_eos, plus stop_token_ids), -1 padded. counts [S, V] and
    prompt_mask [S, V]: output-token counts and prompt-token presence (only with penalties).
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    presence: jax.Array
    frequency: jax.Array
    repetition: jax.Array
    seeds: jax.Array
    counters: jax.Array
    min_tokens: jax.Array
    stop_ids: jax.Array
    counts: jax.Array | None = None
    prompt_mask: jax.Array | None = None


class Sampled(NamedTuple):
    """tokens [S] int32; logprob [S] of the sampled token; top_ids/top_logprobs [S, L] (L may be 0)."""

    tokens: jax.Array
    logprob: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def _penalize(logits: jax.Array, a: SamplingArrays) -> jax.Array:
    counts = a.counts.astype(jnp.float32)
    seen = (counts > 0) | a.prompt_mask
    rep = a.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - a.frequency[:, None] * counts - a.presence[:, None] * (counts > 0)


def _filter(logits: jax.Array, a: SamplingArrays) -> jax.Array:
    """Top-k, then top-p, then min-p, with one descending sort; filtered logits become -inf."""
    v = logits.shape[-1]
    ordered = -jnp.sort(-logits, axis=-1)
    rank = jnp.arange(v)[None, :]
    k = jnp.where(a.top_k > 0, a.top_k, v)[:, None]
    ordered = jnp.where(rank < k, ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = (rank < k) & ((before < a.top_p[:, None]) | (rank == 0))
    keep &= probs >= a.min_p[:, None] * probs[:, :1]
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def row_keys(seeds: jax.Array, counters: jax.Array) -> jax.Array:
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)


def sample(
    logits: jax.Array,
    a: SamplingArrays,
    *,
    use_filters: bool,
    use_penalties: bool,
    num_logprobs: int,
) -> Sampled:
    """logits [S, V] float32 -> Sampled. Static flags select the compiled variant."""
    logits = logits.astype(jnp.float32)
    raw = logits
    if use_penalties:
        logits = _penalize(logits, a)
    v = logits.shape[-1]
    vocab = jnp.arange(v)
    is_stop = jnp.any((a.stop_ids[:, :, None] == vocab[None, None, :]) & (a.stop_ids[:, :, None] >= 0), axis=1)
    logits = jnp.where(is_stop & (a.counters < a.min_tokens)[:, None], -jnp.inf, logits)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.where(a.temperature > 0, a.temperature, 1.0)[:, None]
    if use_filters:
        scaled = _filter(scaled, a)
    drawn = jax.vmap(jax.random.categorical)(row_keys(a.seeds, a.counters), scaled)
    tokens = jnp.where(a.temperature > 0, drawn, greedy).astype(jnp.int32)
    logprobs = jax.nn.log_softmax(raw, axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top_logprobs, top_ids = jax.lax.top_k(logprobs, num_logprobs) if num_logprobs else (
        jnp.zeros((v and logits.shape[0], 0), jnp.float32), jnp.zeros((logits.shape[0], 0), jnp.int32)
    )
    return Sampled(tokens, chosen, top_ids.astype(jnp.int32), top_logprobs)


def stops(tokens: jax.Array, a: SamplingArrays) -> jax.Array:
    """[S] bool: the sampled token ends its sequence (a stop id once min_tokens are generated)."""
    hit = jnp.any((a.stop_ids == tokens[:, None]) & (a.stop_ids >= 0), axis=-1)
    return hit & (a.counters + 1 >= a.min_tokens)
