"""Offline throughput: `python -m mobajax.bench throughput [--shape llama3-8b] [--hf] [--out DIR]`.

Two workloads on a random-weight model of a real shape, through the engine (`LLMEngine`):
1. throughput: N requests (default 256) with prompt and output lengths uniform in [min, max]
   (default 100-1024), `ignore_eos`; requests/s, output and total tokens/s, and where the wall
   time goes (`LLMEngine.times`: scheduling, building inputs, the device, processing outputs).
2. decode at batch B (default 64, prompt 512, 256 new tokens): output tokens/s in the window where
   all B decode, against the memory floor (weights + KV bytes read per step) / copy bandwidth
   measured in the same run.
With `--hf`, Hugging Face transformers `generate` runs both workloads on the same shape first (torch,
in a subprocess before JAX takes the GPU): the decode batch, and the first `--hf-requests` requests
of the throughput workload in static batches of B (see `hf_baseline`).
Prints a table, writes throughput.json and throughput.png to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np

HF_BASELINE_FLAG = "--hf-baseline-only"


def workload(seed: int, num_prompts: int, min_len: int, max_len: int, vocab: int) -> tuple[list[list[int]], list[int]]:
    """The throughput workload: random prompts and output lengths, uniform in [min_len, max_len]."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, size=(2, num_prompts))
    return [rng.integers(0, vocab, n).tolist() for n in lengths[0]], lengths[1].tolist()


