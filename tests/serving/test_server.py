"""`python -m mobajax.serve` against the official `openai` client: a live server process running the
default model (float32, CPU), greedy outputs compared across batching, preemption, prefix caching
and disconnects; bad input gets a 4xx with a clear message while the server keeps serving."""

import asyncio
import os

import httpx
import openai
import pytest

from mobajax.models.default_model import cache_dir
from mobajax.serve import main, parse_args
from tests.serving.conftest import COMPILATION_CACHE, MAX_LEN, MODEL_NAME

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def complete(client, prompt, ignore_eos=False, extra_body=(), **kw):
    extra_body = {"ignore_eos": ignore_eos, **dict(extra_body)}
    return client.completions.create(model=MODEL_NAME, prompt=prompt, extra_body=extra_body, **kw)


async def stream_text(server, prompt, **kw):
    """(text, finish reason) of one streamed completion (a fresh client: one per event loop)."""
    text, finish = "", None
    async with server.async_client() as client:
        stream = await client.completions.create(model=MODEL_NAME, prompt=prompt, stream=True, **kw)
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.text
                finish = choice.finish_reason or finish
    return text, finish


def test_compiled_steps_are_cached_on_disk(server):
    entries = os.listdir(COMPILATION_CACHE)  # the warm-up's step buckets take seconds each to compile
    assert any(name.startswith("jit__step") for name in entries), entries
    assert any(name.startswith("jit__decode") for name in entries), entries


def test_compilation_cache_flag():
    args, _ = parse_args([])
    assert args.compilation_cache_dir == os.path.join(cache_dir(), "jax")
    assert parse_args(["--compilation-cache-dir", ""])[0].compilation_cache_dir == ""
    assert parse_args([])[1].async_scheduling and not parse_args(["--no-async-scheduling"])[1].async_scheduling


def test_models_health_tokenize(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert models.data[0].model_extra["max_model_len"] == MAX_LEN
    assert httpx.get(f"{server.url}/health").status_code == 200  # open without the key
    tokens = server.http.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == MAX_LEN
    assert server.http.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "Hello world"}


def test_chat_uses_the_chat_template(server):
    reply = server.client().chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=24, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].message.role == "assistant" and reply.object == "chat.completion"
    counted = server.http.post("/tokenize", json={"messages": CHAT}).json()["count"]
    assert reply.usage.prompt_tokens == counted > 20  # the template adds a system prompt and role markers
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_completions_text_and_token_prompts(server):
    client = server.client()
    text = complete(client, "The capital of France is", max_tokens=8, temperature=0, ignore_eos=True)
    choice = text.choices[0]
    assert choice.finish_reason == "length" and text.usage.completion_tokens == 8 and choice.text
    ids = server.http.post("/tokenize", json={"prompt": "The capital of France is"}).json()["tokens"]
    by_ids = complete(client, ids, max_tokens=8, temperature=0, ignore_eos=True)
    assert by_ids.choices[0].text == choice.text and by_ids.usage.prompt_tokens == len(ids)
    both = complete(client, ["The capital of France is", "One, two,"], max_tokens=4, temperature=0)
    assert ([c.index for c in both.choices] == [0, 1]
            and both.choices[0].text == choice.text[: len(both.choices[0].text)])


def test_streaming_with_usage(server):
    client = server.client()
    full = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    plain = list(client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=6,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert all(c.usage is None for c in plain)  # no usage chunk unless asked for
    counted = list(client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=6,
                                             temperature=0, stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True}))
    assert counted[-1].choices == [] and counted[-1].usage.completion_tokens == 6
    assert "".join(c.choices[0].text for c in counted[:-1]) == "".join(c.choices[0].text for c in plain)
    raw = server.http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "stream": True}).text
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_stop_strings(server):
    client = server.client()
    prompt = "Write a list of fruits: apple, banana,"
    full = complete(client, prompt, max_tokens=16, temperature=0, ignore_eos=True).choices[0].text
    stop = full.split(",")[1] if full.count(",") >= 2 else full[4:8]
    expected = full[: full.index(stop)]
    cut = complete(client, prompt, max_tokens=16, temperature=0, ignore_eos=True, stop=[stop]).choices[0]
    assert (cut.text, cut.finish_reason) == (expected, "stop")
    streamed = asyncio.run(stream_text(server, prompt, max_tokens=16, temperature=0,
                                       extra_body={"ignore_eos": True}, stop=stop))
    assert streamed == (expected, "stop")


