"""Tokenizers rebuilt from GGUF metadata, against transformers loading the same GGUF files."""

import os

import gguf
import pytest
from transformers import AutoTokenizer

from mobajax.models.default_model import default_gguf_path
from mobajax.models.gguf_import import read_gguf_metadata
from mobajax.models.tokenizer import (
    PRE_TOKENIZER_SPLITS,
    load_hf_tokenizer,
    tokenizer_from_gguf_metadata,
)

TEXTS = [
    "Hello world!",
    "What is the capital of France?",
    "1234567890 3.14159 -42 1e-5 2024-01-02",
    "x=12345; y = x**2 // 7",
    "   leading spaces and trailing   ",
    "tabs\tand\nnew\n\nlines\r\n  indented\n\t\tdeeper",
    "multiple     spaces    between",
    "Unicode: café naïve Ünïcödé — “quotes” ‘single’ …",
    "中文字符 日本語のテキスト 한국어 텍스트",
    "Emoji 🙂🚀👍🏽 and ZWJ 👨‍👩‍👧",
    "Ελληνικά кириллица עברית العربية",
    "def f(a, b):\n    return {'k': [a, b]}  # comment\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<repo_name>x<file_sep>",
    "don't I'll we've they're it's I'M",
    "Wait . What ? Yes , no ! It 's he 's n't",
    "",
    " ",
    "\n",
    "a",
]

CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


@pytest.fixture(scope="module")
def smollm():
    """Ours and transformers' tokenizers of the built-in SmolLM2 GGUF."""
    path = default_gguf_path()
    ours = tokenizer_from_gguf_metadata(read_gguf_metadata(path))
    theirs = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return ours, theirs


def test_smollm_encode_equals_transformers(smollm):
    ours, theirs = smollm
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), repr(text)
    batch = ours(TEXTS[:4])["input_ids"]
    assert batch == theirs(TEXTS[:4])["input_ids"]


def test_smollm_special_tokens(smollm):
    ours, theirs = smollm
    assert len(ours) == len(theirs) == 49152
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, name) == getattr(theirs, name), name
        assert getattr(ours, f"{name}_id") == getattr(theirs, f"{name}_id"), name
    assert (ours.bos_token_id, ours.eos_token_id) == (1, 2)
    assert ours.encode("<|im_start|><|im_end|>") == [1, 2]
    assert ours.encode("Hi")[0] != 1  # the file says add_bos_token = false
    assert sorted(ours.all_special_tokens) == sorted(theirs.all_special_tokens)


def test_smollm_digits_split(smollm):
    ours, _ = smollm
    assert _pieces(ours, "x 2024") == ["x", "Ġ", "2", "0", "2", "4"]  # llama.cpp's smollm split
    assert ours.convert_ids_to_tokens(ours.encode(" 2024")) == ["Ġ", "2", "0", "2", "4"]


def test_smollm_decode_round_trip(smollm):
    ours, theirs = smollm
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids) == text, repr(text)
        assert ours.decode(ids) == theirs.decode(ids), repr(text)
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ours.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_smollm_chat_template_equals_transformers(smollm):
    ours, theirs = smollm
    text = ours.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    ref = theirs.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert text == ref
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nAnd of Italy?<|im_end|>" in text
    ids = ours.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True)
    ref = theirs.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True)
    assert list(ids["input_ids"] if "input_ids" in ids else ids) == list(
        ref["input_ids"] if "input_ids" in ref else ref
    )


def test_save_and_load_hf_tokenizer(smollm, tmp_path):
    ours, _ = smollm
    ours.save_pretrained(tmp_path)
    loaded = load_hf_tokenizer(tmp_path)
    for text in TEXTS:
        assert loaded.encode(text) == ours.encode(text), repr(text)
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (
        ours.bos_token, ours.eos_token, ours.pad_token,
    )  # fmt: skip
    assert loaded.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True
    ) == ours.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)


def test_load_hf_tokenizer_without_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert load_hf_tokenizer(tmp_path) is None


# ---------------------------------------------------------------- small vocabularies

_BYTE_ALPHABET = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ", "Ċ"]


def _bpe_metadata(pre, **extra):
    tokens = ["<|end|>", *_BYTE_ALPHABET, "ab", "abc", "<think>"]
    types = [3] + [1] * (len(tokens) - 2) + [4]
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": ["a b"],  # "abc" is in the vocabulary but no merge makes it
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
    }
    return metadata | extra


def _pieces(tokenizer, text):
    return [piece for piece, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]


@pytest.mark.parametrize(
    "pre,text,expected",
    [
        ("gpt-2", "x 12345 don't", ["x", "Ġ12345", "Ġdon", "'t"]),
        ("smollm", "x 12345", ["x", "Ġ", "1", "2", "3", "4", "5"]),
        ("llama-bpe", "x 12345 DON'T", ["x", "Ġ", "123", "45", "ĠDON", "'T"]),
        ("llama-bpe", "a\n\n  b", ["a", "ĊĊ", "Ġ", "Ġb"]),
        ("qwen2", "x 12345", ["x", "Ġ", "1", "2", "3", "4", "5"]),
        ("default", "x 12345 a+=b", ["x", "Ġ", "123", "45", "Ġa", "+=", "b"]),
    ],
)
def test_pre_tokenizer_splits(pre, text, expected):
    tokenizer = tokenizer_from_gguf_metadata(_bpe_metadata(pre))
    assert _pieces(tokenizer, text) == expected


