"""Parity of load_pretrained/forward and KV-cached greedy generation against transformers."""

import json
import os

import numpy as np
import pytest

from mobajax.generate import generate_tokens
from mobajax.models import forward, load_pretrained, save_pretrained
from tests.models.hf_checkpoints import VARIANTS, make_checkpoint, torch_greedy, torch_logits

RNG = np.random.RandomState(0)
TOKENS = RNG.randint(0, 128, size=(2, 37))
PROMPT = [int(t) for t in RNG.randint(0, 128, size=11)]


def assert_logits_close(ours, theirs):
    spread = theirs.max() - theirs.min()
    assert np.abs(ours - theirs).max() <= 1e-4 * spread


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_with_transformers(tmp_path, variant, tied):
    model = make_checkpoint(tmp_path, variant, tied=tied)
    pretrained = load_pretrained(str(tmp_path))
    assert pretrained.config.tie_word_embeddings is tied
    assert_logits_close(forward(pretrained, TOKENS), torch_logits(model, TOKENS))
    ours = list(generate_tokens(pretrained, PROMPT, max_tokens=32, stop_ids=()))
    assert ours == torch_greedy(model, PROMPT, 32)


def test_sharded_checkpoint(tmp_path):
    model = make_checkpoint(tmp_path, "qwen3", tied=False, max_shard_size="60KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert_logits_close(forward(load_pretrained(str(tmp_path)), TOKENS), torch_logits(model, TOKENS))


def test_bfloat16_load_is_close(tmp_path):
    model = make_checkpoint(tmp_path, "llama", tied=False)
    pretrained = load_pretrained(str(tmp_path), dtype="bfloat16")
    assert pretrained.params["embed"]["embedding"].dtype.name == "bfloat16"
    ours, theirs = forward(pretrained, TOKENS), torch_logits(model, TOKENS)
    assert np.abs(ours - theirs).max() <= 0.05 * (theirs.max() - theirs.min())


def test_orbax_round_trip(tmp_path):
    make_checkpoint(tmp_path / "hf", "qwen2", tied=True)
    pretrained = load_pretrained(str(tmp_path / "hf"))
    save_pretrained(pretrained, str(tmp_path / "converted"))
    restored = load_pretrained(str(tmp_path / "converted"))
    assert restored.config == pretrained.config
    np.testing.assert_array_equal(forward(restored, TOKENS), forward(pretrained, TOKENS))
    with pytest.raises(FileExistsError, match="already holds"):
        save_pretrained(pretrained, str(tmp_path / "converted"))


def _edit_config(path, **changes):
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.update(changes)
    with open(config_path, "w") as f:
        json.dump(config, f)


def _rewrite_tensors(path, edit):
    from safetensors.numpy import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_error_unsupported_architecture(tmp_path):
    make_checkpoint(tmp_path, "llama", tied=False)
    _edit_config(tmp_path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError,
                       match=r"unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        load_pretrained(str(tmp_path))


def test_error_missing_tensor(tmp_path):
    make_checkpoint(tmp_path, "llama", tied=False)
    _rewrite_tensors(tmp_path, lambda t: t.pop("model.layers.1.self_attn.q_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.self_attn\.q_proj\.weight"):
        load_pretrained(str(tmp_path))


def test_error_unexpected_tensor(tmp_path):
    make_checkpoint(tmp_path, "llama", tied=False)
    _rewrite_tensors(tmp_path, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensors: model\.layers\.0\.mlp\.extra\.weight"):
        load_pretrained(str(tmp_path))


def test_error_shape_mismatch(tmp_path):
    make_checkpoint(tmp_path, "llama", tied=False)
    _rewrite_tensors(tmp_path, lambda t: t.update({"model.norm.weight": np.ones(65, np.float32)}))
    with pytest.raises(ValueError, match=r"tensor model\.norm\.weight has shape \(65,\), expected \(64,\)"):
        load_pretrained(str(tmp_path))


def test_error_no_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_pretrained(str(tmp_path))


def test_error_bad_path_and_dtype(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"dtype 'float16' is not supported.*bfloat16.*float32"):
        load_pretrained(str(tmp_path), dtype="float16")


def test_error_unsupported_rope(tmp_path):
    make_checkpoint(tmp_path, "llama", tied=False)
    _edit_config(tmp_path, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0})
    with pytest.raises(ValueError, match=r"rope type 'longrope' is not supported.*llama3"):
        load_pretrained(str(tmp_path))
