"""Kernel benchmarks: `python -m mobajax.bench kernels [--out DIR] [--quick]`.

Paged decode (heads 32/8, H 128, bf16, page 16) against JAX's own Pallas `paged_attention` and an
XLA gather + einsum baseline, each as a fraction of the device-to-device copy bandwidth measured in
the same run; ragged paged prefill (the Triton kernel and, on Hopper, the Mosaic GPU one) against
cuDNN dense causal attention on equal work; the KV
write against an XLA scatter. Prints a table, writes kernels.json and kernels.png to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from mobajax.pallas.kv_write import kv_write, kv_write_reference
from mobajax.pallas.paged_decode import PagedDecodeConfig, auto_num_splits, paged_decode
from mobajax.pallas.paged_prefill import PagedPrefillConfig, paged_prefill
from mobajax.pallas.paged_prefill_mosaic import PagedPrefillMosaicConfig, fits, paged_prefill_mosaic

N, K, H, G = 32, 8, 128, 16
DTYPE = jnp.bfloat16
DECODE_CASES = ((32, 4096), (128, 4096), (16, 32768), (1, 262144))
PREFILL_LENGTHS = (8192, 32768)
# (block_kv, num_stages) of the decode sweep; each is tried at the automatic num_splits, twice
# and half of it.
DECODE_TILES = ((64, 4), (128, 3))
PREFILL_CONFIGS = (
    PagedPrefillConfig(),
    PagedPrefillConfig(block_m=128, block_kv=64, num_warps=4, num_stages=2),
)
MOSAIC_PREFILL_CONFIGS = (
    PagedPrefillMosaicConfig(),
    PagedPrefillMosaicConfig(block_kv=64, stages=4),
    PagedPrefillMosaicConfig(block_kv=128, stages=3),
)


def decode_configs(batch: int, context: int, quick: bool) -> list[PagedDecodeConfig]:
    configs = []
    for block_kv, stages in DECODE_TILES[:1] if quick else DECODE_TILES:
        auto = auto_num_splits(batch, K, -(-context // block_kv))
        for splits in dict.fromkeys((auto, 2 * auto, max(1, auto // 2), 1 if auto <= 8 else auto)):
            configs.append(PagedDecodeConfig(block_kv=block_kv, num_stages=stages, num_splits=splits))
    return configs


def timeit(fn, *args, iters: int = 10, reps: int = 5, wait=jax.block_until_ready) -> float:
    """Median seconds per call over `reps` batches of `iters` back-to-back calls (after warm-up),
    each batch ended by wait(last result): the device's time per call, the host's dispatch of a
    call overlapping the device's work on the one before."""
    wait(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        wait(out)
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def copy_bandwidth() -> float:
    """Bytes read + written per second of a device-to-device elementwise copy: 2 GiB on a GPU
    (64 MiB elsewhere, where the figure only feeds smoke runs)."""
    x = jnp.ones(((1 << 30) if _on_gpu() else (1 << 25),), jnp.bfloat16)
    seconds = timeit(jax.jit(lambda a: a + 1), x, iters=20)
    return 2 * x.nbytes / seconds


def matmul_rate() -> float:
    """FLOP/s of a bf16 n^3 matrix product on random data (float32 accumulation): n = 8192 on a
    GPU (1024 elsewhere)."""
    n = 8192 if _on_gpu() else 1024
    a = jax.random.normal(jax.random.key(9), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(8), (n, n), jnp.bfloat16)
    seconds = timeit(jax.jit(lambda x, y: x @ y), a, b, iters=20)
    return 2 * n**3 / seconds


def rel_err(a, b) -> float:
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def make_pool(batch: int, context: int, seed: int = 0):
    """Pools [P, G, K, H] with every sequence at `context` tokens on shuffled pages."""
    pages_per_seq = context // G
    num_pages = batch * pages_per_seq
    key_k, key_v, key_q, key_p = jax.random.split(jax.random.key(seed), 4)
    k_pages = jax.random.normal(key_k, (num_pages, G, K, H), DTYPE)
    v_pages = jax.random.normal(key_v, (num_pages, G, K, H), DTYPE)
    table = jax.random.permutation(key_p, num_pages).reshape(batch, pages_per_seq)
    q = jax.random.normal(key_q, (batch, N, H), DTYPE)
    lengths = jnp.full((batch,), context, jnp.int32)
    return q, k_pages, v_pages, table.astype(jnp.int32), lengths


def xla_decode(q, k_pages, v_pages, page_table, lengths):
    """XLA baseline: gather the pages into [B, S, K, H], then einsum-softmax-einsum."""
    b = q.shape[0]
    k = k_pages[page_table].reshape(b, -1, K, H)
    v = v_pages[page_table].reshape(b, -1, K, H)
    qg = q.reshape(b, K, N // K, H)
    s = jnp.einsum("bkgh,bskh->bkgs", qg, k, preferred_element_type=jnp.float32) * H**-0.5
    s = jnp.where(jnp.arange(k.shape[1]) < lengths[:, None, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgs,bskh->bkgh", p, v).reshape(q.shape)


def bench_decode(bandwidth: float, quick: bool) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
    rows = []
    for batch, context in DECODE_CASES[:2] if quick else DECODE_CASES:
        q, k_pages, v_pages, table, lengths = make_pool(batch, context)
        kv_bytes = 2 * batch * context * K * H * jnp.dtype(DTYPE).itemsize
        floor = kv_bytes / bandwidth
        reference = jax.jit(xla_decode)(q, k_pages, v_pages, table, lengths)
        ours = {}
        for config in decode_configs(batch, context, quick):
            fn = jax.jit(lambda *a, c=config: paged_decode(*a, config=c))
            err = rel_err(fn(q, k_pages, v_pages, table, lengths), reference)
            ours[config] = (timeit(fn, q, k_pages, v_pages, table, lengths), err)
        best = min(ours, key=lambda c: ours[c][0])
        t_ours, err = ours[best]
        t_default = timeit(jax.jit(paged_decode), q, k_pages, v_pages, table, lengths)
        # JAX's kernel wants [K, P, G, H] pools and a page count divisible by k_splits.
        kt, vt = jnp.transpose(k_pages, (2, 0, 1, 3)), jnp.transpose(v_pages, (2, 0, 1, 3))
        peer = {}
        for splits in (1, 8, 16):
            fn = jax.jit(lambda *a, s=splits: paged_attention(*a, k_splits=s))
            peer[splits] = timeit(fn, q, kt, vt, table, lengths)
        t_peer = min(peer.values())
        t_xla = timeit(jax.jit(xla_decode), q, k_pages, v_pages, table, lengths)
        del kt, vt, k_pages, v_pages
        rows.append(
            dict(
                kernel="paged_decode",
                case=f"B={batch} ctx={context}",
                kv_bytes=kv_bytes,
                floor_ms=floor * 1e3,
                ours_ms=t_ours * 1e3,
                ours_bw_frac=floor / t_ours,
                default_config_ms=t_default * 1e3,
                default_bw_frac=floor / t_default,
                ours_config=repr(best),
                ours_rel_err=err,
                all_configs_ms={repr(c): v[0] * 1e3 for c, v in ours.items()},
                peer_ms=t_peer * 1e3,
                peer_bw_frac=floor / t_peer,
                peer_k_splits=min(peer, key=peer.get),
                xla_ms=t_xla * 1e3,
                xla_bw_frac=floor / t_xla,
                speedup_vs_peer=t_peer / t_ours,
            )
        )
        print_row(rows[-1])
    return rows


def bench_prefill(rate: float, quick: bool) -> list[dict]:
    rows = []
    for length in PREFILL_LENGTHS[:1] if quick else PREFILL_LENGTHS:
        q, k_pages, v_pages, _, _ = make_pool(1, length, seed=1)
        table = jnp.arange(length // G, dtype=jnp.int32)[None]
        q = jax.random.normal(jax.random.key(2), (length, N, H), DTYPE)
        cu = jnp.array([0, length], jnp.int32)
        kv_lens = jnp.array([length], jnp.int32)
        k = k_pages.reshape(1, length, K, H)
        v = v_pages.reshape(1, length, K, H)
        flops = 4 * N * H * length * (length + 1) / 2
        cudnn = jax.jit(
            lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="cudnn"
            )
        )
        reference = cudnn(q[None], k, v)[0]
        t_cudnn = timeit(cudnn, q[None], k, v)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from jax.experimental.pallas.ops.gpu.attention import mha
        # JAX's Pallas Triton flash attention has no GQA: K/V repeated to N heads (same FLOPs).
        mha_fn = jax.jit(lambda q, k, v: mha(q, k, v, None, sm_scale=H**-0.5, causal=True))
        k_rep, v_rep = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
        mha_err = rel_err(mha_fn(q[None], k_rep, v_rep)[0], reference)
        t_mha = timeit(mha_fn, q[None], k_rep, v_rep)
        del k_rep, v_rep
        ours = {}
        for config in PREFILL_CONFIGS[:1] if quick else PREFILL_CONFIGS:
            fn = jax.jit(lambda *a, c=config: paged_prefill(*a, config=c))
            args = (q, k_pages, v_pages, table, cu, kv_lens)
            err = rel_err(fn(*args), reference)
            ours[config] = (timeit(fn, *args), err)
        best = min(ours, key=lambda c: ours[c][0])
        t_ours, err = ours[best]
        mosaic = {}
        if fits(q, k_pages):
            for config in MOSAIC_PREFILL_CONFIGS[:1] if quick else MOSAIC_PREFILL_CONFIGS:
                fn = jax.jit(lambda *a, c=config: paged_prefill_mosaic(*a, config=c))
                mosaic[config] = (timeit(fn, *args), rel_err(fn(*args), reference))
        rows.append(
            dict(
                kernel="paged_prefill",
                case=f"causal S={length}",
                flops=flops,
                ours_ms=t_ours * 1e3,
                floor_ms=flops / rate * 1e3,
                ours_tflops=flops / t_ours / 1e12,
                ours_config=repr(best),
                ours_rel_err=err,
                all_configs_ms={repr(c): v[0] * 1e3 for c, v in ours.items()},
                peer_ms=t_cudnn * 1e3,
                peer_tflops=flops / t_cudnn / 1e12,
                ratio_vs_cudnn=t_cudnn / t_ours,
                jax_mha_ms=t_mha * 1e3,
                jax_mha_tflops=flops / t_mha / 1e12,
                jax_mha_rel_err=mha_err,
            )
        )
        if mosaic:
            fastest = min(mosaic, key=lambda c: mosaic[c][0])
            t_mosaic, err = mosaic[fastest]
            rows[-1].update(
                mosaic_ms=t_mosaic * 1e3,
                mosaic_tflops=flops / t_mosaic / 1e12,
                mosaic_ratio_vs_cudnn=t_cudnn / t_mosaic,
                mosaic_rel_err=err,
                mosaic_config=repr(fastest),
                mosaic_all_configs_ms={repr(c): v[0] * 1e3 for c, v in mosaic.items()},
            )
        print_row(rows[-1])
    return rows


def bench_write(bandwidth: float) -> list[dict]:
    rows = []
    num_pages = 16384
    for tokens in (128, 8192):
        key = jax.random.key(3)
        k_pages = jax.random.normal(key, (num_pages, G, K, H), DTYPE)
        v_pages = k_pages + 1
        k = jax.random.normal(key, (tokens, K, H), DTYPE)
        slots = jax.random.permutation(key, num_pages * G)[:tokens].astype(jnp.int32)
        times = {}
        for name, fn in (("ours", kv_write), ("xla", kv_write_reference)):
            step = jax.jit(fn, donate_argnums=(0, 1))
            pools = (k_pages.copy(), v_pages.copy())
            pools = step(*pools, k, k, slots)
            jax.block_until_ready(pools)
            start = time.perf_counter()
            for _ in range(50):
                pools = step(*pools, k, k, slots)
            jax.block_until_ready(pools)
            times[name] = (time.perf_counter() - start) / 50
        moved = 2 * 2 * tokens * K * H * jnp.dtype(DTYPE).itemsize  # read + write, K and V
        rows.append(
            dict(
                kernel="kv_write",
                case=f"T={tokens} (pool {num_pages} pages, donated)",
                floor_ms=moved / bandwidth * 1e3,
                ours_ms=times["ours"] * 1e3,
                xla_ms=times["xla"] * 1e3,
            )
        )
        print_row(rows[-1])
    return rows


def print_row(row: dict) -> None:
    keys = ("ours_ms", "peer_ms", "xla_ms", "ours_bw_frac", "default_bw_frac", "peer_bw_frac",
            "xla_bw_frac",
            "ours_tflops", "peer_tflops", "jax_mha_tflops", "speedup_vs_peer", "ratio_vs_cudnn",
            "ours_rel_err")
    cells = [f"{k}={row[k]:.3g}" for k in keys if k in row]
    print(f"{row['kernel']:14s} {row['case']:34s} " + " ".join(cells), flush=True)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dec = [r for r in rows if r["kernel"] == "paged_decode"]
    pre = [r for r in rows if r["kernel"] == "paged_prefill"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    x = np.arange(len(dec))
    for i, (key, label) in enumerate(
        (("ours_bw_frac", "mobajax"), ("peer_bw_frac", "jax paged_attention"), ("xla_bw_frac", "XLA gather"))
    ):
        axes[0].bar(x + (i - 1) * 0.27, [r[key] for r in dec], 0.27, label=label)
    axes[0].set_xticks(x, [r["case"] for r in dec], fontsize=8)
    axes[0].set_ylabel("fraction of measured copy bandwidth")
    axes[0].set_title("paged decode, heads 32/8, H 128, bf16, page 16")
    axes[0].legend(fontsize=8)
    x = np.arange(len(pre))
    bars = (("ours_tflops", "mobajax paged_prefill (Triton)"), ("mosaic_tflops", "mobajax paged_prefill_mosaic"),
            ("peer_tflops", "cuDNN dense causal"), ("jax_mha_tflops", "jax Pallas mha"))
    for i, (key, label) in enumerate(bars):
        axes[1].bar(x + (i - 1.5) * 0.2, [r.get(key, 0.0) for r in pre], 0.2, label=label)
    axes[1].set_xticks(x, [r["case"] for r in pre], fontsize=8)
    axes[1].set_ylabel("TFLOP/s")
    axes[1].set_title("prefill, batch 1")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m mobajax.bench kernels")
    parser.add_argument("--out", default="bench-out", help="folder for kernels.json and kernels.png")
    parser.add_argument("--quick", action="store_true", help="two decode cases, one prefill")
    parser.add_argument(
        "--only", choices=("decode", "prefill", "write"), action="append", help="suites to run"
    )
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        print(f"kernels benchmark needs a GPU (jax backend is {jax.default_backend()!r})")
        return 2
    only = set(args.only or ("decode", "prefill", "write"))
    os.makedirs(args.out, exist_ok=True)
    bandwidth = copy_bandwidth()
    print(f"device {jax.devices()[0].device_kind}; copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    rate = matmul_rate()
    print(f"bf16 matmul 8192^3: {rate / 1e12:.0f} TFLOP/s")
    rows = []
    if "decode" in only:
        rows += bench_decode(bandwidth, args.quick)
    if "prefill" in only:
        rows += bench_prefill(rate, args.quick)
    if "write" in only:
        rows += bench_write(bandwidth)
    meta = dict(
        device=jax.devices()[0].device_kind,
        date=datetime.date.today().isoformat(),
        jax=jax.__version__,
        python=platform.python_version(),
        copy_bandwidth_bytes_per_s=bandwidth,
        matmul_flops_per_s=rate,
    )
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    try:
        plot(rows, os.path.join(args.out, "kernels.png"))
    except ImportError:
        print("matplotlib not installed: no PNG written")
    return 0
