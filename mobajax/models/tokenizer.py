"""Tokenizers: rebuilt from a GGUF file's metadata, or loaded from a Hugging Face directory.

A GGUF carries no `tokenizer.json`; it stores the vocabulary, merges, token types, special token
ids and chat template as metadata under llama.cpp's key names (`tokenizer.ggml.*`). We rebuild the
tokenizer llama.cpp would run with the `tokenizers` library and wrap it in
`transformers.PreTrainedTokenizerFast`, so `encode`, `decode` and `apply_chat_template` work as
for any Hugging Face checkpoint. Nothing here imports torch.

Supported `tokenizer.ggml.model` values:
- `gpt2`: byte-level BPE. The text is split by the regular expressions llama.cpp uses for the
  file's `tokenizer.ggml.pre` value (see `PRE_TOKENIZER_SPLITS`), then mapped to the byte alphabet.
- `llama`: SentencePiece-style BPE with byte fallback; merges are derived from the token scores.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# llama.cpp token types (`tokenizer.ggml.token_type`).
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

# The GPT-2 split; `pre_tokenizers.ByteLevel(use_regex=True)` applies exactly this one.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")

# llama.cpp's LLAMA3 pre-tokenizer group: Llama 3 split, whole-piece lookup, BOS by default.
_LLAMA3_GROUP = ("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "lfm2")

# `tokenizer.ggml.pre` -> the regular expressions llama.cpp splits the text with, applied one
# after the other (each splits the pieces the previous one left; matches and gaps both kept).
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": _DEFAULT,
    "gpt-2": (_GPT2,),
    "gpt2": (_GPT2,),
    "smollm": (r"\p{N}", _GPT2),
    "starcoder": (r"\p{N}", _GPT2),
    "refact": (r"\p{N}", _GPT2),
    **{name: (_LLAMA3,) for name in _LLAMA3_GROUP},
    "qwen2": (_QWEN2,),
    "deepseek-r1-qwen": (_QWEN2,),
}
# Pre-tokenizer types for which llama.cpp looks a whole piece up in the vocabulary before merging.
_IGNORE_MERGES = frozenset(_LLAMA3_GROUP)
# Pre-tokenizer types for which llama.cpp adds BOS when the file does not say.
_ADD_BOS_BY_DEFAULT = frozenset(_LLAMA3_GROUP)

SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama")

_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _require(metadata: Mapping[str, Any], key: str) -> Any:
    if key not in metadata:
        raise ValueError(f"GGUF metadata is missing the tokenizer key {key!r}")
    return metadata[key]


def _token_string(tokens: Sequence[str], key: str, metadata: Mapping[str, Any]) -> str | None:
    token_id = metadata.get(f"tokenizer.ggml.{key}")
    if token_id is None:
        return None
    if not 0 <= int(token_id) < len(tokens):
        raise ValueError(
            f"GGUF metadata tokenizer.ggml.{key} = {token_id} is outside the vocabulary "
            f"(0..{len(tokens) - 1})"
        )
    return tokens[int(token_id)]


def _byte_level_bpe(
    tokens: Sequence[str], merges: Sequence[str], pre: str
) -> Tokenizer:
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"GGUF tokenizer merge {merge!r} is not two tokens joined by a space")
        pairs.append((parts[0], parts[1]))
    try:
        bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in _IGNORE_MERGES)
    except Exception as error:  # tokenizers raises a bare Exception
        raise ValueError(f"GGUF tokenizer merges do not match its tokens: {error}") from error
    tokenizer = Tokenizer(bpe)
    splits = [
        pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in PRE_TOKENIZER_SPLITS[pre]
    ]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_merges(
    tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]
) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: best-scoring merged piece first."""
    vocab = {token: index for index, token in enumerate(tokens)}
    found = []
    for index, (piece, score, kind) in enumerate(zip(tokens, scores, types, strict=True)):
        if kind != TOKEN_NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                found.append((-float(score), vocab[left], vocab[right], index, left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _sentencepiece_bpe(
    tokens: Sequence[str], metadata: Mapping[str, Any], types: Sequence[int]
) -> Tokenizer:
    scores = _require(metadata, "tokenizer.ggml.scores")
    vocab = {token: index for index, token in enumerate(tokens)}
    unk = _token_string(tokens, "unknown_token_id", metadata)
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_sentencepiece_merges(tokens, scores, types),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def tokenizer_from_gguf_metadata(metadata: Mapping[str, Any]) -> PreTrainedTokenizerFast:
    """Rebuild the tokenizer a GGUF file describes.

    Args:
      metadata: the file's key-value metadata as Python values (strings, numbers, lists), as
        `mobajax.models.gguf_import.read_gguf_metadata` returns it.

    Raises:
      ValueError: unsupported `tokenizer.ggml.model` or `tokenizer.ggml.pre`, or a required key
        missing (named in the message).
    """
    model = _require(metadata, "tokenizer.ggml.model")
    tokens = list(_require(metadata, "tokenizer.ggml.tokens"))
    types = list(metadata.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(
            f"GGUF tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
        )
    if model == "gpt2":
        pre = metadata.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZER_SPLITS:
            raise ValueError(
                f"Unsupported GGUF tokenizer.ggml.pre {pre!r}; supported: "
                f"{', '.join(sorted(PRE_TOKENIZER_SPLITS))}"
            )
        backend = _byte_level_bpe(tokens, _require(metadata, "tokenizer.ggml.merges"), pre)
        add_bos_default = pre in _ADD_BOS_BY_DEFAULT
    elif model == "llama":
        backend = _sentencepiece_bpe(tokens, metadata, types)
        add_bos_default = True
    else:
        raise ValueError(
            f"Unsupported GGUF tokenizer.ggml.model {model!r}; supported: "
            f"{', '.join(SUPPORTED_TOKENIZER_MODELS)}"
        )
    backend.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token, kind in zip(tokens, types, strict=True)
            if kind == TOKEN_CONTROL
        ]
    )
    backend.add_tokens(
        [
            AddedToken(token, special=False, normalized=False)
            for token, kind in zip(tokens, types, strict=True)
            if kind == TOKEN_USER_DEFINED
        ]
    )
    special = {
        name: _token_string(tokens, key, metadata)
        for name, key in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
        )
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=metadata.get("tokenizer.chat_template"),
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        clean_up_tokenization_spaces=False,
        **{name: token for name, token in special.items() if token is not None},
    )


def load_hf_tokenizer(directory: str | os.PathLike[str]) -> PreTrainedTokenizerFast | None:
    """The tokenizer of a Hugging Face checkpoint directory; None if it has no tokenizer files."""
    directory = os.fspath(directory)
    if not any(os.path.isfile(os.path.join(directory, name)) for name in _HF_TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer  # imported here: it pulls in torch when installed

    return AutoTokenizer.from_pretrained(directory)
