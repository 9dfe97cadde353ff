"""OpenAI API request and response models (completions, chat completions, models, tokenize).

Requests are parsed from the raw JSON body in strict mode (no "5" for 5, no 1 for true) and
reject unknown parameters, so that nothing a client sends is silently ignored. Every bad value
becomes an `ApiError` (HTTP 4xx) whose message names the parameter and what is allowed; sampling
values are checked by `SamplingParams` itself. Extensions over OpenAI's API follow vLLM's names
(top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids, ...).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mobajax.serving.outputs import CompletionOutput, Logprob, RequestOutput
from mobajax.serving.sampling_params import MAX_LOGPROBS, SamplingParams

SEED_RANGE = (-(2**63), 2**63 - 1)


class ApiError(Exception):
    """A request error, rendered as OpenAI's error JSON with this HTTP status."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.type, self.code = message, status, param, type, code

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def parse_request[M: BaseModel](model: type[M], body: bytes) -> M:
    """Validate a raw JSON body into `model`, raising ApiError with a readable message."""
    if not body.strip():
        raise ApiError("the request body is empty: send a JSON object")
    try:
        return model.model_validate_json(body)
    except ValidationError as err:
        raise _api_error(err) from None


def _api_error(err: ValidationError) -> ApiError:
    messages, params = [], []
    for e in err.errors(include_url=False):
        loc = ".".join(str(part) for part in e["loc"])
        union = _union_message(e["loc"])
        if union and len(e["loc"]) > 1 or union and e["type"] not in ("missing", "extra_forbidden"):
            if union[1] not in messages:
                params.append(union[0])
                messages.append(union[1])
            continue
        if e["type"] == "json_invalid":
            return ApiError(f"malformed JSON in the request body: {e['ctx']['error']}")
        if e["type"] == "model_type" and not loc:
            return ApiError(f"the request body must be a JSON object, got {_short(e['input'])}")
        if e["type"] == "extra_forbidden":
            messages.append(f"unknown parameter '{loc}'")
        elif e["type"] == "missing":
            messages.append(f"'{loc}' is required")
        elif e["type"] == "value_error":
            messages.append(str(e["ctx"]["error"]))
        else:
            messages.append(f"'{loc}': {e['msg']}, got {_short(e['input'])}")
        params.append(loc or None)
    return ApiError("; ".join(messages), param=params[0] if params else None)


