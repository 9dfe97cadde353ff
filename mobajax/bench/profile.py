"""Where a decode step goes: `python -m mobajax.bench profile [--shape S] [--batch B] [--out DIR]`.

Runs the serving engine on a random-weight model of a named shape (or a config.json) with B
requests of `--prompt` random tokens, lets the fused (and chained) decodes settle, times
`--timed-calls` engine steps untraced, then traces `--traced-calls` more with `jax.profiler` and
sums the GPU kernels by name: time per decode step, launches per step, the share of the traced
span the GPU was busy, and the largest gaps between kernels. Prints a table and writes
profile.json, profile.png and the trace to --out. GPU only (a CPU trace has no kernel events).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import time

import numpy as np


def gpu_kernels(trace: dict) -> list[tuple[float, float, str]]:
    """(start us, duration us, name) of every kernel or copy on a GPU in a perfetto trace, by start."""
    events = trace["traceEvents"]
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    on_gpu = {pid for pid, name in processes.items() if "GPU" in name}
    return sorted((e["ts"], e["dur"], e["name"]) for e in events if e.get("ph") == "X" and e["pid"] in on_gpu)


def summarize(kernels: list[tuple[float, float, str]], decode_steps: int, top: int = 25) -> dict:
    """Per-kernel totals of a traced stretch of `decode_steps` decode steps.

    Returns span_us, busy_us (kernel time, overlaps counted once), busy_fraction, kernels
    ([name, us per step, launches per step], largest first, `top` of them) and gaps (the 8 largest
    [us, kernel before, kernel after]).
    """
    if not kernels:
        raise ValueError("the trace has no GPU kernels")
    start = kernels[0][0]
    span = max(t + d for t, d, _ in kernels) - start
    busy, covered = 0.0, start
    gaps = []
    for (t, d, name), before in zip(kernels, [None, *kernels[:-1]]):
        if t > covered and before is not None:
            gaps.append([t - covered, before[2], name])
        busy += max(0.0, t + d - max(t, covered))
        covered = max(covered, t + d)
    total, count = collections.Counter(), collections.Counter()
    for _, d, name in kernels:
        total[name] += d
        count[name] += 1
    rows = [[name, us / decode_steps, count[name] / decode_steps] for name, us in total.most_common(top)]
    return {
        "span_us": span, "busy_us": busy, "busy_fraction": busy / span, "kernels": rows,
        "launches_per_step": len(kernels) / decode_steps, "gaps": sorted(gaps, reverse=True)[:8],
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m mobajax.bench profile")
    parser.add_argument("--shape", default="llama3-8b", help="a named shape (mobajax.bench.shapes) or a config.json")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batch", type=int, default=64, help="sequences decoding together")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens per sequence")
    parser.add_argument("--decode-steps", type=int, default=8, help="decode steps per fused call")
    parser.add_argument("--timed-calls", type=int, default=8, help="engine steps timed without the profiler")
    parser.add_argument("--traced-calls", type=int, default=2, help="engine steps traced")
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args(argv)
    for name in ("batch", "prompt", "decode_steps", "timed_calls", "traced_calls"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    import jax

    if jax.default_backend() != "gpu":
        print(f"the profile benchmark needs a GPU (jax backend is {jax.default_backend()!r})")
        return 2
    from mobajax.bench.shapes import hf_config_of, random_pretrained
    from mobajax.serving.config import EngineConfig
    from mobajax.serving.engine import LLMEngine
    from mobajax.serving.sampling_params import SamplingParams

    pretrained = random_pretrained(hf_config_of(args.shape), args.dtype)
    calls = 4 + args.timed_calls + args.traced_calls
    new_tokens = (calls + 1) * args.decode_steps + args.batch
    max_len = args.prompt + new_tokens + 16
    page_size = EngineConfig().page_size
    engine = LLMEngine(pretrained, EngineConfig(  # a pool just big enough: every sequence at max_len
        dtype=args.dtype, max_num_seqs=args.batch, max_num_batched_tokens=1024, warmup=False,
        max_model_len=max_len, decode_steps=args.decode_steps, num_pages=args.batch * -(-max_len // page_size),
    ))
    rng = np.random.default_rng(0)
    for i in range(args.batch):
        prompt = rng.integers(0, pretrained.config.vocab_size, args.prompt).tolist()
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    seqs = [s for r in engine.requests.values() for s in r.seqs]
    while any(s.num_generated == 0 for s in seqs):
        engine.step()
    for _ in range(4):  # compile the fused decode and start the chain
        engine.step()

    def generated() -> int:
        return sum(s.num_generated for s in seqs)

    jax.block_until_ready(engine.runner.pools)
    before, start = generated(), time.perf_counter()
    for _ in range(args.timed_calls):
        engine.step()
    jax.block_until_ready(engine.runner.pools)
    step_ms = (time.perf_counter() - start) / ((generated() - before) / args.batch) * 1e3
    context = int(np.mean([s.num_computed for s in seqs]))
    trace_dir = os.path.join(args.out, "trace")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(args.traced_calls):  # each dispatches one fused call (chained: the next one)
            engine.step()
        jax.block_until_ready(engine.runner.pools)
    traced_steps = args.traced_calls * args.decode_steps
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        summary = summarize(gpu_kernels(json.load(f)), traced_steps)

    device = jax.devices()[0].device_kind
    print(f"{args.shape} {args.dtype}, batch {args.batch}, context ~{context}, on {device} (jax {jax.__version__})")
    print(f"untraced: {step_ms:.2f} ms per decode step ({args.batch / step_ms * 1e3:.0f} tok/s)")
    print(f"traced {traced_steps} decode steps: GPU busy {summary['busy_fraction']:.1%} of "
          f"{summary['span_us'] / 1e3:.1f} ms, {summary['launches_per_step']:.0f} launches per step")
    print(f"{'us/step':>9} {'per step':>8}  kernel")
    for name, us, launches in summary["kernels"]:
        print(f"{us:9.1f} {launches:8.1f}  {name[:100]}")
    print("largest gaps (us, before, after):", [(round(g), a, b) for g, a, b in summary["gaps"][:4]])
    os.makedirs(args.out, exist_ok=True)
    result = {"shape": args.shape, "dtype": args.dtype, "batch": args.batch, "context": context, "device": device,
              "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"), "untraced_ms_per_step": step_ms,
              "traced_decode_steps": traced_steps, **summary}
    with open(os.path.join(args.out, "profile.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(args.out, "profile.png"))
    return 0


def plot(result: dict, path: str) -> None:
    """Horizontal bars: microseconds per decode step of the largest kernels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["kernels"][:15][::-1]
    fig, ax = plt.subplots(figsize=(10, 5))
    ax.barh([name[:40] for name, _, _ in rows], [us for _, us, _ in rows])
    ax.set_xlabel("us per decode step")
    ax.set_title(f"{result['shape']} decode, batch {result['batch']}, context ~{result['context']}, {result['device']}")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
