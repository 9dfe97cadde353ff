"""OpenAI request parsing: strict types, clear messages, conversion to SamplingParams."""

import json

import pytest

from mobajax.serving.protocol import (
    ApiError,
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    Usage,
    error_body,
    parse_request,
)


def parse(model, body):
    return parse_request(model, json.dumps(body).encode() if not isinstance(body, bytes) else body)


def chat(**fields):
    return {"messages": [{"role": "user", "content": "hi"}], **fields}


def test_completion_request_to_sampling_params():
    req = parse(CompletionRequest, {
        "model": "m", "prompt": "hello", "max_tokens": 7, "temperature": 0, "top_p": 0.5, "top_k": 3,
        "min_p": 0.1, "seed": 11, "stop": "\n", "n": 2, "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "repetition_penalty": 1.2, "logprobs": 2, "min_tokens": 1, "ignore_eos": True, "stop_token_ids": [5],
    })
    p = req.to_sampling_params()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.seed, p.n) == (7, 0.0, 0.5, 3, 0.1, 11, 2)
    assert (p.stop, p.stop_token_ids, p.logprobs, p.min_tokens, p.ignore_eos) == (["\n"], [5], 2, 1, True)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.2)
    assert req.prompts() == ["hello"]


def test_completion_defaults_follow_openai():
    p = parse(CompletionRequest, {"prompt": "x"}).to_sampling_params()
    assert (p.max_tokens, p.temperature, p.top_p, p.n, p.logprobs, p.top_k) == (16, 1.0, 1.0, 1, None, 0)


@pytest.mark.parametrize("prompt, expected", [
    ("a", ["a"]), (["a", "b"], ["a", "b"]), ([1, 2, 3], [[1, 2, 3]]), ([[1], [2, 3]], [[1], [2, 3]]),
])
def test_completion_prompt_shapes(prompt, expected):
    assert parse(CompletionRequest, {"prompt": prompt}).prompts() == expected


def test_chat_request_logprobs_and_max_completion_tokens():
    req = parse(ChatCompletionRequest, chat(logprobs=True, top_logprobs=3, max_tokens=5, max_completion_tokens=9))
    p = req.to_sampling_params()
    assert (p.logprobs, p.max_tokens) == (3, 9)
    assert parse(ChatCompletionRequest, chat(logprobs=True)).to_sampling_params().logprobs == 0
    assert parse(ChatCompletionRequest, chat()).to_sampling_params().logprobs is None
    assert parse(ChatCompletionRequest, chat()).to_sampling_params().max_tokens is None  # up to the model's length


