"""`python -m mobajax.bench moba`: MoBA prefill against dense causal attention, in one run.

Peers measured in the same run: cuDNN dense causal attention (`jax.nn.dot_product_attention`,
implementation="cudnn"), torch `flex_attention` with a MoBA block mask (where torch runs; chunks
chosen per 128-query tile, an easier problem than per-token MoBA), and the bf16 matmul rate (the
floor for the FLOPs MoBA must do). Writes moba.json and moba.png under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import time
import zlib

CASES = {  # name: (S, block_size, top_k)
    "8k": (8192, 512, 3),
    "32k": (32768, 512, 3),
    "128k": (131072, 512, 3),
    "1m": (1048576, 4096, 12),
}


def moba_flops(s: int, block: int, top_k: int, heads: int, head_dim: int) -> float:
    """FLOPs of the attention MoBA must do (QK and PV over the selected keys), plain prefill."""
    keys = 0
    for p0 in range(0, s, block):
        n = min(block, s - p0)
        past = min(top_k - 1, p0 // block) * block
        keys += n * past + n * (n + 1) // 2
    return 4.0 * head_dim * heads * keys


def _time(fn, reps: int) -> float:
    """Median seconds of fn() (which blocks until done) after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _matmul_rate(jax, jnp) -> float:
    a = jax.random.normal(jax.random.PRNGKey(0), (8192, 8192), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(1), (8192, 8192), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    return 2 * 8192**3 / _time(lambda: f(a, b).block_until_ready(), 10)


def _flex(s, block, top_k, heads, kv_heads, head_dim, reps):
    """torch flex_attention with per-128-query-tile MoBA block mask; seconds or an error string."""
    try:
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        dev = "cuda"
        g = torch.Generator(device=dev).manual_seed(0)
        tiles, chunks = s // 128, s // block
        own = torch.arange(tiles, device=dev) * 128 // block
        pick = torch.rand(heads, tiles, chunks, device=dev, generator=g)
        pick = torch.where(torch.arange(chunks, device=dev) < own[:, None], pick, -1.0)
        top = pick.topk(min(top_k - 1, chunks), dim=-1)
        table = torch.zeros(heads, tiles, chunks, dtype=torch.bool, device=dev)
        table.scatter_(2, top.indices, top.values >= 0)

        def mask_mod(b, h, q_idx, kv_idx):
            c = kv_idx // block
            own_c = q_idx // block
            return ((c == own_c) & (kv_idx <= q_idx)) | table[h, q_idx // 128, c]

        mask = create_block_mask(mask_mod, 1, heads, s, s, device=dev)
        q = torch.randn(1, heads, s, head_dim, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, kv_heads, s, head_dim, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        flex = torch.compile(flex_attention)

        def run():
            flex(q, k, v, block_mask=mask, enable_gqa=True)
            torch.cuda.synchronize()

        out = _time(run, reps)
        del q, k, v, mask, table
        torch.cuda.empty_cache()
        return out
    except Exception as err:  # noqa: BLE001 - a peer that does not run is reported, not fatal
        return f"{type(err).__name__}: {str(err)[:160]}"


def _case(name, s, block, top_k, args, matmul, jax, jnp):
    from mobajax.moba import moba_attention_reference
    from mobajax.pallas.moba_attention import moba_attention, moba_select

    n, kv, h = args.heads, args.kv_heads, args.head_dim
    ks = jax.random.split(jax.random.PRNGKey(s), 3)
    q = jax.random.normal(ks[0], (s, n, h), jnp.bfloat16)
    k = jax.random.normal(ks[1], (s, kv, h), jnp.bfloat16)
    v = jax.random.normal(ks[2], (s, kv, h), jnp.bfloat16)
    row = {"case": name, "S": s, "block": block, "top_k": top_k}
    fwd = jax.jit(lambda q, k, v: moba_attention(q, k, v, block_size=block, top_k=top_k))
    gate = jax.jit(lambda q, k: moba_select(q, k, block_size=block, top_k=top_k))
    out = fwd(q, k, v)
    # correctness on the first and last 128 queries against the reference
    err = 0.0
    for lo in (0, s - 128):
        pos = jnp.arange(lo, lo + 128, dtype=jnp.int32)
        ref = moba_attention_reference(q[lo : lo + 128], k, v, block_size=block, top_k=top_k,
                                       q_positions=pos)  # fmt: skip
        got = out[lo : lo + 128].astype(jnp.float32)
        ref = ref.astype(jnp.float32)
        err = max(err, float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)))
    row["rel_err_vs_reference"] = err
    row["moba_s"] = _time(lambda: fwd(q, k, v).block_until_ready(), args.reps)
    row["gate_s"] = _time(lambda: gate(q, k).block_until_ready(), args.reps)
    flops = moba_flops(s, block, top_k, n, h)
    row["moba_tflops"] = flops / row["moba_s"] / 1e12
    row["floor_s"] = flops / matmul
    dense_flops = 4.0 * h * n * s * (s + 1) / 2
    if s <= args.max_cudnn:
        qb, kb, vb = q[None], k[None], v[None]
        dense = jax.jit(
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                         implementation="cudnn")  # fmt: skip
        )
        reps = args.reps if s <= 131072 else 1
        row["cudnn_s"] = _time(lambda: dense(qb, kb, vb).block_until_ready(), reps)
        row["cudnn_tflops"] = dense_flops / row["cudnn_s"] / 1e12
        row["speedup_vs_cudnn"] = row["cudnn_s"] / row["moba_s"]
        # prediction: MoBA's FLOPs at cuDNN's dense rate
        row["predicted_s"] = flops / (row["cudnn_tflops"] * 1e12)
        row["moba_rate_vs_cudnn"] = row["moba_tflops"] / row["cudnn_tflops"]
    del q, k, v, out
    return row


