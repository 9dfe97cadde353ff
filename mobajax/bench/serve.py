"""Online serving benchmark against a running server (like `vllm bench serve`).

    python -m mobajax.bench serve --base-url http://127.0.0.1:8000 [--num-prompts 200]
        [--input-len 512] [--output-len 128] [--range-ratio 0.0] [--request-rate inf]
        [--max-concurrency N] [--api-key KEY] [--out DIR]

Random token-id prompts (ids in PROMPT_IDS, lengths uniform in input_len * [1 - r, 1 + r]) are streamed through
/v1/completions with `ignore_eos`, arriving as a Poisson process at --request-rate (inf: all at
once), at most --max-concurrency in flight. Reports TTFT, TPOT (time per output token after the
first), ITL (gaps between streamed chunks) and end-to-end latency (mean, median, p99), request
and token throughput. Prints a table, writes serve.json and serve.png to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import time

import numpy as np

PROMPT_IDS = (1000, 5000)  # random prompt ids: ordinary tokens in any vocabulary of real size


@dataclasses.dataclass
class Result:
    ok: bool
    prompt_tokens: int
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    error: str = ""


async def one_request(client, url: str, model: str, prompt: list[int], output_len: int) -> Result:
    body = {
        "model": model, "prompt": prompt, "max_tokens": output_len, "ignore_eos": True, "temperature": 0.0,
        "stream": True, "stream_options": {"include_usage": True},
    }
    result = Result(ok=False, prompt_tokens=len(prompt))
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.e2e = time.perf_counter() - start
        result.ok = result.output_tokens > 0
    except Exception as err:  # a failed request is counted, not fatal
        result.error = repr(err)
    return result


async def run(args, prompts: list[list[int]], output_lens: list[int]) -> tuple[list[Result], float]:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency or len(prompts))
    url = args.base_url.rstrip("/") + "/v1/completions"
    gate = asyncio.Semaphore(args.max_concurrency or len(prompts))
    rng = np.random.default_rng(args.seed)
    async with httpx.AsyncClient(headers=headers, timeout=None, limits=limits) as client:

        async def gated(prompt, n):
            async with gate:
                return await one_request(client, url, args.model, prompt, n)

        tasks = []
        start = time.perf_counter()
        for prompt, n in zip(prompts, output_lens):
            tasks.append(asyncio.create_task(gated(prompt, n)))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def summarize(results: list[Result], seconds: float) -> dict:
    good = [r for r in results if r.ok]

    def stats(values) -> dict:
        values = np.asarray(values, float) * 1000.0
        if values.size == 0:
            return {"mean_ms": None, "median_ms": None, "p99_ms": None}
        return {"mean_ms": float(values.mean()), "median_ms": float(np.median(values)),
                "p99_ms": float(np.percentile(values, 99))}

    output = sum(r.output_tokens for r in good)
    return {
        "completed": len(good), "failed": len(results) - len(good),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": seconds, "request_throughput": len(good) / seconds,
        "output_throughput": output / seconds,
        "total_throughput": (output + sum(r.prompt_tokens for r in good)) / seconds,
        "ttft": stats([r.ttft for r in good]),
        "tpot": stats([(r.e2e - r.ttft) / (r.output_tokens - 1) for r in good if r.output_tokens > 1]),
        "itl": stats([x for r in good for x in r.itl]),
        "e2e": stats([r.e2e for r in good]),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m mobajax.bench serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model name (default: the server's first model)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in len * [1 - r, 1 + r]")
    parser.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (Poisson); inf = all at once")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args(argv)
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1:
        parser.error("--num-prompts, --input-len and --output-len must be >= 1")
    if not 0 <= args.range_ratio < 1:
        parser.error(f"--range-ratio must be in [0, 1), got {args.range_ratio}")
    if args.request_rate <= 0 or (args.max_concurrency is not None and args.max_concurrency < 1):
        parser.error("--request-rate must be > 0 and --max-concurrency >= 1")

    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        models = httpx.get(args.base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30).json()["data"]
    except (httpx.HTTPError, KeyError, ValueError) as err:
        print(f"error: no OpenAI-compatible server answers at {args.base_url}: {err}")
        return 2
    args.model = args.model or models[0]["id"]
    rng = np.random.default_rng(args.seed)

    def lengths(center: int) -> list[int]:
        low, high = max(1, int(center * (1 - args.range_ratio))), int(center * (1 + args.range_ratio))
        return rng.integers(low, high + 1, size=args.num_prompts).tolist()

    prompts = [rng.integers(*PROMPT_IDS, n).tolist() for n in lengths(args.input_len)]
    results, seconds = asyncio.run(run(args, prompts, lengths(args.output_len)))
    summary = summarize(results, seconds)
    summary.update(base_url=args.base_url, model=args.model, num_prompts=args.num_prompts, input_len=args.input_len,
                   output_len=args.output_len, request_rate=str(args.request_rate),
                   max_concurrency=args.max_concurrency,
                   date=time.strftime("%Y-%m-%d"))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "serve.json"), "w") as f:
        json.dump(summary, f, indent=2)
    _print(summary)
    _plot(results, os.path.join(args.out, "serve.png"))
    return 0 if summary["failed"] == 0 else 1


def _print(s: dict) -> None:
    print(f"completed {s['completed']}, failed {s['failed']} in {s['duration_s']:.2f} s")
    print(f"request throughput {s['request_throughput']:.2f} req/s, output {s['output_throughput']:.1f} tok/s, "
          f"total {s['total_throughput']:.1f} tok/s")
    print(f"{'metric':<8}{'mean ms':>10}{'median ms':>11}{'p99 ms':>10}")
    for name in ("ttft", "tpot", "itl", "e2e"):
        m = s[name]
        if m["mean_ms"] is not None:
            print(f"{name.upper():<8}{m['mean_ms']:>10.1f}{m['median_ms']:>11.1f}{m['p99_ms']:>10.1f}")
    for error in s["errors"]:
        print(f"error: {error}")


def _plot(results: list[Result], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in results if r.ok]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].hist([r.ttft * 1000 for r in good], bins=30)
    axes[0].set_xlabel("TTFT (ms)")
    axes[1].hist([x * 1000 for r in good for x in r.itl], bins=30)
    axes[1].set_xlabel("inter-token latency (ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