def hf_baseline(hf_config: dict, args) -> dict:
    """transformers generate on random weights (greedy, no early stop), output tokens/s on:

    - the decode batch: `decode_batch` prompts of `decode_prompt` tokens, `decode_output` new each;
    - the first `hf_requests` requests of the throughput workload, in batches of `decode_batch`
      (left-padded; each batch generates its longest requested output, as static batching must;
      only the requested output tokens count)."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    fields = {k: v for k, v in hf_config.items() if k not in ("architectures", "model_type")}
    config = transformers.AutoConfig.for_model(hf_config["model_type"], **fields)
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    with torch.device(device):  # initialise the random weights where they run
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype).eval()

    def generate(prompts: list[list[int]], new: int) -> float:
        width = max(map(len, prompts))
        ids = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    rng = np.random.default_rng(args.seed + 1)
    generate([[1] * 16], 4)  # warm-up
    b, p, n = args.decode_batch, args.decode_prompt, args.decode_output
    decode_s = generate(rng.integers(0, config.vocab_size, (b, p)).tolist(), n)
    prompts, outputs = workload(args.seed, args.num_prompts, args.min_len, args.max_len, config.vocab_size)
    prompts, outputs = prompts[: args.hf_requests], outputs[: args.hf_requests]
    workload_s = sum(generate(prompts[i : i + b], max(outputs[i : i + b])) for i in range(0, len(prompts), b))
    return {
        "impl": "transformers generate", "device": device, "torch": torch.__version__,
        "transformers": transformers.__version__,
        "decode_seconds": decode_s, "output_tok_s": b * n / decode_s,
        "workload_requests": len(prompts), "workload_seconds": workload_s,
        "workload_output_tok_s": sum(outputs) / workload_s,
    }


def run_hf_baseline(args, hf_config: dict) -> dict | None:
    """The transformers baseline in a subprocess (so torch and JAX don't share the GPU)."""
    command = [sys.executable, "-m", "mobajax.bench", "throughput", HF_BASELINE_FLAG, "--shape", args.shape,
               "--dtype", args.dtype,
               "--seed", str(args.seed)]
    for name in ("num_prompts", "min_len", "max_len", "decode_batch", "decode_prompt", "decode_output", "hf_requests"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=3000)
    if result.returncode != 0:
        print(f"transformers baseline failed:\n{result.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_requests(engine, prompts: list[list[int]], outputs: list[int]) -> dict:
    """Submit all, step to completion; timings, token counts, and the all-decoding window."""
    from mobajax.serving.sampling_params import SamplingParams

    times_before = dataclasses.replace(engine.times)
    start = time.perf_counter()
    for i, (prompt, new) in enumerate(zip(prompts, outputs)):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    window_start, generated_before = None, 0
    while engine.has_unfinished_requests():
        engine.step()
        if window_start is None and len(engine.requests) == len(prompts):
            seqs = [s for r in engine.requests.values() for s in r.seqs]
            if all(s.num_generated for s in seqs):
                window_start, generated_before = time.perf_counter(), sum(s.num_generated for s in seqs)
    seconds = time.perf_counter() - start
    window = time.perf_counter() - window_start if window_start else None
    total_out = sum(outputs)
    return {
        "requests": len(prompts), "seconds": seconds, "requests_s": len(prompts) / seconds,
        "output_tok_s": total_out / seconds, "total_tok_s": (total_out + sum(map(len, prompts))) / seconds,
        "device_fraction": (engine.times.device - times_before.device) / seconds,
        "phase_seconds": {f.name: getattr(engine.times, f.name) - getattr(times_before, f.name)
                          for f in dataclasses.fields(engine.times)},
        "decode_window_s": window, "decode_window_tokens": total_out - generated_before,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m mobajax.bench throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama3-8b",
                        help="a named shape (see mobajax.bench.shapes) or a config.json")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--decode-batch", type=int, default=64)
    parser.add_argument("--decode-prompt", type=int, default=512)
    parser.add_argument("--decode-output", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024)
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--hf", action="store_true", help="also time transformers generate (same run)")
    parser.add_argument("--hf-requests", type=int, default=64, help="requests of the workload transformers runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument(HF_BASELINE_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("num_prompts", "min_len", "decode_batch", "decode_prompt", "decode_output", "max_num_seqs",
                 "hf_requests"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_len < args.min_len:
        parser.error(f"--max-len ({args.max_len}) must be >= --min-len ({args.min_len})")

    from mobajax.bench.shapes import hf_config_of

    try:
        hf_config = hf_config_of(args.shape)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    if getattr(args, HF_BASELINE_FLAG.strip("-").replace("-", "_")):
        print(json.dumps(hf_baseline(hf_config, args)))
        return 0
    baseline = run_hf_baseline(args, hf_config) if args.hf else None
    if baseline:
        print(f"transformers baseline: decode batch {baseline['output_tok_s']:.0f} output tok/s, "
              f"workload {baseline['workload_output_tok_s']:.0f} output tok/s", flush=True)
    return _run(args, hf_config, baseline)


def _run(args, hf_config: dict, baseline: dict | None) -> int:
    import jax

    from mobajax.bench.kernels import copy_bandwidth
    from mobajax.bench.shapes import param_bytes, random_pretrained
    from mobajax.serving.config import EngineConfig
    from mobajax.serving.engine import LLMEngine
    from mobajax.serving.model_runner import ModelRunner

    rng = np.random.default_rng(args.seed)
    bandwidth = copy_bandwidth()  # before the engine takes its share of the GPU memory for the pool
    pretrained = random_pretrained(hf_config, args.dtype, args.seed)
    max_len = max(2 * args.max_len, args.decode_prompt + args.decode_output) + 16
    config = EngineConfig(
        dtype=args.dtype, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=min(max_len, pretrained.config.max_position_embeddings), decode_steps=args.decode_steps,
    )
    engine = LLMEngine(pretrained, config)
    start = time.perf_counter()
    engine.warmup()
    compile_s = time.perf_counter() - start
    print(f"warm-up compiled {sum(map(len, engine.buckets()))} buckets in {compile_s:.1f} s", flush=True)
    vocab = pretrained.config.vocab_size
    prompts, outputs = workload(args.seed, args.num_prompts, args.min_len, args.max_len, vocab)
    throughput = run_requests(engine, prompts, outputs)
    print(f"throughput workload: {throughput['output_tok_s']:.0f} output tok/s", flush=True)

    b, p, n = args.decode_batch, args.decode_prompt, args.decode_output
    decode = run_requests(engine, [rng.integers(0, vocab, p).tolist() for _ in range(b)], [n] * b)
    weights = param_bytes(pretrained.params)
    kv_token = ModelRunner.page_bytes(pretrained.config, 1, jax.numpy.dtype(args.dtype))
    step_floor = (weights + b * (p + n / 2) * kv_token) / bandwidth
    decode_tok_s = decode["decode_window_tokens"] / decode["decode_window_s"] if decode["decode_window_s"] else None
    result = {
        "shape": args.shape, "dtype": args.dtype, "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"), "compile_s": compile_s,
        "throughput": throughput, "decode": decode, "copy_bandwidth_Bps": bandwidth,
        "decode_floor_tok_s": b / step_floor, "decode_window_tok_s": decode_tok_s,
        "fraction_of_floor": decode_tok_s * step_floor / b if decode_tok_s else None,
        "transformers": baseline,
        "decode_speedup_vs_transformers": (decode["output_tok_s"] / baseline["output_tok_s"]) if baseline else None,
        "workload_speedup_vs_transformers": (
            (throughput["output_tok_s"] / baseline["workload_output_tok_s"]) if baseline else None
        ),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "throughput.json"), "w") as f:
        json.dump(result, f, indent=2)
    _print(result)
    _plot(result, os.path.join(args.out, "throughput.png"))
    return 0


def _print(r: dict) -> None:
    t, d = r["throughput"], r["decode"]
    print(f"{r['shape']} {r['dtype']} on {r['device']} (jax {r['jax']}), warm-up compile {r['compile_s']:.1f} s")
    print(f"{'workload':<28}{'req/s':>9}{'out tok/s':>12}{'total tok/s':>13}{'device share':>14}")
    for name, w in (("throughput", t), ("decode batch", d)):
        print(f"{name:<28}{w['requests_s']:>9.2f}{w['output_tok_s']:>12.0f}{w['total_tok_s']:>13.0f}{w['device_fraction']:>14.0%}")
    for name, w in (("throughput", t), ("decode batch", d)):
        phases = ", ".join(f"{k} {v:.2f} s" for k, v in w["phase_seconds"].items())
        print(f"{name} wall {w['seconds']:.2f} s = engine steps ({phases}) + the rest")
    if r["decode_window_tok_s"]:
        print(f"decode window: {r['decode_window_tok_s']:.0f} tok/s = {r['fraction_of_floor']:.0%} of the memory floor "
              f"{r['decode_floor_tok_s']:.0f} tok/s (copy bandwidth {r['copy_bandwidth_Bps'] / 1e12:.2f} TB/s)")
    if r["transformers"]:
        hf = r["transformers"]
        print(f"transformers generate, throughput workload (first {hf['workload_requests']} requests, batches of "
              f"{r['decode']['requests']}): {hf['workload_output_tok_s']:.0f} tok/s; "
              f"mobajax {r['workload_speedup_vs_transformers']:.1f}x")
        print(f"transformers generate, decode batch: {hf['output_tok_s']:.0f} tok/s; "
              f"mobajax {r['decode_speedup_vs_transformers']:.1f}x")


def _plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["mobajax: workload", "mobajax: decode batch", "decode batch memory floor"]
    values = [r["throughput"]["output_tok_s"], r["decode"]["output_tok_s"], r["decode_floor_tok_s"]]
    colors = ["tab:blue", "tab:blue", "tab:gray"]
    if r["transformers"]:
        names += ["transformers: workload", "transformers: decode batch"]
        values += [r["transformers"]["workload_output_tok_s"], r["transformers"]["output_tok_s"]]
        colors += ["tab:orange", "tab:orange"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(names, values, color=colors)
    ax.set_xlabel("output tokens / s")
    ax.set_title(f"{r['shape']} {r['dtype']}, {r['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