def _png(path, rows):
    """Bar chart of speed-up vs cuDNN: matplotlib when present, else a bare-bones PNG."""
    vals = [(r["case"], r.get("speedup_vs_cudnn", 0.0)) for r in rows]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([c for c, _ in vals], [x for _, x in vals])
        ax.set_ylabel("speed-up vs cuDNN dense causal")
        ax.set_title("MoBA prefill (bf16, heads 32/8, D 128)")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        return
    except ImportError:
        pass
    w, hgt = 60 * max(1, len(vals)), 200
    top = max([x for _, x in vals] + [1.0])
    img = bytearray()
    for y in range(hgt):
        img.append(0)
        for x in range(w):
            i = x // 60
            bar = 10 <= x % 60 < 50 and (hgt - y) <= vals[i][1] / top * (hgt - 10)
            img += b"\x30\x60\xc0" if bar else b"\xff\xff\xff"

    def chunk(tag, data):
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", w, hgt, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(img)))
    with open(path, "wb") as f:
        f.write(data + chunk(b"IEND", b""))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m mobajax.bench moba")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--cases", default="128k,1m", help=f"comma list of {sorted(CASES)}")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-cudnn", type=int, default=1 << 20, help="largest S for the cuDNN peer")
    ap.add_argument("--no-flex", action="store_true")
    args = ap.parse_args(argv)
    names = [c for c in args.cases.split(",") if c]
    bad = [c for c in names if c not in CASES]
    if bad:
        print(f"unknown case(s) {bad}; allowed: {sorted(CASES)}", file=sys.stderr)
        return 2
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.makedirs(args.out, exist_ok=True)
    flex = {}
    if not args.no_flex:
        for name in names:
            s, block, top_k = CASES[name]
            if s <= 131072:
                flex[name] = _flex(s, block, top_k, args.heads, args.kv_heads, args.head_dim,
                                   args.reps)  # fmt: skip
    import jax
    import jax.numpy as jnp

    matmul = _matmul_rate(jax, jnp)
    rows = []
    for name in names:
        s, block, top_k = CASES[name]
        row = _case(name, s, block, top_k, args, matmul, jax, jnp)
        f = flex.get(name)
        if isinstance(f, float):
            row["flex_s"] = f
            row["flex_speedup_vs_cudnn"] = row.get("cudnn_s", math.nan) / f
        elif f is not None:
            row["flex_error"] = f
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "matmul_tflops": matmul / 1e12,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
    }
    try:
        import torch

        meta["torch"] = torch.__version__
    except ImportError:
        pass
    with open(os.path.join(args.out, "moba.json"), "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    _png(os.path.join(args.out, "moba.png"), rows)
    print(f"{meta}")
    hdr = ("case", "moba ms", "gate ms", "cuDNN ms", "x cuDNN", "flex ms", "MoBA TF/s",
           "cuDNN TF/s", "floor ms", "rel err")  # fmt: skip
    print(" | ".join(hdr))
    for r in rows:
        ms = lambda key: f"{r[key] * 1e3:.2f}" if key in r else "-"  # noqa: E731
        print(" | ".join([
            r["case"], ms("moba_s"), ms("gate_s"), ms("cudnn_s"),
            f"{r.get('speedup_vs_cudnn', math.nan):.1f}", ms("flex_s"),
            f"{r['moba_tflops']:.0f}", f"{r.get('cudnn_tflops', math.nan):.0f}", ms("floor_s"),
            f"{r['rel_err_vs_reference']:.1e}",
        ]))  # fmt: skip
    return 0