def test_chat_content_parts_are_joined():
    req = parse(ChatCompletionRequest, {"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]})
    assert req.conversation() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]


@pytest.mark.parametrize("model, body, param, message", [
    (CompletionRequest, b"{bad json", None, "malformed JSON in the request body"),
    (CompletionRequest, b"", None, "the request body is empty"),
    (CompletionRequest, b"[1, 2]", None, "the request body must be a JSON object"),
    (CompletionRequest, {}, "prompt", "'prompt' is required"),
    (CompletionRequest, {"prompt": 5}, "prompt", "prompt must be a string, a list of strings"),
    (CompletionRequest, {"prompt": []}, "prompt", "prompt is empty"),
    (CompletionRequest, {"prompt": "x", "max_tokens": "10"}, "max_tokens", "Input should be a valid integer, got '10'"),
    (CompletionRequest, {"prompt": "x", "max_tokens": 1.5}, "max_tokens", "valid integer"),
    (CompletionRequest, {"prompt": "x", "max_tokens": -1}, "max_tokens", "max_tokens must be an integer >= 1"),
    (CompletionRequest, {"prompt": "x", "max_tokens": 0}, "max_tokens", "max_tokens must be an integer >= 1"),
    (CompletionRequest, {"prompt": "x", "temperature": -0.5}, "temperature", "temperature must be >= 0, got -0.5"),
    (CompletionRequest, {"prompt": "x", "temperature": "hot"}, "temperature", "valid number, got 'hot'"),
    (CompletionRequest, {"prompt": "x", "top_p": 1.5}, "top_p", "top_p must be in (0, 1], got 1.5"),
    (CompletionRequest, {"prompt": "x", "top_p": 0}, "top_p", "top_p must be in (0, 1], got 0"),
    (CompletionRequest, {"prompt": "x", "n": 0}, "n", "n must be an integer >= 1"),
    (CompletionRequest, {"prompt": "x", "stream": "yes"}, "stream", "valid boolean"),
    (CompletionRequest, {"prompt": "x", "stop": 3}, "stop", "stop must be a string or a list of strings"),
    (CompletionRequest, {"prompt": "x", "logprobs": 21}, "logprobs", "logprobs must be in [0, 20]"),
    (CompletionRequest, {"prompt": "x", "echo": True}, "echo", "echo is not supported"),
    (CompletionRequest, {"prompt": "x", "logit_bias": {"5": 1.0}}, "logit_bias", "logit_bias is not supported"),
    (CompletionRequest, {"prompt": "x", "best_of": 3}, "best_of", "best_of must equal n"),
    (CompletionRequest, {"prompt": "x", "temprature": 0}, "temprature", "unknown parameter 'temprature'"),
    (CompletionRequest, {"prompt": "x", "seed": 2**70}, "seed", "seed must be a 64-bit signed integer"),
    (CompletionRequest, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options",
     "stream_options is only allowed when stream is true"),
    (CompletionRequest, b'{"prompt": "x", "temperature": NaN}', "temperature", "finite number"),
    (ChatCompletionRequest, {"messages": []}, "messages", "messages is empty"),
    (ChatCompletionRequest, {"messages": "hello"}, "messages", "valid array"),
    (ChatCompletionRequest, {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role",
     "Input should be 'system', 'developer', 'user', 'assistant' or 'tool', got 'robot'"),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content", "only text is supported"),
    (ChatCompletionRequest, chat(top_logprobs=2), "top_logprobs", "top_logprobs needs logprobs set to true"),
    (ChatCompletionRequest, chat(logprobs=True, top_logprobs=30), "top_logprobs", "top_logprobs must be in [0, 20]"),
    (ChatCompletionRequest, chat(max_completion_tokens=-3), "max_tokens", "max_tokens must be an integer >= 1"),
    (ChatCompletionRequest, chat(tools=[{"type": "function"}]), "tools", "tools are not supported"),
    (ChatCompletionRequest, chat(min_p=2.0), "min_p", "min_p must be in [0, 1], got 2.0"),
    (ChatCompletionRequest, chat(presence_penalty=3), "presence_penalty", "presence_penalty must be in [-2, 2]"),
])
def test_bad_requests_have_clear_messages(model, body, param, message):
    with pytest.raises(ApiError) as info:
        req = parse(model, body)
        req.to_sampling_params()
        req.prompts() if isinstance(req, CompletionRequest) else req.conversation()
    assert info.value.status == 400
    assert message in info.value.message
    assert info.value.param == param
    assert info.value.body()["error"]["message"] == info.value.message


def test_tokenize_and_detokenize_requests():
    assert parse(TokenizeRequest, {"prompt": "hi"}).prompt == "hi"
    assert parse(DetokenizeRequest, {"tokens": [1, 2]}).tokens == [1, 2]
    with pytest.raises(ApiError, match="'tokens.0': Input should be a valid integer, got 'a'"):
        parse(DetokenizeRequest, {"tokens": ["a"]})


def test_error_body_and_chunk_shapes():
    assert error_body("boom", param="x") == {
        "error": {"message": "boom", "type": "invalid_request_error", "param": "x", "code": None}}
    chunk = ChatCompletionChunk(id="c", model="m", choices=[], usage=Usage(prompt_tokens=2, completion_tokens=3,
                                                                          total_tokens=5))
    data = json.loads(chunk.model_dump_json())
    assert data["object"] == "chat.completion.chunk" and data["usage"]["total_tokens"] == 5
