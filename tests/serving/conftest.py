"""Live servers for the server tests: `python -m mobajax.serve` subprocesses on free ports.

One process per configuration, shared by a test module; each waits for /health with a bounded
timeout (model load + warm-up compilation) and is killed at the end. On failure to start, the
server's log tail is in the error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

STARTUP_TIMEOUT_S = 600
COMPILATION_CACHE = tempfile.mkdtemp(prefix="mobajax-jax-cache-")  # shared by this run's servers
API_KEY = "test-key"
MODEL_NAME = "smol"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    def __init__(self, port: int, api_key: str | None, log_path: str, proc: subprocess.Popen):
        self.url = f"http://127.0.0.1:{port}"
        self.api_key, self.log_path, self.proc = api_key, log_path, proc
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none", timeout=120,
                             max_retries=0, **kwargs)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none", timeout=300,
                                  max_retries=0)

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics by name, summed over labels; `name{label=value}` keys for labelled ones."""
        response = self.http.get("/metrics")
        assert response.status_code == 200, response.text
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                samples[sample.name] = samples.get(sample.name, 0.0) + sample.value
                for key, value in sample.labels.items():
                    if key != "model_name":
                        name = f"{sample.name}{{{key}={value}}}"
                        samples[name] = samples.get(name, 0.0) + sample.value
        return samples

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
        """Metrics once nothing runs or waits and every page is free (fails after `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
            if idle and m["mobajax:kv_cache_free_pages"] == m["mobajax:kv_cache_total_pages"]:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle after {timeout} s: {m}")
            time.sleep(0.1)

    def log_tail(self, chars: int = 4000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]


@contextlib.contextmanager
def live_server(*flags: str, api_key: str | None = None):
    port = free_port()
    log = tempfile.NamedTemporaryFile("w", prefix="mobajax-serve-", suffix=".log", delete=False)
    args = [sys.executable, "-m", "mobajax.serve", "--port", str(port), "--log-level", "warning",
            "--compilation-cache-dir", COMPILATION_CACHE, *flags]
    if api_key:
        args += ["--api-key", api_key]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    server = LiveServer(port, api_key, log.name, proc)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode} before serving:\n{server.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S} s:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        server.http.close()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
        log.close()
        os.unlink(log.name)


# A roomy pool: 64 concurrent requests fit; prefix caching on (the default); an API key.
MAX_LEN = 1024
MAIN_FLAGS = ("--served-model-name", MODEL_NAME, "--max-model-len", str(MAX_LEN), "--num-pages", "256",
              "--max-num-seqs", "64", "--max-num-batched-tokens", "512")
# A tiny pool (8 pages of 16 tokens: one full-length request) and no prefix caching.
TINY_FLAGS = ("--served-model-name", MODEL_NAME, "--max-model-len", "128", "--num-pages", "8", "--page-size", "16",
              "--max-num-seqs", "8",
              "--max-num-batched-tokens", "128", "--no-enable-prefix-caching")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(COMPILATION_CACHE, ignore_errors=True)  # one per run: left behind, they fill the disk


def pytest_collection_modifyitems(items):
    for item in items:  # tests on a live server are slow (a server starts in tens of seconds)
        if {"server", "tiny_server"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def server():
    with live_server(*MAIN_FLAGS, api_key=API_KEY) as s:
        yield s


@pytest.fixture(scope="module")
def tiny_server():
    with live_server(*TINY_FLAGS) as s:
        yield s
