"""`python -m mobajax.bench moba`: MoBA prefill against dense causal attention, in one run.

Peers measured in the same run: cuDNN dense causal attention (`jax.nn.dot_product_attention`,
implementation="cudnn"), torch `flex_attention` with a MoBA block mask (where torch runs; chunks
chosen per 128-query tile, an easier problem than per-token MoBA), and the bf16 matmul rate (the
floor for the FLOPs MoBA must do). Every time is per call over batches of back-to-back calls
(`_time`): the device's time, not the host's dispatch between blocking calls. Writes moba.json and
moba.png under --out.
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


def _time(fn, reps: int, wait=None) -> float:
    """Seconds per call of fn(): median of `reps` batches of back-to-back calls, each batch ended by
    wait(last result) (`kernels.timeit`; default: jax.block_until_ready), so the host's dispatch of
    a call overlaps the device's work on the one before. A batch is at least ~0.1 s and 2-10 calls
    (one call where one takes over a second)."""
    import jax

    from mobajax.bench.kernels import timeit

    wait = wait or jax.block_until_ready
    wait(fn())
    start = time.perf_counter()
    wait(fn())
    single = time.perf_counter() - start
    iters = 1 if single > 1.0 else min(10, max(2, math.ceil(0.1 / single)))
    return timeit(fn, iters=iters, reps=reps, wait=wait)


def _flex(s, block, top_k, heads, kv_heads, head_dim, reps):
    """torch flex_attention with per-128-query-tile MoBA block mask; seconds or an error string."""
    try:
        import torch
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        dev = "cuda"
        g = torch.Generator(device=dev).manual_seed(0)
        tiles, chunks, nb = s // 128, s // block, block // 128
        tile = torch.arange(tiles, device=dev)
        own = tile * 128 // block
        pick = torch.rand(heads, tiles, chunks, device=dev, generator=g)
        pick = torch.where(torch.arange(chunks, device=dev) < own[:, None], pick, -1.0)
        top = pick.topk(min(top_k - 1, chunks), dim=-1)
        blk = torch.arange(nb, device=dev)
        past = (top.indices[..., None] * nb + blk).flatten(-2)  # [heads, tiles, (k-1)*nb]
        past_ok = (top.values[..., None] >= 0).expand(-1, -1, -1, nb).flatten(-2)
        mine = (own[:, None] * nb + blk).expand(heads, -1, -1)  # own chunk's blocks
        mine_ok = mine < tile[:, None]  # strictly below the diagonal block: full
        idx = torch.cat([past, mine], -1)
        ok = torch.cat([past_ok, mine_ok], -1)
        idx = torch.where(ok, idx, tiles).sort(-1).values.clamp(max=tiles - 1)
        full = torch.zeros(1, heads, tiles, tiles, dtype=torch.int32, device=dev)
        full[..., : idx.shape[-1]] = idx.int()
        diag = torch.zeros(1, heads, tiles, tiles, dtype=torch.int32, device=dev)
        diag[..., 0] = tile.int()

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        mask = BlockMask.from_kv_blocks(
            torch.ones(1, heads, tiles, dtype=torch.int32, device=dev), diag,
            ok.sum(-1).int()[None], full, BLOCK_SIZE=128, mask_mod=causal,
        )  # fmt: skip
        q = torch.randn(1, heads, s, head_dim, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, kv_heads, s, head_dim, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        flex = torch.compile(flex_attention)

        def run():
            return flex(q, k, v, block_mask=mask, enable_gqa=True)

        out = _time(run, reps, wait=lambda _: torch.cuda.synchronize())
        del q, k, v, mask, full, diag
        torch.cuda.empty_cache()
        return out
    except Exception as err:  # noqa: BLE001 - a peer that does not run is reported, not fatal
        return f"{type(err).__name__}: {str(err)[:160]}"


def _check(q, k, v, out, block, top_k, jax, jnp):
    """Selection agreement and attention error on the first and last 128 queries (32 at 1M).

    The attention is checked against the reference run over the kernel's own selection (bf16 gate
    rounding can flip near-tied chunks); flipped rows must be near ties of the float32 gate.
    """
    from mobajax.moba import _gate, chunk_attention, moba_selected_chunks
    from mobajax.pallas.moba_attention import moba_select

    s, n, h = q.shape
    sel = moba_select(q, k, block_size=block, top_k=top_k)
    starts = jnp.arange(-(-s // block), dtype=jnp.int32) * block
    lens = jnp.minimum(block, s - starts)
    agree, err, gap = [], 0.0, 0.0
    m = 128 if s <= 131072 else 32
    piece = max(1, 2**22 // (n * top_k * block))

    @jax.jit
    def attend(qs, pos, mine):
        return chunk_attention(qs, k, v, pos, mine, starts, lens, starts, block_size=block,
                               scale=1 / math.sqrt(h), query_tile=1)  # fmt: skip

    for lo in (0, s - m):
        pos = jnp.arange(lo, lo + m, dtype=jnp.int32)
        qs, mine = q[lo : lo + m], sel[lo : lo + m]
        ref_sel = moba_selected_chunks(qs, k, block_size=block, top_k=top_k, q_positions=pos)
        same = jnp.all(jnp.sort(mine, -1) == jnp.sort(ref_sel, -1), axis=-1)
        agree.append(float(jnp.mean(same)))
        gate = _gate(qs, k, block)
        score = lambda c: jnp.sum(jnp.where(c[..., 1:] >= 0, jnp.take_along_axis(  # noqa: E731
            gate, jnp.maximum(c[..., 1:], 0), -1), 0.0), -1)
        gap = max(gap, float(jnp.max(jnp.abs(score(mine) - score(ref_sel)))))
        ref = jnp.concatenate([attend(qs[i : i + piece], pos[i : i + piece], mine[i : i + piece])
                               for i in range(0, m, piece)])  # fmt: skip
        got = out[lo : lo + m].astype(jnp.float32)
        ref = ref.astype(jnp.float32)
        err = max(err, float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)))
    return {"rel_err_vs_reference": err, "selection_agreement": min(agree),
            "max_gate_gap_of_flips": gap}  # fmt: skip


def pass_stages(q, k, v, block, top_k, config, reps, interpret=False) -> dict:
    """Seconds of each stage of the last token pass of `moba_attention` (the pass whose tokens
    have the most past chunks; one pass unless the partials pass `max_partial_bytes`): the gate
    (`moba_select` work of the pass), the work list, the past-chunk partials, the own chunk plus
    the merge, and the own chunk alone (the finish kernel with no past slots)."""
    import jax
    import jax.numpy as jnp

    from mobajax.pallas import moba_attention as ma

    s, n, h = q.shape
    tiles = ma.tile_config(config, block, h, q.dtype.itemsize)
    step = min(s, ma.pass_tokens(tiles, n, ma.num_slots(top_k, k.shape[0], block), h, q.dtype.itemsize))
    qt, pos = q[s - step:], jnp.arange(s - step, s, dtype=jnp.int32)
    st = ma._Static(block, top_k, 1 / math.sqrt(h), config, interpret)
    st = ma.with_kernels(st, qt, k.shape[1], one_sequence=True)
    layout = ma._prepare(qt, k, v, block, top_k, None, None, pos)
    sel, keys = jax.jit(lambda q, k: ma._selection(st, q, k, layout))(qt, k)
    # what a pass uses of the gate: the Mosaic gate's work-list keys, else the selection
    select = jax.jit(lambda q, k: ma._selection(st, q, k, layout)[0 if keys is None else 1])
    past = sel[..., 1:]

    def finish(sel):
        return jax.jit(lambda q, k, v, partials: ma.own_and_merge(
            q, k, v, layout.token_pos, layout.token_own, sel, layout, partials, st=st, config=tiles))  # fmt: skip

    none = jnp.zeros((1, h), q.dtype), jnp.zeros((1,), jnp.float32)
    own = finish(sel[..., :1])
    own_s = _time(lambda: own(qt, k, v, none), reps)
    stages = {
        "pass_tokens": step,
        "passes": -(-s // step),
        "finish_kernel": "mosaic" if st.mosaic_finish else "triton",
        "partials_kernel": "mosaic" if st.mosaic_partials else "triton",
        "gate_kernel": "mosaic" if st.mosaic_gate else "triton",
        "gate_pass_s": _time(lambda: select(qt, k), reps),
        "work_list_s": 0.0,  # top_k 1: no past chunks, nothing to merge
        "past_partials_s": 0.0,
        "own_chunk_and_merge_s": own_s,
        "own_chunk_only_s": own_s,
    }
    if past.shape[-1]:
        wl = jax.jit(lambda past, keys: ma.past_work(past, k.shape[1], layout, keys, st=st, config=tiles))
        work = wl(past, keys)
        key_tokens = ma.work_key_tokens(step, n // k.shape[1], keys is not None)
        part = jax.jit(lambda q, k, v, work: ma.past_partials(q, k, v, work, past, layout, key_tokens=key_tokens,
                                                              st=st, config=tiles))  # fmt: skip
        partials = part(qt, k, v, work)
        fin = finish(sel)
        stages["work_list_s"] = _time(lambda: wl(past, keys), reps)
        stages["past_partials_s"] = _time(lambda: part(qt, k, v, work), reps)
        stages["own_chunk_and_merge_s"] = _time(lambda: fin(qt, k, v, partials), reps)
    return stages


def _sweep(q, k, v, block, top_k, reps, jax, jnp):
    """Stage times and a few tile configurations; returns (rows, best config)."""
    import dataclasses

    from mobajax.pallas import moba_attention as ma

    cfgs = [
        ma.MobaConfig(),
        ma.MobaConfig(block_q=256, block_k=64, num_warps=8, num_stages=4),
        ma.MobaConfig(block_q=128, block_k=32, num_warps=4, num_stages=3),
        ma.MobaConfig(block_q=128, block_k=64, num_warps=4, num_stages=4),
        ma.MobaConfig(block_q=256, block_k=32, num_warps=8, num_stages=3),
    ]
    out, best = [], (math.inf, cfgs[0])
    for cfg in cfgs:
        f = jax.jit(lambda q, k, v, c=cfg: ma.moba_attention(q, k, v, block_size=block,
                                                           top_k=top_k, config=c))  # fmt: skip
        try:
            t = _time(lambda: f(q, k, v), reps)
        except Exception as err:  # noqa: BLE001
            out.append({"config": str(cfg), "error": str(err)[:200]})
            continue
        out.append({"config": str(cfg), "moba_s": t})
        print(json.dumps(out[-1]), flush=True)
        best = min(best, (t, cfg), key=lambda x: x[0])
    for gq, gw, gs in ((32, 2, 16384), (16, 4, 16384), (64, 8, 32768), (64, 4, 32768), (64, 8, 65536)):
        cfg = dataclasses.replace(best[1], gate_block_q=gq, gate_num_warps=gw, gate_scores=gs)
        g = jax.jit(lambda q, k, c=cfg: ma.moba_select(q, k, block_size=block, top_k=top_k,
                                                      config=c))  # fmt: skip
        row = {"gate_config": f"block_q={gq} warps={gw} scores={gs}"}
        try:  # a large tile can run out of registers at compile time
            row["gate_s"] = _time(lambda: g(q, k), reps)
        except Exception as err:  # noqa: BLE001
            row["error"] = str(err)[:200]
        out.append(row)
        print(json.dumps(row), flush=True)
    stages = pass_stages(q, k, v, block, top_k, best[1], reps)
    out.append(stages)
    print(json.dumps(stages), flush=True)
    return out, best[1]


def _case(name, s, block, top_k, args, matmul, jax, jnp, config):
    from mobajax.pallas.moba_attention import moba_attention, moba_select

    n, kv, h = args.heads, args.kv_heads, args.head_dim
    ks = jax.random.split(jax.random.PRNGKey(s), 3)
    q = jax.random.normal(ks[0], (s, n, h), jnp.bfloat16)
    k = jax.random.normal(ks[1], (s, kv, h), jnp.bfloat16)
    v = jax.random.normal(ks[2], (s, kv, h), jnp.bfloat16)
    row = {"case": name, "S": s, "block": block, "top_k": top_k, "config": str(config)}
    reps = args.reps if s <= 131072 else max(1, args.reps // 2)
    fwd = jax.jit(lambda q, k, v: moba_attention(q, k, v, block_size=block, top_k=top_k,
                                                 config=config))  # fmt: skip
    gate = jax.jit(lambda q, k: moba_select(q, k, block_size=block, top_k=top_k, config=config))
    out = fwd(q, k, v)
    row.update(_check(q, k, v, out, block, top_k, jax, jnp))
    del out
    row["moba_s"] = _time(lambda: fwd(q, k, v), reps)
    row["gate_s"] = _time(lambda: gate(q, k), reps)
    row["gate_share"] = row["gate_s"] / row["moba_s"]
    flops = moba_flops(s, block, top_k, n, h)
    row["moba_tflops"] = flops / row["moba_s"] / 1e12
    row["floor_s"] = flops / matmul
    if args.stages:
        row["stages"] = pass_stages(q, k, v, block, top_k, config, reps)
        print(json.dumps(row["stages"]), flush=True)
    if args.sweep and name == args.sweep:
        row["sweep"], _ = _sweep(q, k, v, block, top_k, reps, jax, jnp)
    dense_flops = 4.0 * h * n * s * (s + 1) / 2
    if s <= args.max_cudnn:
        qb, kb, vb = q[None], k[None], v[None]
        dense = jax.jit(
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                         implementation="cudnn")  # fmt: skip
        )
        reps = args.reps if s <= 131072 else 1
        row["cudnn_s"] = _time(lambda: dense(qb, kb, vb), reps)
        row["cudnn_tflops"] = dense_flops / row["cudnn_s"] / 1e12
        row["speedup_vs_cudnn"] = row["cudnn_s"] / row["moba_s"]
        # prediction: MoBA's FLOPs at cuDNN's dense rate
        row["predicted_s"] = flops / (row["cudnn_tflops"] * 1e12)
        row["moba_rate_vs_cudnn"] = row["moba_tflops"] / row["cudnn_tflops"]
    del q, k, v
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
    ap.add_argument("--sweep", default="", help="case to sweep tile configs and time stages on")
    ap.add_argument("--stages", action="store_true",
                    help="also time the stages of each case's last token pass (gate, work list, "
                         "past partials, own chunk + merge, own chunk alone)")  # fmt: skip
    ap.add_argument("--block-q", type=int, default=0, help="MobaConfig.block_q (0: default)")
    ap.add_argument("--block-k", type=int, default=0)
    ap.add_argument("--num-warps", type=int, default=0)
    ap.add_argument("--num-stages", type=int, default=0)
    ap.add_argument("--gate-block-q", type=int, default=0)
    ap.add_argument("--gate-num-warps", type=int, default=0)
    ap.add_argument("--gate-scores", type=int, default=0, help="MobaConfig.gate_scores (0: default)")
    ap.add_argument("--finish", default="auto", choices=["auto", "triton", "mosaic"],
                    help="MobaConfig.finish: the kernel of the own chunk and the merge")  # fmt: skip
    ap.add_argument("--partials", default="auto", choices=["auto", "triton", "mosaic"],
                    help="MobaConfig.partials: the kernel of the past chunks")  # fmt: skip
    ap.add_argument("--gate", default="auto", choices=["auto", "triton", "mosaic"],
                    help="MobaConfig.gate: the kernel of the gate's selection")  # fmt: skip
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

    from mobajax.bench.kernels import matmul_rate
    from mobajax.pallas.moba_attention import MobaConfig

    knobs = ("block_q", "block_k", "num_warps", "num_stages", "gate_block_q", "gate_num_warps", "gate_scores")
    chosen = {x: getattr(args, x) for x in knobs if getattr(args, x)}
    config = MobaConfig(**chosen, finish=args.finish, partials=args.partials, gate=args.gate)
    matmul = matmul_rate()
    rows = []
    for name in names:
        s, block, top_k = CASES[name]
        row = _case(name, s, block, top_k, args, matmul, jax, jnp, config)
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
           "cuDNN TF/s", "floor ms", "rel err", "sel agree")  # fmt: skip
    print(" | ".join(hdr))
    for r in rows:
        ms = lambda key: f"{r[key] * 1e3:.2f}" if key in r else "-"  # noqa: E731
        print(" | ".join([
            r["case"], ms("moba_s"), ms("gate_s"), ms("cudnn_s"),
            f"{r.get('speedup_vs_cudnn', math.nan):.1f}", ms("flex_s"),
            f"{r['moba_tflops']:.0f}", f"{r.get('cudnn_tflops', math.nan):.0f}", ms("floor_s"),
            f"{r['rel_err_vs_reference']:.1e}", f"{r['selection_agreement']:.4f}",
        ]))  # fmt: skip
    return 0