def test_llama3_ignore_merges_and_bos():
    gpt2 = tokenizer_from_gguf_metadata(_bpe_metadata("gpt-2"))
    llama3 = tokenizer_from_gguf_metadata(_bpe_metadata("llama-bpe"))
    assert gpt2.convert_ids_to_tokens(gpt2.encode("abc")) == ["ab", "c"]
    # llama.cpp looks a whole llama-bpe piece up before merging, and adds BOS unless told not to
    assert llama3.convert_ids_to_tokens(llama3.encode("abc")) == ["<|end|>", "abc"]
    no_bos = tokenizer_from_gguf_metadata(
        _bpe_metadata("llama-bpe", **{"tokenizer.ggml.add_bos_token": False})
    )
    assert no_bos.convert_ids_to_tokens(no_bos.encode("abc")) == ["abc"]


def test_added_tokens_stay_whole():
    tokenizer = tokenizer_from_gguf_metadata(_bpe_metadata("gpt-2"))
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("x<think>y<|end|>")) == [
        "x", "<think>", "y", "<|end|>",
    ]  # fmt: skip
    assert "<think>" not in tokenizer.all_special_tokens
    assert "<|end|>" in tokenizer.all_special_tokens


def test_sentencepiece_equals_transformers(tmp_path):
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    types, scores = [2, 3, 3] + [6] * 256, [0.0] * len(tokens)
    pieces = "▁ h e l o w r d ▁h he ll llo ▁hello ▁w or ▁wor ▁world ld lo el hel a ▁a n an ▁an"
    for rank, piece in enumerate(pieces.split()):
        tokens.append(piece)
        types.append(1)
        scores.append(-float(rank))
    tokens.append("<tool>")
    types.append(4)
    scores.append(0.0)
    writer = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    writer.add_string("tokenizer.ggml.model", "llama")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.scores", scores)
    writer.add_array("tokenizer.ggml.token_type", types)
    for key, value in (("bos_token_id", 1), ("eos_token_id", 2), ("unknown_token_id", 0)):
        writer.add_uint32(f"tokenizer.ggml.{key}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = tokenizer_from_gguf_metadata(read_gguf_metadata(tmp_path / "spm.gguf"))
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    texts = ["hello world", "hello  world", " hello", "héllo wörld 中", "an ananas", "",
             "<s>hello</s>", "a\nb", "<tool> x", "hello<tool>"]  # fmt: skip
    for text in texts:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), repr(text)
        assert ours.decode(ids) == theirs.decode(ids), repr(text)
    assert ours.encode("hello")[0] == 1  # SentencePiece vocabularies add BOS by default
    pieces = ours.convert_ids_to_tokens(ours.encode("hello world"))
    assert pieces == ["<s>", "▁h", "e", "llo", "▁world"]
    assert ours.decode(ours.encode("héllo wörld 中"), skip_special_tokens=True) == "héllo wörld 中"


# ---------------------------------------------------------------- errors


def test_error_unsupported_model():
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model 'bert'; supported: gpt2, llama"):
        tokenizer_from_gguf_metadata(_bpe_metadata("gpt-2", **{"tokenizer.ggml.model": "bert"}))


def test_error_unsupported_pre():
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.pre 'tekken'; supported: .*smollm"):
        tokenizer_from_gguf_metadata(_bpe_metadata("tekken"))
    assert {"smollm", "default", "gpt2", "gpt-2", "llama-bpe", "qwen2"} <= set(PRE_TOKENIZER_SPLITS)


def test_error_missing_keys():
    metadata = _bpe_metadata("gpt-2")
    del metadata["tokenizer.ggml.tokens"]
    with pytest.raises(ValueError, match=r"missing the tokenizer key 'tokenizer\.ggml\.tokens'"):
        tokenizer_from_gguf_metadata(metadata)
    metadata = _bpe_metadata("gpt-2", **{"tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match=r"missing the tokenizer key 'tokenizer\.ggml\.scores'"):
        tokenizer_from_gguf_metadata(metadata)


def test_error_bad_ids_and_merges():
    with pytest.raises(ValueError, match=r"eos_token_id = 999 is outside the vocabulary"):
        tokenizer_from_gguf_metadata(
            _bpe_metadata("gpt-2", **{"tokenizer.ggml.eos_token_id": 999})
        )
    with pytest.raises(ValueError, match=r"merges do not match its tokens"):
        tokenizer_from_gguf_metadata(_bpe_metadata("gpt-2", **{"tokenizer.ggml.merges": ["x y"]}))
