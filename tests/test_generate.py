"""`python -m mobajax.generate`: streamed chat answer, sampling, and clear errors for bad flags."""

import os
import subprocess
import sys

import pytest

from mobajax.generate import generate_tokens, main, stream_text
from tests.models.hf_checkpoints import make_checkpoint


def run_cli(*args, cache=None):
    env = dict(os.environ)
    if cache is not None:
        env["MOBAJAX_CACHE"] = str(cache)
    return subprocess.run(
        [sys.executable, "-m", "mobajax.generate", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_chat_with_default_model(tmp_path_factory):
    result = run_cli("--chat", "--prompt", "What is the capital of France?", "--max-tokens", "24",
                     cache=tmp_path_factory.getbasetemp() / "cli_cache")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "<|im_end|>" not in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "hi", "--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
        (["--prompt", "hi", "--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
        (["--prompt", "hi", "--dtype", "int8"], "invalid choice: 'int8'"),
        (["--prompt", "hi", "--model", "no/such/dir"], "model path 'no/such/dir' does not exist"),
    ],
)
def test_bad_flags(args, message, capsys):
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_sampling_is_seeded_and_bounded(tmp_path):
    make_checkpoint(tmp_path, "llama", tied=False)
    from mobajax.models import load_pretrained

    model = load_pretrained(str(tmp_path))
    prompt = [5, 9, 17]
    draws = [
        list(generate_tokens(model, prompt, max_tokens=12, temperature=1.0, seed=s, stop_ids=())) for s in (1, 1, 2)
    ]
    assert draws[0] == draws[1] and draws[0] != draws[2]
    assert len(draws[0]) == 12 and all(0 <= t < 128 for t in draws[0])
    with pytest.raises(ValueError, match="exceeds the model's maximum length 256"):
        list(generate_tokens(model, prompt, max_tokens=300))
    with pytest.raises(ValueError, match="prompt is empty"):
        list(generate_tokens(model, [], max_tokens=3))


class _ByteTokenizer:
    """Decodes ids as UTF-8 bytes, so a character can span several tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_stream_text_waits_for_whole_characters():
    ids = list("é!".encode())  # é is two bytes
    pieces = list(stream_text(_ByteTokenizer(), iter(ids), skip=lambda t: False))
    assert pieces == ["é", "!"]