def test_seed_reproducible_regardless_of_batch(server):
    client = server.client()
    kw = dict(max_tokens=12, temperature=1.0, ignore_eos=True)
    first = complete(client, "My favourite animal is", seed=7, **kw).choices[0].text
    again = complete(client, "My favourite animal is", seed=7, **kw).choices[0].text
    other = complete(client, "My favourite animal is", seed=8, **kw).choices[0].text
    assert first == again != other

    async def batched():
        others = [stream_text(server, f"Tell me about {x}", max_tokens=12, temperature=1.0) for x in ("cats", "rain")]
        mine = stream_text(server, "My favourite animal is", seed=7, max_tokens=12, temperature=1.0,
                           extra_body={"ignore_eos": True})
        return await asyncio.gather(mine, *others)

    assert asyncio.run(batched())[0][0] == first


def test_logprobs(server):
    client = server.client()
    out = complete(client, "The capital of France is", max_tokens=6, temperature=0, ignore_eos=True, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == out.choices[0].text
    for token_logprob, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and all(v <= 0 for v in top.values())
        assert token_logprob == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the top token
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    reply = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert reply.choices[0].finish_reason == "length" and len(content) == 5
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5) for t in content)
    assert complete(client, "Hi", max_tokens=2).choices[0].logprobs is None


def test_n_completions(server):
    client = server.client()
    out = complete(client, "A short poem:", n=3, max_tokens=8, temperature=1.0, seed=3, ignore_eos=True)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == 24 and len({c.text for c in out.choices}) >= 2
    greedy = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, n=2, max_tokens=8, temperature=0)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=CHAT, n=2, max_tokens=8, temperature=0,
                                                 stream=True))
    texts = ["".join(c.delta.content or "" for chunk in chunks for c in chunk.choices if c.index == k)
             for k in (0, 1)]
    assert texts == [greedy.choices[0].message.content] * 2


def test_metrics(server):
    before = server.metrics()
    prompt_ids = server.http.post("/tokenize", json={"prompt": "Metrics, count these"}).json()["tokens"]
    complete(server.client(), prompt_ids, max_tokens=4, temperature=0, ignore_eos=True)
    after = server.metrics()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "mobajax:kv_cache_free_pages", "mobajax:kv_cache_total_pages"):
        assert name in after, name
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 4
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == len(prompt_ids)
    assert after["vllm:prefix_cache_queries_total"] > before["vllm:prefix_cache_queries_total"]
    key = "vllm:request_success_total{finished_reason=length}"
    assert after[key] - before.get(key, 0) == 1
    for name, count in (("time_to_first_token", 1), ("e2e_request_latency", 1), ("inter_token_latency", 3)):
        assert after[f"vllm:{name}_seconds_count"] - before[f"vllm:{name}_seconds_count"] == count, name
    assert 0 <= after["vllm:kv_cache_usage_perc"] <= 1
    assert after["mobajax:kv_cache_total_pages"] == 256


