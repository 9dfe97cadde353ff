"""The built-in default model (SmolLM2-135M-Instruct GGUF): answers, caching, parity with transformers."""

import os

import numpy as np
import pytest
import torch
import transformers

from mobajax.generate import encode_prompt, generate_tokens
from mobajax.models import load_pretrained
from mobajax.models.default_model import DEFAULT_MODEL_ID, default_gguf_path

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mobajax_cache")
    old = os.environ.get("MOBAJAX_CACHE")
    os.environ["MOBAJAX_CACHE"] = str(path)
    yield path
    if old is None:
        del os.environ["MOBAJAX_CACHE"]
    else:
        os.environ["MOBAJAX_CACHE"] = old


@pytest.fixture(scope="module")
def default(cache_dir):
    return load_pretrained("default")


@pytest.fixture(scope="module")
def chat_prompt(default):
    return encode_prompt(default.tokenizer, QUESTION, chat=True)


def test_answers_capital_of_france(default, chat_prompt):
    answer = default.tokenizer.decode(
        list(generate_tokens(default, chat_prompt, max_tokens=32)), skip_special_tokens=True
    )
    assert "Paris" in answer


def test_converted_once_and_cached(default, cache_dir):
    cached = cache_dir / f"{DEFAULT_MODEL_ID}-float32"
    assert (cached / "mobajax.json").is_file()
    again = load_pretrained("default")  # now restored from the Orbax cache
    assert again.config == default.config
    leaves = zip(
        np.asarray(again.params["layers_3"]["attn"]["q_proj"]["kernel"]),
        np.asarray(default.params["layers_3"]["attn"]["q_proj"]["kernel"]),
    )
    assert all(np.array_equal(a, b) for a, b in leaves)


def test_first_32_greedy_tokens_equal_transformers(default, chat_prompt):
    path = default_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    tokens = list(chat_prompt)
    with torch.no_grad():
        for _ in range(32):
            tokens.append(int(torch.argmax(model(torch.as_tensor([tokens])).logits[0, -1])))
    ours = list(generate_tokens(default, chat_prompt, max_tokens=32, stop_ids=()))
    assert ours == tokens[len(chat_prompt):]
