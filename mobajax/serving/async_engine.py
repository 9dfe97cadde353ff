"""AsyncEngine: the LLMEngine stepped by a background thread, with asyncio streams per request.

Only the engine thread touches the engine: the event loop validates a request (pure), then posts
"add" and "abort" commands to the thread's inbox, and reads a stats snapshot the thread refreshes
after every step, so HTTP handling never waits for a step (or a compilation). The engine thread
hands each RequestOutput to the request's asyncio queue. `generate()` is an async generator:
leaving it early (the client disconnected, the task was cancelled) aborts the request and frees
its pages.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

from mobajax.models.config import MobaConfig
from mobajax.serving.config import EngineConfig
from mobajax.serving.engine import LLMEngine
from mobajax.serving.outputs import EngineStats, RequestOutput
from mobajax.serving.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """A step failed; the request it belonged to cannot complete."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._stats = engine.stats()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None

    @classmethod
    def from_pretrained(
        cls,
        model: str = "default",
        engine_config: EngineConfig = EngineConfig(),
        served_model_name: str | None = None,
        moba: MobaConfig | None = None,
    ) -> AsyncEngine:
        engine = LLMEngine.from_pretrained(model, engine_config, moba=moba)
        if engine_config.warmup:
            engine.warmup()
        return cls(engine, served_model_name or model)

    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mobajax-engine", daemon=True)
            self._thread.start()

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, items = stream
            loop.call_soon_threadsafe(items.put_nowait, item)

    def _post(self, command: Callable[[], None]) -> None:
        self._inbox.put(command)
        self._wake.set()

    def _drain_inbox(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            command()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._drain_inbox()
            self._stats = self.engine.stats()
            outputs = []
            if self.engine.has_unfinished_requests():
                try:
                    outputs = self.engine.step()
                except Exception as err:  # a bug must not take the server down: fail those requests
                    log.exception("engine step failed")
                    for request_id in list(self.engine.requests):
                        self.engine.abort_request(request_id)
                        self._deliver(request_id, EngineDeadError(f"engine step failed: {err}"))
            else:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
            self._stats = self.engine.stats()
            for output in outputs:
                self._deliver(output.request_id, output)

    def _add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None) -> None:
        try:
            self.engine.add_request(request_id, prompt_token_ids, params, prompt)
        except ValueError as err:
            self._deliver(request_id, err)

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, prompt: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request, the last with finished=True.

        Raises ValueError at the first iteration if the request is invalid (nothing is queued).
        """
        self.engine.validate_request(prompt_token_ids, params)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._post(lambda: self._add(request_id, prompt_token_ids, params, prompt))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._post(lambda: self.engine.abort_request(request_id))

    def stats(self) -> EngineStats:
        """The snapshot taken after the engine thread's last step."""
        return self._stats

    def num_free_pages(self) -> int:
        return self.stats().num_free_pages