LONG = "hello " * (MAX_LEN + 50)
BAD_INPUTS = [
    (b"{not json", 400, "malformed JSON"),
    ({"model": MODEL_NAME, "prompt": "hi", "max_tokens": "ten"}, 400, "'max_tokens': Input should be a valid integer"),
    ({"model": MODEL_NAME, "prompt": 42}, 400, "prompt must be a string"),
    ({"model": MODEL_NAME, "prompt": "hi", "max_tokens": -5}, 400,
     "max_tokens must be an integer >= 1 or None, got -5"),
    ({"model": MODEL_NAME, "prompt": "hi", "max_tokens": 10**9}, 400,
     f"this model's maximum length is {MAX_LEN} tokens"),
    ({"model": MODEL_NAME, "prompt": "hi", "temperature": -1}, 400, "temperature must be >= 0"),
    ({"model": MODEL_NAME, "prompt": "hi", "top_p": 1.5}, 400, "top_p must be in (0, 1], got 1.5"),
    ({"model": "gpt-17", "prompt": "hi"}, 404, "the model 'gpt-17' does not exist; this server serves 'smol'"),
    ({"model": MODEL_NAME, "prompt": LONG}, 400, f"tokens long; this model's maximum length is {MAX_LEN} tokens"),
    ({"model": MODEL_NAME, "prompt": [[1, 2], [999999]]}, 400, "prompt holds token ids outside [0,"),
    ({"model": MODEL_NAME, "prompt": ""}, 400, "prompt is empty"),
    ({"model": MODEL_NAME, "prompt": "hi", "stop_token_ids": [2**40]}, 400, "stop_token_ids holds token ids outside"),
    ({"model": MODEL_NAME, "prompt": "hi", "n": 1000}, 400, "n must be <= 128, got 1000"),
    ({"model": MODEL_NAME, "prompt": "hi", "extra": 1}, 400, "unknown parameter 'extra'"),
]
BAD_CHAT = [
    ({"model": MODEL_NAME, "messages": []}, 400, "messages is empty"),
    ({"model": MODEL_NAME, "messages": "hi"}, 400, "'messages': Input should be a valid array"),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": LONG}]}, 400,
     f"this model's maximum length is {MAX_LEN}"),
    ({"model": MODEL_NAME, "messages": CHAT, "max_completion_tokens": 0}, 400, "max_tokens must be an integer >= 1"),
    ({"model": MODEL_NAME, "messages": CHAT, "min_tokens": 2**40}, 400, "min_tokens (1099511627776) must be <="),
]


@pytest.mark.parametrize("path, body, status, message",
                         [("/v1/completions", *case) for case in BAD_INPUTS]
                         + [("/v1/chat/completions", *c) for c in BAD_CHAT])
def test_bad_input_gets_a_clear_4xx(server, path, body, status, message):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = server.http.post(path, **kw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}


def test_api_key_and_client_errors(server):
    for headers, message in (({}, "missing API key"), ({"Authorization": "Bearer wrong"}, "invalid API key")):
        response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi"}, headers=headers)
        assert response.status_code == 401 and message in response.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="temperature must be >= 0"):
        complete(server.client(), "hi", temperature=-2)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client().chat.completions.create(model="nope", messages=CHAT)
    assert server.http.get("/no/such/route").status_code == 404
    # still healthy and serving
    assert server.http.get("/health").status_code == 200
    assert complete(server.client(), "Hello", max_tokens=2, temperature=0).choices[0].text
    assert complete(server.client(), "Hello", max_tokens=2, extra_body={"top_k": 2**40}).choices[0].text
    server.wait_idle()


