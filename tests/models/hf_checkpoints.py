"""Tiny random Hugging Face checkpoints made with transformers itself, for parity tests."""

from __future__ import annotations

import torch
import transformers

SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

# name -> (config class, model class, extra config kwargs)
VARIANTS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama3_rope": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            rope_parameters=dict(
                rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=32,
            )
        ),
    ),
    "llama_bias": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(attention_bias=True, mlp_bias=True)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=None, head_dim=24)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen2_yarn": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                  original_max_position_embeddings=64)),
    ),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=32)),
}


def make_checkpoint(path, variant: str, *, tied: bool, seed: int = 0, max_shard_size=None, **overrides):
    """Save a random tiny model of `variant` to `path`; returns the torch model (float32, eval).

    overrides: config fields replacing the SMALL defaults (e.g. vocab_size)."""
    config_cls, model_cls, extra = VARIANTS[variant]
    config = config_cls(**{**SMALL, **extra, **overrides}, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # larger-than-default weights make logits spread, so parity is meaningful
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return model


def torch_logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def torch_greedy(model, prompt, new_tokens: int) -> list[int]:
    """Greedy continuation by full forwards in torch (no eos handling: exactly `new_tokens`)."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(torch.as_tensor([tokens])).logits[0, -1]
            tokens.append(int(torch.argmax(logits)))
    return tokens[len(prompt):]
