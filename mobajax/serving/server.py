"""The OpenAI-compatible HTTP server: `build_app(engine)` returns a FastAPI app.

Routes: /v1/completions, /v1/chat/completions (SSE streaming with `data: {...}` events and a
final `data: [DONE]`), /v1/models, /health, /metrics (Prometheus), /tokenize, /detokenize.
Errors are OpenAI's error JSON. A client that disconnects aborts its request: streams are
closed by Starlette's disconnect listener, other requests by a watcher of `http.disconnect`,
and closing `engine.generate`'s iterator aborts the request in the engine and frees its pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mobajax.serving.metrics import ServerMetrics
from mobajax.serving.outputs import RequestOutput
from mobajax.serving.protocol import (
    ApiError,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    chat_logprobs,
    completion_choice,
    error_body,
    parse_request,
    usage_of,
)
from mobajax.serving.sampling_params import SamplingParams

OPEN_PATHS = ("/health", "/metrics")


def build_app(engine, *, api_key: str | None = None, served_model_name: str | None = None) -> FastAPI:
    """The app serving `engine` (an AsyncEngine); starts and stops the engine with the app."""
    server = _Server(engine, served_model_name or engine.model_name)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="mobajax", lifespan=lifespan)
    app.state.server = server
    if api_key is not None:
        app.add_middleware(_ApiKeyMiddleware, api_key=api_key)

    @app.exception_handler(ApiError)
    async def _api_error(_request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(err.detail), type=kind), status_code=err.status_code)

    @app.exception_handler(_ClientGone)
    async def _client_gone(_request, _err):
        return Response(status_code=499)  # nobody reads it: the request was aborted

    @app.exception_handler(Exception)
    async def _internal_error(_request, err: Exception):
        message = f"internal server error: {type(err).__name__}: {err}"
        return JSONResponse(error_body(message, type="internal_server_error"), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, err: RequestValidationError):
        return JSONResponse(error_body(str(err.errors())), status_code=400)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.completions(request, parse_request(CompletionRequest, await request.body()))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.chat(request, parse_request(ChatCompletionRequest, await request.body()))

    @app.get("/v1/models")
    async def models():
        card = ModelCard(id=server.model_name, root=engine.model_name, max_model_len=engine.max_model_len)
        return _json(ModelList(data=[card]))

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        content, media_type = await asyncio.to_thread(server.metrics.render)  # stats() may wait for a step
        return Response(content, media_type=media_type)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = parse_request(TokenizeRequest, await request.body())
        server.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError("send exactly one of 'prompt' and 'messages'")
        if req.prompt is not None:
            tokens = server.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            conversation = [{"role": m.role, "content": m.text()} for m in req.messages]
            tokens = server.chat_prompt(conversation, req.add_generation_prompt)[1]
        return {"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = parse_request(DetokenizeRequest, await request.body())
        server.check_model(req.model)
        server.check_token_ids(req.tokens, "tokens")
        return {"prompt": server.tokenizer.decode(req.tokens)}

    return app


class _ApiKeyMiddleware:
    """Pure ASGI check of `Authorization: Bearer <key>` (does not wrap streaming responses)."""

    def __init__(self, app, api_key: str):
        self.app, self._expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            header = dict(scope["headers"]).get(b"authorization")
            if header is None or not secrets.compare_digest(header, self._expected):
                message = ("missing API key: send it as 'Authorization: Bearer <key>'" if header is None
                           else "invalid API key in 'Authorization: Bearer <key>'")
                response = JSONResponse(error_body(message, code="invalid_api_key"), status_code=401)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class _ClientGone(Exception):
    pass


class _Server:
    """Request handling shared by the routes: prompts, engine calls, response building."""

    def __init__(self, engine, model_name: str):
        self.engine, self.model_name = engine, model_name
        self.tokenizer = engine.tokenizer
        self.metrics = ServerMetrics(engine.stats, model_name)

    # Validation ------------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                           status=404, param="model", type="not_found_error", code="model_not_found")

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = len(self.tokenizer)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(f"{param} holds token ids outside [0, {vocab}): {bad[:5]}", param=param)

    def check_params(self, params: SamplingParams) -> SamplingParams:
        """Bounds that depend on the model (the engine packs these into int32 arrays)."""
        self.check_token_ids(params.stop_token_ids, "stop_token_ids")
        if params.top_k >= len(self.tokenizer):
            params.top_k = 0  # keeping every token is what "off" means
        return params

    def check_length(self, ids: list[int], params: SamplingParams, param: str) -> None:
        limit = self.engine.max_model_len
        if not ids:
            raise ApiError(f"{param} is empty: it must hold at least one token", param=param)
        if len(ids) >= limit:
            raise ApiError(f"the prompt is {len(ids)} tokens long; this model's maximum length is {limit} "
                           f"tokens (prompt + output), so the prompt must be shorter", param=param)
        if params.min_tokens > limit - len(ids):
            raise ApiError(f"min_tokens ({params.min_tokens}) must be <= the {limit - len(ids)} tokens left after "
                           f"the prompt (maximum length {limit})", param="min_tokens")
        if params.max_tokens is not None and len(ids) + params.max_tokens > limit:
            raise ApiError(f"this model's maximum length is {limit} tokens, but {len(ids) + params.max_tokens} "
                           f"were requested ({len(ids)} in the prompt, {params.max_tokens} as max_tokens); "
                           f"lower max_tokens or shorten the prompt", param="max_tokens")

    def chat_prompt(self, conversation: list[dict], add_generation_prompt: bool) -> tuple[str, list[int]]:
        if not self.tokenizer.chat_template:
            raise ApiError("this model's tokenizer has no chat template; use /v1/completions")
        try:
            text = self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, tokenize=False)
        except Exception as err:  # jinja2 errors (e.g. roles must alternate) are the client's
            raise ApiError(f"the chat template rejected the messages: {err}", param="messages") from None
        return text, self.tokenizer.encode(text, add_special_tokens=False)

    # Routes ----------------------------------------------------------------------------------

    async def completions(self, request: Request, req: CompletionRequest) -> Response:
        self.check_model(req.model)
        params = self.check_params(req.to_sampling_params())
        prompts = []
        for prompt in req.prompts():
            if isinstance(prompt, str):
                prompts.append((prompt, self.tokenizer.encode(prompt)))
            else:
                self.check_token_ids(prompt, "prompt")
                prompts.append((None, list(prompt)))
        for _text, ids in prompts:
            self.check_length(ids, params, "prompt")
        request_id = f"cmpl-{uuid.uuid4().hex}"
        outputs = self._generate(request_id, prompts, params)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = self._completion_events(request_id, outputs, params, include_usage)
            return _EventStream(events)
        finals = await self._collect(request, outputs)
        choices = [completion_choice(self.tokenizer, i * params.n + c.index, c, params.logprobs)
                   for i, out in sorted(finals.items()) for c in out.outputs]
        body = CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage_of(finals))
        return _json(body)

    async def chat(self, request: Request, req: ChatCompletionRequest) -> Response:
        self.check_model(req.model)
        params = self.check_params(req.to_sampling_params())
        text, ids = self.chat_prompt(req.conversation(), req.add_generation_prompt)
        self.check_length(ids, params, "messages")
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        outputs = self._generate(request_id, [(text, ids)], params)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _EventStream(self._chat_events(request_id, outputs, params, include_usage))
        out = (await self._collect(request, outputs))[0]
        choices = [ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                              logprobs=chat_logprobs(self.tokenizer, c, params.logprobs), finish_reason=c.finish_reason,
                              stop_reason=c.stop_reason) for c in out.outputs]
        body = ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage_of({0: out}))
        return _json(body)

    # Engine calls ----------------------------------------------------------------------------

    async def _generate(self, request_id: str, prompts: list[tuple[str | None, list[int]]],
                        params: SamplingParams) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, cumulative RequestOutput) of every prompt, interleaved as they arrive."""
        ids = [request_id if len(prompts) == 1 else f"{request_id}-{i}" for i in range(len(prompts))]
        timers = [self.metrics.tracker() for _ in prompts]
        if len(prompts) == 1:
            text, tokens = prompts[0]
            try:
                async with contextlib.aclosing(self.engine.generate(tokens, params, ids[0], prompt=text)) as gen:
                    async for out in gen:
                        timers[0].observe(out)
                        yield 0, out
            except ValueError as err:
                raise ApiError(str(err)) from None
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            text, tokens = prompts[i]
            try:
                async with contextlib.aclosing(self.engine.generate(tokens, params, ids[i], prompt=text)) as gen:
                    async for out in gen:
                        timers[i].observe(out)
                        queue.put_nowait((i, out))
                queue.put_nowait((i, None))
            except Exception as err:  # handed to the consumer, which re-raises it
                queue.put_nowait((i, err))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(prompts))]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, ValueError):
                    raise ApiError(str(item))
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()  # closes each engine iterator, which aborts its request

    async def _collect(self, request: Request, outputs) -> dict[int, RequestOutput]:
        """The final output of every prompt; aborts (by cancellation) if the client disconnects."""

        async def collect() -> dict[int, RequestOutput]:
            finals = {}
            async with contextlib.aclosing(outputs):
                async for i, out in outputs:
                    finals[i] = out
            return finals

        finished, finals = await _unless_disconnected(request.receive, collect())
        if not finished:
            raise _ClientGone()
        return finals

    # Streaming -------------------------------------------------------------------------------

    async def _completion_events(self, request_id, outputs, params, include_usage) -> AsyncIterator[str]:
        created, sent, finals = int(time.time()), {}, {}
        async with contextlib.aclosing(outputs):
            try:
                async for i, out in outputs:
                    finals[i] = out
                    choices = []
                    for c in out.outputs:
                        index = i * params.n + c.index
                        text_len, num_logprobs, done = sent.get(index, (0, 0, False))
                        if done:
                            continue
                        choice = completion_choice(self.tokenizer, index, c, params.logprobs, text_len, num_logprobs)
                        if choice.text or choice.finish_reason or (choice.logprobs and choice.logprobs.tokens):
                            choices.append(choice)
                        sent[index] = (max(text_len, len(c.text)), len(c.logprobs or []), c.finished)
                    if choices:
                        yield _sse(CompletionResponse(id=request_id, created=created, model=self.model_name,
                                                      choices=choices))
                if include_usage:
                    yield _sse(CompletionResponse(id=request_id, created=created, model=self.model_name,
                                                  choices=[], usage=usage_of(finals)))
            except Exception as err:  # the status line is sent: report it as an event, as vLLM does
                yield _sse(_error_event(err))
        yield "data: [DONE]\n\n"

    async def _chat_events(self, request_id, outputs, params, include_usage) -> AsyncIterator[str]:
        created, sent, final = int(time.time()), {}, None

        def chunk(choices, usage=None) -> str:
            return _sse(ChatCompletionChunk(id=request_id, created=created, model=self.model_name,
                                            choices=choices, usage=usage))

        yield chunk([ChatStreamChoice(index=k, delta={"role": "assistant", "content": ""}) for k in range(params.n)])
        async with contextlib.aclosing(outputs):
            try:
                async for _i, final in outputs:
                    choices = []
                    for c in final.outputs:
                        text_len, num_logprobs, done = sent.get(c.index, (0, 0, False))
                        if done:
                            continue
                        delta = c.text[text_len:]
                        logprobs = chat_logprobs(self.tokenizer, c, params.logprobs, num_logprobs)
                        if delta or c.finished or (logprobs and logprobs.content):
                            choices.append(ChatStreamChoice(
                                index=c.index, delta={"content": delta} if delta else {}, logprobs=logprobs,
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason))
                        sent[c.index] = (max(text_len, len(c.text)), len(c.logprobs or []), c.finished)
                    if choices:
                        yield chunk(choices)
                if include_usage and final is not None:
                    yield chunk([], usage_of({0: final}))
            except Exception as err:  # the status line is sent: report it as an event, as vLLM does
                yield _sse(_error_event(err))
        yield "data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """SSE response that stops (closing its events, which aborts the request) on disconnect.

    Starlette's own disconnect handling relies on anyio's cancel delivery, which can starve
    when every loop iteration hands the stream a new output; an asyncio cancel cannot.
    """

    def __init__(self, events: AsyncIterator[str]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send):
        async def stream() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for event in self.body_iterator:
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await _unless_disconnected(receive, stream())
        finally:
            await self.body_iterator.aclose()


async def _unless_disconnected(receive, coro) -> tuple[bool, object]:
    """(True, result) of `coro`, or (False, None) once it was cancelled by a client disconnect."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(coro), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.wait({work})  # let it close its engine iterators (aborting the request)
    if work.cancelled():
        return False, None
    return True, work.result()


def _error_event(err: Exception) -> dict:
    if isinstance(err, ApiError):
        return err.body()
    return error_body(f"internal server error: {type(err).__name__}: {err}", type="internal_server_error")


def _json(body) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")


def _sse(payload) -> str:
    data = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"
