"""Offline throughput: `python -m mobajax.bench throughput [--shape llama3-8b] [--hf] [--out DIR]`.

Two workloads on a random-weight model of a real shape, through the engine (`LLMEngine`):
1. throughput: N requests (default 256) with prompt and output lengths uniform in [min, max]
   (default 100-1024), `ignore_eos`; requests/s, output and total tokens/s, and where the wall
   time goes (waiting for the device vs host work).
2. decode at batch B (default 64, prompt 512, 256 new tokens): output tokens/s in the window where
   all B decode, against the memory floor (weights + KV bytes read per step) / copy bandwidth
   measured in the same run, and against Hugging Face transformers `generate` on the same shape
   and batch (`--hf`, torch, run in a subprocess before JAX takes the GPU).
Prints a table, writes throughput.json and throughput.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HF_BASELINE_FLAG = "--hf-baseline-only"


def hf_generate_tokens_per_second(hf_config: dict, batch: int, prompt: int, new: int, dtype: str) -> dict:
    """transformers generate (greedy, exactly `new` tokens) on random weights; output tokens/s."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    fields = {k: v for k, v in hf_config.items() if k not in ("architectures", "model_type")}
    config = transformers.AutoConfig.for_model(hf_config["model_type"], **fields)
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    with torch.device(device):  # initialise the random weights where they run
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype).eval()
    ids = torch.randint(0, config.vocab_size, (batch, prompt), device=device)
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids[:, :16], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {"impl": "transformers generate", "device": device, "seconds": seconds, "output_tok_s": batch * new / seconds,
            "torch": torch.__version__, "transformers": transformers.__version__}


def run_hf_baseline(args, hf_config: dict) -> dict | None:
    """The transformers baseline in a subprocess (so torch and JAX don't share the GPU)."""
    command = [sys.executable, "-m", "mobajax.bench", "throughput", HF_BASELINE_FLAG, "--shape", args.shape,
               "--decode-batch", str(args.decode_batch), "--decode-prompt", str(args.decode_prompt),
               "--decode-output", str(args.decode_output), "--dtype", args.dtype]
    result = subprocess.run(command, capture_output=True, text=True, timeout=3000)
    if result.returncode != 0:
        print(f"transformers baseline failed:\n{result.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_requests(engine, prompts: list[list[int]], outputs: list[int]) -> dict:
    """Submit all, step to completion; timings, token counts, and the all-decoding window."""
    from mobajax.serving.sampling_params import SamplingParams

    device_before = engine.device_seconds
    start = time.perf_counter()
    for i, (prompt, new) in enumerate(zip(prompts, outputs)):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    window_start, generated_before = None, 0
    while engine.has_unfinished_requests():
        engine.step()
        seqs = [s for r in engine.requests.values() for s in r.seqs]
        if window_start is None and len(engine.requests) == len(prompts) and all(s.num_generated for s in seqs):
            window_start, generated_before = time.perf_counter(), sum(s.num_generated for s in seqs)
    seconds = time.perf_counter() - start
    window = time.perf_counter() - window_start if window_start else None
    total_out = sum(outputs)
    return {
        "requests": len(prompts), "seconds": seconds, "requests_s": len(prompts) / seconds,
        "output_tok_s": total_out / seconds, "total_tok_s": (total_out + sum(map(len, prompts))) / seconds,
        "device_fraction": (engine.device_seconds - device_before) / seconds,
        "decode_window_s": window, "decode_window_tokens": total_out - generated_before,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m mobajax.bench throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama3-8b", help="a named shape (see mobajax.bench.shapes) or a config.json")
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument(HF_BASELINE_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("num_prompts", "min_len", "decode_batch", "decode_prompt", "decode_output", "max_num_seqs"):
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
        print(json.dumps(hf_generate_tokens_per_second(hf_config, args.decode_batch, args.decode_prompt, args.decode_output, args.dtype)))
        return 0
    baseline = run_hf_baseline(args, hf_config) if args.hf else None
    if baseline:
        print(f"transformers baseline: {baseline['output_tok_s']:.0f} output tok/s", flush=True)
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
    lengths = rng.integers(args.min_len, args.max_len + 1, size=(2, args.num_prompts))
    prompts = [rng.integers(0, vocab, n).tolist() for n in lengths[0]]
    throughput = run_requests(engine, prompts, lengths[1].tolist())
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
        "speedup_vs_transformers": (decode["output_tok_s"] / baseline["output_tok_s"]) if baseline else None,
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
    if r["decode_window_tok_s"]:
        print(f"decode window: {r['decode_window_tok_s']:.0f} tok/s = {r['fraction_of_floor']:.0%} of the memory floor "
              f"{r['decode_floor_tok_s']:.0f} tok/s (copy bandwidth {r['copy_bandwidth_Bps'] / 1e12:.2f} TB/s)")
    if r["transformers"]:
        print(f"transformers generate: {r['transformers']['output_tok_s']:.0f} tok/s; mobajax {r['speedup_vs_transformers']:.1f}x")


def _plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["mobajax (decode batch)", "memory floor"]
    values = [r["decode"]["output_tok_s"], r["decode_floor_tok_s"]]
    if r["transformers"]:
        names.append("transformers generate")
        values.append(r["transformers"]["output_tok_s"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(names, values, color=["tab:blue", "tab:gray", "tab:orange"][: len(values)])
    ax.set_xlabel("output tokens / s")
    ax.set_title(f"{r['shape']} {r['dtype']}, {r['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