def _union_message(loc: tuple) -> tuple[str, str] | None:
    """One clear message for a field that accepts several shapes (instead of one per shape)."""
    if loc and loc[0] == "prompt":
        return "prompt", (
            "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids"
        )
    if loc and loc[0] == "stop":
        return "stop", "stop must be a string or a list of strings"
    if len(loc) >= 4 and loc[0] == "messages" and loc[2] == "content":
        name = f"messages.{loc[1]}.content"
        return name, (
            f'{name} must be a string or a list of {{"type": "text", "text": ...}} parts (only text is supported)'
        )
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingRequest(_Request):
    """Fields shared by completions and chat completions (OpenAI's, then vLLM's extensions)."""

    model: str | None = None
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def _check_common(self) -> None:
        if self.logit_bias:
            raise ApiError("logit_bias is not supported by this server", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise ApiError("stream_options is only allowed when stream is true", param="stream_options")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ApiError(f"seed must be a 64-bit signed integer, got {self.seed}", param="seed")
        if self.n > 128:
            raise ApiError(f"n must be <= 128, got {self.n}", param="n")

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        fields = dict(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            seed=self.seed, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, stop=self.stop, stop_token_ids=self.stop_token_ids,
            max_tokens=max_tokens, min_tokens=self.min_tokens, ignore_eos=self.ignore_eos, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )
        defaults = {"temperature", "top_p", "top_k", "min_p", "repetition_penalty"}
        fields = {k: v for k, v in fields.items() if not (k in defaults and v is None)}
        try:
            return SamplingParams(**fields)
        except ValueError as err:
            name = str(err).split(" ", 1)[0]
            raise ApiError(str(err), param=name if name in fields else None) from None


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. prompt: a string, a list of strings, token ids or lists of token ids."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        if not prompts:
            raise ApiError("prompt is empty: send a string or a non-empty list", param="prompt")
        return prompts

    def to_sampling_params(self) -> SamplingParams:
        self._check_common()
        if self.echo:
            raise ApiError("echo is not supported by this server", param="echo")
        if self.suffix:
            raise ApiError("suffix is not supported by this server", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(f"best_of must equal n ({self.n}) when given, got {self.best_of}", param="best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ApiError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", param="logprobs")
        return self._sampling_params(self.max_tokens, self.logprobs)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ResponseFormat(_Request):
    type: Literal["text"]


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions. logprobs: bool; top_logprobs: alternatives per token (0-20)."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True

    def conversation(self) -> list[dict[str, str]]:
        if not self.messages:
            raise ApiError("messages is empty: send at least one message", param="messages")
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def to_sampling_params(self) -> SamplingParams:
        self._check_common()
        if self.tools:
            raise ApiError("tools are not supported by this server", param="tools")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise ApiError("top_logprobs needs logprobs set to true", param="top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise ApiError(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}",
                               param="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling_params(max_tokens, logprobs)


class TokenizeRequest(_Request):
    """POST /tokenize: either `prompt` or `messages` (through the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# Responses -------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatStreamChoice(BaseModel):
    index: int
    delta: dict[str, str]
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "mobajax"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# Engine outputs -> response pieces ---------------------------------------------------------------


def _token_text(tokenizer, token_id: int, entry: dict[int, Logprob]) -> str:
    logprob = entry.get(token_id)
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return tokenizer.decode([token_id])


def _top(tokenizer, entry: dict[int, Logprob], k: int) -> list[tuple[str, float]]:
    ranked = sorted(entry.items(), key=lambda item: -item[1].logprob)[:k]
    return [(_token_text(tokenizer, t, entry), lp.logprob) for t, lp in ranked]


def completion_choice(tokenizer, index: int, c: CompletionOutput, top_k: int | None, text_len: int = 0,
                      num_logprobs: int = 0) -> CompletionChoice:
    """The choice for the text and logprobs of `c` past `text_len` characters / `num_logprobs` tokens."""
    logprobs = None
    if top_k is not None and c.logprobs is not None:
        logprobs, offset = CompletionLogprobs(), text_len
        for token_id, entry in zip(c.token_ids[num_logprobs:], c.logprobs[num_logprobs:]):
            token = _token_text(tokenizer, token_id, entry)
            logprobs.tokens.append(token)
            logprobs.token_logprobs.append(entry[token_id].logprob if token_id in entry else None)
            logprobs.top_logprobs.append(dict(_top(tokenizer, entry, top_k)))
            logprobs.text_offset.append(offset)
            offset += len(token)
    return CompletionChoice(index=index, text=c.text[text_len:], logprobs=logprobs,
                            finish_reason=c.finish_reason, stop_reason=c.stop_reason)


def chat_logprobs(tokenizer, c: CompletionOutput, top_k: int | None, start: int = 0) -> ChatLogprobs | None:
    """Chat logprobs of the tokens of `c` from `start` on (None unless requested)."""
    if top_k is None or c.logprobs is None:
        return None
    content = []
    for token_id, entry in zip(c.token_ids[start:], c.logprobs[start:]):
        token = _token_text(tokenizer, token_id, entry)
        top = [TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in _top(tokenizer, entry, top_k)]
        logprob = entry[token_id].logprob if token_id in entry else float("-inf")
        content.append(TokenLogprob(token=token, logprob=logprob, bytes=list(token.encode()), top_logprobs=top))
    return ChatLogprobs(content=content)


def usage_of(finals: dict[int, RequestOutput]) -> Usage:
    """Token counts of the final outputs (prompt tokens once per prompt, whatever n is)."""
    prompt = sum(len(out.prompt_token_ids) for out in finals.values())
    completion = sum(len(c.token_ids) for out in finals.values() for c in out.outputs)
    cached = sum(out.num_cached_tokens for out in finals.values())
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))