def test_bad_requests_do_not_disturb_a_running_stream(server):
    kw = dict(max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    alone = asyncio.run(stream_text(server, "The history of Rome", **kw))

    async def mixed():
        headers = {"Authorization": f"Bearer {server.api_key}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as http:
            bad = [http.post("/v1/completions", **({"content": b} if isinstance(b, bytes) else {"json": b}))
                   for b, _status, _message in BAD_INPUTS * 2]
            return await asyncio.gather(stream_text(server, "The history of Rome", **kw), *bad)

    good, *bad = asyncio.run(mixed())
    assert good == alone
    assert [r.status_code for r in bad] == [status for _b, status, _m in BAD_INPUTS * 2]
    server.wait_idle()


def test_64_concurrent_streams_equal_sequential(server):
    prompts = [f"Question {i}: what is {i} plus {i % 7}? Answer:" for i in range(64)]
    client = server.client()
    alone = []
    for p in prompts:
        c = complete(client, p, max_tokens=6, temperature=0).choices[0]
        alone.append((c.text, c.finish_reason))

    async def together():
        return await asyncio.gather(*(stream_text(server, p, max_tokens=6, temperature=0) for p in prompts))

    assert asyncio.run(together()) == alone
    server.wait_idle()


PREFIX = "Here are the rules of the game. " + " ".join(f"Rule {i}: be kind to player {i}." for i in range(8))


def prefix_chat(client, question):
    messages = [{"role": "system", "content": PREFIX}, {"role": "user", "content": question}]
    return client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0)


QUESTIONS = ("Who wins?", "How many rules are there?", "Is it fun?")


def test_prefix_caching_hits_and_equal_outputs(server, tiny_server):
    before = server.metrics()
    cached = [prefix_chat(server.client(), q) for q in QUESTIONS]
    after = server.metrics()
    hits = after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
    assert hits >= 2 * 3 * 16  # the later two requests reuse at least 3 full pages of the shared prefix
    assert cached[0].usage.prompt_tokens_details.cached_tokens == 0
    assert all(r.usage.prompt_tokens_details.cached_tokens >= 48 for r in cached[1:])
    uncached = [prefix_chat(tiny_server.client(), q) for q in QUESTIONS]
    assert tiny_server.metrics()["vllm:prefix_cache_hits_total"] == 0
    assert [r.choices[0].message.content for r in cached] == [r.choices[0].message.content for r in uncached]


def test_tiny_pool_preempts_and_completes(tiny_server):
    prompts = [f"Story number {i} begins like this:" for i in range(5)]  # 5 x 3 pages > 8 pages
    kw = dict(max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    alone = [asyncio.run(stream_text(tiny_server, p, **kw)) for p in prompts]
    before = tiny_server.metrics()

    async def together():
        return await asyncio.gather(*(stream_text(tiny_server, p, **kw) for p in prompts))

    assert asyncio.run(together()) == alone
    after = tiny_server.wait_idle()
    assert after["vllm:num_preemptions_total"] > before["vllm:num_preemptions_total"]


LONGEST = MAX_LEN - 16  # tokens a request would generate if the disconnect did not abort it


def _disconnect_check(server, before, max_tokens):
    after = server.wait_idle(timeout=20)
    key = "vllm:request_success_total{finished_reason=abort}"
    assert after[key] - before.get(key, 0) == 1
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] < max_tokens // 2


def test_client_disconnect_mid_stream_frees_pages(server):
    before = server.wait_idle()
    body = {"prompt": "Tell me a very long story.", "max_tokens": LONGEST, "ignore_eos": True, "temperature": 0,
            "stream": True}
    with server.http.stream("POST", "/v1/completions", json=body) as response:
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: ")
            if events == 2:
                break  # leaving the block closes the connection mid-stream
    _disconnect_check(server, before, LONGEST)


def test_client_disconnect_before_a_full_response_frees_pages(server):
    before = server.wait_idle()
    body = {"prompt": "Tell me another long story.", "max_tokens": LONGEST, "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        server.http.post("/v1/completions", json=body, timeout=0.5)
    _disconnect_check(server, before, LONGEST)


@pytest.mark.parametrize("flags, message", [
    (["--num-pages", "0"], "--num-pages must be >= 1, got 0"),
    (["--page-size", "7"], "--page-size must be one of 8, 16, 32, 64, 128, got 7"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be in (0, 1], got 1.5"),
    (["--port", "70000"], "--port must be in [0, 65535], got 70000"),
    (["--max-num-seqs", "many"], "--max-num-seqs must be an integer, got 'many'"),
    (["--dtype", "int8"], "invalid choice: 'int8'"),
    (["--api-key", ""], "--api-key must not be empty"),
])
def test_bad_flags_exit_2(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(flags)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_flags_build_the_engine_config():
    args, config = parse_args(["--num-pages", "12", "--page-size", "32", "--max-model-len", "300",
                               "--no-enable-prefix-caching", "--dtype", "bfloat16"])
    assert (config.num_pages, config.page_size, config.max_model_len) == (12, 32, 300)
    assert (config.enable_prefix_caching, config.dtype, args.host, args.port) == (False, "bfloat16", "127.0.0.1", 8000)


def test_missing_model_exits_2(capsys):
    assert main(["--model", "no/such/dir", "--no-warmup"]) == 2
    assert "model path 'no/such/dir' does not exist" in capsys.readouterr().err
