"""Offline text generation with a KV cache, and its CLI.

    python -m mobajax.generate --model PATH --prompt TEXT [--chat] [--max-tokens N] [--temperature T]

Greedy by default; streams text as it is generated. `--chat` wraps the prompt in the model's
chat template. The two steps are small jitted functions: `prefill` (the whole prompt, padded to a
power-of-two bucket so prompt lengths share compilations) and `decode_one_token`.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from mobajax.attention import KVCache, init_kv_cache
from mobajax.models import Pretrained, load_pretrained
from mobajax.models.convert import DTYPES
from mobajax.models.moba_args import add_moba_arguments, moba_from_args


def _bucket(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def prefill(module, params, tokens: jax.Array, positions: jax.Array, caches: tuple[KVCache, ...], last: jax.Array):
    """tokens/positions [1, T_bucket] (padding at position -1) -> (logits [V] at index `last`, caches)."""
    logits, caches = module.apply({"params": params}, tokens, positions, caches)
    return logits[0, last], caches


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def decode_one_token(module, params, token: jax.Array, position: jax.Array, caches: tuple[KVCache, ...]):
    """token/position [1, 1] -> (logits [V], caches)."""
    logits, caches = module.apply({"params": params}, token, position, caches)
    return logits[0, -1], caches


@jax.jit
def sample(logits: jax.Array, temperature: jax.Array, key: jax.Array) -> jax.Array:
    """Greedy when temperature == 0, else a draw from softmax(logits / temperature)."""
    drawn = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
    return jnp.where(temperature == 0.0, jnp.argmax(logits), drawn).astype(jnp.int32)


def generate_tokens(
    pretrained: Pretrained,
    prompt: list[int],
    *,
    max_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    stop_ids: tuple[int, ...] | None = None,
) -> Iterator[int]:
    """Yield up to `max_tokens` new token ids after `prompt`, stopping after a stop id."""
    config = pretrained.config
    if not prompt:
        raise ValueError("the prompt is empty: it must hold at least one token")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    total = len(prompt) + max_tokens
    if total > config.max_position_embeddings:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
            f"maximum length {config.max_position_embeddings}"
        )
    stop_ids = set(config.eos_token_ids if stop_ids is None else stop_ids)
    dtype = DTYPES[pretrained.dtype]
    caches = init_kv_cache(config.num_layers, 1, _bucket(total), config.num_kv_heads, config.head_dim, dtype)
    width = _bucket(len(prompt))
    tokens = np.zeros((1, width), np.int32)
    tokens[0, : len(prompt)] = prompt
    positions = np.full((1, width), -1, np.int32)
    positions[0, : len(prompt)] = np.arange(len(prompt))
    logits, caches = prefill(pretrained.module, pretrained.params, tokens, positions, caches, len(prompt) - 1)
    key = jax.random.key(seed)
    temp = jnp.float32(temperature)
    for step in range(max_tokens):
        key, sub = jax.random.split(key)
        token = int(sample(logits, temp, sub))
        yield token
        if token in stop_ids or step == max_tokens - 1:
            return
        position = np.array([[len(prompt) + step]], np.int32)
        logits, caches = decode_one_token(
            pretrained.module, pretrained.params, np.array([[token]], np.int32), position, caches
        )


def stream_text(tokenizer, token_ids: Iterator[int], skip: Callable[[int], bool]) -> Iterator[str]:
    """Incremental detokenization: yield text pieces as soon as they decode to whole characters."""
    ids: list[int] = []
    emitted = ""
    for token in token_ids:
        if skip(token):
            continue
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more bytes
            continue
        yield text[len(emitted):]
        emitted = text


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of the prompt, through the chat template (with generation prompt) if `chat`."""
    if chat:
        if not tokenizer.chat_template:
            raise ValueError("--chat needs a model whose tokenizer has a chat template; this one has none")
        messages = [{"role": "user", "content": prompt}]
        return list(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        )
    return tokenizer.encode(prompt)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mobajax.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="HF checkpoint directory, .gguf file or 'default'")
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--chat", action="store_true", help="apply the model's chat template")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens at most (>= 1)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), > 0 samples")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="params dtype")
    add_moba_arguments(parser)
    args = parser.parse_args(argv)
    args.moba = moba_from_args(parser, args)
    if args.max_tokens < 1:
        parser.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        pretrained = load_pretrained(args.model, dtype=args.dtype, moba=args.moba)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tokenizer = pretrained.tokenizer
    if tokenizer is None:
        print(f"error: {args.model} has no tokenizer; generation needs one", file=sys.stderr)
        return 2
    try:
        prompt = encode_prompt(tokenizer, args.prompt, args.chat)
        stop_ids = tuple(pretrained.config.eos_token_ids) + (
            (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
        )
        tokens = generate_tokens(
            pretrained, prompt, max_tokens=args.max_tokens, temperature=args.temperature,
            seed=args.seed, stop_ids=stop_ids,
        )
        for piece in stream_text(tokenizer, tokens, skip=lambda t: t in stop_ids):
            print(piece, end="", flush=True)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
