"""MoE benchmarks: `python -m mobajax.bench moe [--out DIR] [--layers N] [--smoke]`.

1. Grouped matmul on Mixtral- and Qwen3-MoE-shaped expert GEMMs (bf16, equal groups and one
   random split): mobajax's Mosaic GPU and Triton kernels against `jax.lax.ragged_dot` and the
   dense batched einsum [E, M/E, K] x [E, K, N] (equal groups only), with the bf16 matmul rate of
   the same run as the ceiling.
2. The experts of one Qwen3-30B-A3B-shaped MoE layer for 1 and 4 tokens: the per-assignment decode
   kernels (`moe_decode`, a config sweep) against the grouped path and the chosen experts' bytes.
3. One decode step of a Qwen3-30B-A3B-shaped random model (D 2048, heads 32/4, 128 experts, top-8,
   F 768; `--layers` of its 48 layers) against its memory floor: bytes of the weights a step reads
   (attention, routers, the distinct experts the batch's random tokens are routed to in that
   step, embeddings row, LM head)
   plus the KV read, over the copy bandwidth measured in the same run. The step is laid out as
   the serving engine's: a flat batch over a page pool, donated and updated in place.
4. With several devices: prefill throughput of that model on one device against expert
   parallelism over all of them (tokens split over the same devices around the MoE layers).
Prints a table, writes moe.json and moe.png to --out. `--smoke` runs tiny shapes (CPU: the
reference paths only) to check the script.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

from mobajax.bench.kernels import copy_bandwidth, matmul_rate, rel_err, timeit
from mobajax.pallas.grouped_matmul import (
    GroupedMatmulConfig,
    GroupedMatmulMosaicConfig,
    grouped_matmul,
    grouped_matmul_mosaic,
)
from mobajax.pallas.moe_decode import MoeDecodeConfig

DTYPE = jnp.bfloat16
# (name, experts, K, N, rows, equal groups)
GEMM_CASES = (
    ("mixtral prefill w1", 8, 4096, 14336, 16384, True),
    ("mixtral prefill w1 random", 8, 4096, 14336, 16384, False),
    ("mixtral prefill w2", 8, 14336, 4096, 16384, True),
    ("qwen3-moe prefill gate", 128, 2048, 768, 32768, True),
    ("qwen3-moe prefill down", 128, 768, 2048, 32768, True),
)
SMOKE_CASES = (("smoke", 4, 64, 128, 256, True), ("smoke random", 4, 64, 128, 256, False))
MOSAIC_CONFIGS = (
    GroupedMatmulMosaicConfig(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=2),
    GroupedMatmulMosaicConfig(block_m=128, block_n=256, block_k=64, max_concurrent_steps=3, grid_block_n=1),
    GroupedMatmulMosaicConfig(block_m=128, block_n=128, block_k=64, max_concurrent_steps=5, grid_block_n=4),
    GroupedMatmulMosaicConfig(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=2,
                              skip_empty=False),
)
TRITON_CONFIGS = (GroupedMatmulConfig(), GroupedMatmulConfig(block_m=128, block_n=128, block_k=64, num_warps=8))
MOE_DECODE_CONFIGS = (
    MoeDecodeConfig(),
    MoeDecodeConfig(block_f=256, splits=4),
    MoeDecodeConfig(block_f=64),
    MoeDecodeConfig(splits=16),
    MoeDecodeConfig(splits=4),
    MoeDecodeConfig(block_d=128, down_splits=1),
    MoeDecodeConfig(down_splits=4),
    MoeDecodeConfig(block_d=32, down_splits=4),
    MoeDecodeConfig(chunk=64),
    MoeDecodeConfig(chunk=16),
    MoeDecodeConfig(num_stages=4),
    MoeDecodeConfig(num_warps=2),
)


def _group_sizes(rows: int, experts: int, equal: bool) -> jax.Array:
    if equal:
        return jnp.full((experts,), rows // experts, jnp.int32)
    cuts = np.sort(np.random.default_rng(0).integers(0, rows, experts - 1))
    return jnp.asarray(np.diff(np.r_[0, cuts, rows]), jnp.int32)


def _best(fn_by_config, *args) -> tuple[float, object, jax.Array]:
    best = (float("inf"), None, None)
    for config, fn in fn_by_config:
        try:
            seconds = timeit(fn, *args, iters=5, reps=3)
        except Exception as err:  # a config over the shared memory budget: skip it
            print(f"  {config}: {type(err).__name__}: {str(err)[:120]}", flush=True)
            continue
        if seconds < best[0]:
            best = (seconds, config, fn(*args))
    return best


def bench_gemm(cases, peak: float, on_gpu: bool) -> list[dict]:
    rows = []
    for name, e, k, n, m, equal in cases:
        keys = jax.random.split(jax.random.key(0), 2)
        lhs = jax.random.normal(keys[0], (m, k), DTYPE)
        rhs = (jax.random.normal(keys[1], (e, k, n), jnp.float32) / np.sqrt(k)).astype(DTYPE)
        sizes = _group_sizes(m, e, equal)
        flops = 2 * m * k * n
        ragged = jax.jit(lambda x, w, g: jax.lax.ragged_dot(x, w, g))
        expected = ragged(lhs, rhs, sizes)
        row = {"kernel": "grouped_matmul", "case": f"{name} E{e} K{k} N{n} M{m}",
               "ragged_dot_ms": timeit(ragged, lhs, rhs, sizes, iters=5, reps=3) * 1e3}
        if equal:
            dense = jax.jit(lambda x, w: jnp.einsum("egk,ekn->egn", x.reshape(e, m // e, k), w).reshape(m, n))
            row["dense_einsum_ms"] = timeit(dense, lhs, rhs, iters=5, reps=3) * 1e3
        if on_gpu:
            seconds, config, out = _best(
                [(c, jax.jit(lambda x, w, g, c=c: grouped_matmul_mosaic(x, w, g, config=c))) for c in MOSAIC_CONFIGS
                 if n % (c.block_n * c.grid_block_n) == 0], lhs, rhs, sizes)
            if config is not None:
                row.update(mosaic_ms=seconds * 1e3, mosaic_config=str(config), mosaic_rel_err=rel_err(out, expected))
            seconds, config, out = _best(
                [(c, jax.jit(lambda x, w, g, c=c: grouped_matmul(x, w, g, config=c))) for c in TRITON_CONFIGS],
                lhs, rhs, sizes)
            if config is not None:
                row.update(triton_ms=seconds * 1e3, triton_config=str(config), triton_rel_err=rel_err(out, expected))
        for key in [k for k in row if k.endswith("_ms")]:
            row[key.replace("_ms", "_tflops")] = flops / (row[key] * 1e-3) / 1e12
        row["matmul_peak_tflops"] = peak / 1e12
        rows.append(row)
        print_row(row)
    return rows


def qwen3_30b_config(layers: int, impl: str, smoke: bool):
    from mobajax.models.config import ModelConfig, MoEConfig, RopeConfig

    if smoke:
        dims = dict(vocab_size=256, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16)
        moe = MoEConfig(num_experts=8, top_k=2, intermediate_size=32, norm_topk_prob=True,
                        layers=(True,) * layers, impl=impl)
    else:
        dims = dict(vocab_size=151936, hidden_size=2048, num_heads=32, num_kv_heads=4, head_dim=128)
        moe = MoEConfig(num_experts=128, top_k=8, intermediate_size=768, norm_topk_prob=True,
                        layers=(True,) * layers, impl=impl)
    return ModelConfig(architecture="Qwen3MoeForCausalLM", family="llama", intermediate_size=6144,
                       num_layers=layers, rms_norm_eps=1e-6, max_position_embeddings=40960,
                       rope=RopeConfig(theta=1e6), qk_norm=True, moe=moe, **dims)


def floor_bytes(config, params, batch: int, context: int, expert_fraction: float) -> float:
    """Bytes one decode step must read: every non-expert weight but the embedding table (one row
    per token instead), `expert_fraction` of the expert weights (the distinct experts the batch's
    tokens were routed to, over all experts, averaged over the layers) and the KV cache."""
    sizes = jax.tree_util.tree_map_with_path(lambda p, x: (jax.tree_util.keystr(p), x.nbytes), params)
    total = 0.0
    for path, nbytes in jax.tree.leaves(sizes, is_leaf=lambda x: isinstance(x, tuple)):
        if "experts" in path:
            total += nbytes * expert_fraction
        elif "embed" in path:
            total += batch * config.hidden_size * 2
        else:
            total += nbytes
    kv = 2 * config.num_layers * batch * context * config.num_kv_heads * config.head_dim * 2
    return total + kv


def paged_decode_inputs(config, batch: int, context: int, page_size: int = 16):
    """One decode token per sequence after `context` cached ones, laid out as the serving engine
    lays a decode step out: a flat batch over a zeroed page pool (sequence b on pages
    b * P_max ... (b + 1) * P_max - 1) -> (tokens [B], (positions [B], metadata), pools:
    (k, v, None) per layer, k/v pages [P, G, K, H]), the arguments of `paged_step`."""
    from mobajax.attention import PagedMetadata

    p_max = context // page_size + 1
    shape = (batch * p_max, page_size, config.num_kv_heads, config.head_dim)
    table = jnp.arange(batch * p_max, dtype=jnp.int32).reshape(batch, p_max)
    meta = PagedMetadata(
        slots=table[:, context // page_size] * page_size + context % page_size,
        page_table=table,
        cu_q_lens=jnp.arange(batch + 1, dtype=jnp.int32),
        kv_lens=jnp.full((batch,), context + 1, jnp.int32),
        token_seq=jnp.arange(batch, dtype=jnp.int32),
        decode=True,
    )
    # distinct random tokens: identical ones would all route to the same experts
    tokens = jax.random.randint(jax.random.key(batch), (batch,), 0, config.vocab_size, jnp.int32)
    positions = jnp.full((batch,), context, jnp.int32)
    pools = tuple((jnp.zeros(shape, DTYPE), jnp.zeros(shape, DTYPE), None) for _ in range(config.num_layers))
    return tokens, (positions, meta), pools


def paged_step(module, params, tokens, inputs, pools):
    """One decode step over `paged_decode_inputs`, the engine's `paged_forward` -> (logits, pools)."""
    from mobajax.serving.model_runner import paged_forward

    positions, meta = inputs
    return paged_forward(module, params, pools, tokens, positions, meta, None)


def routed_expert_fraction(module, params, tokens, inputs, pools) -> float:
    """Distinct experts the step's tokens are routed to, over all experts, averaged over layers."""
    from mobajax.attention import PagedKVCache

    positions, meta = inputs
    caches = tuple(PagedKVCache(k, v, meta) for k, v, _ in pools)
    _, state = module.apply({"params": params}, tokens[None], positions[None], caches, mutable=["intermediates"])
    chosen = jax.tree.leaves(state["intermediates"])  # one [B, top_k] per MoE layer
    e = module.config.moe.num_experts
    return float(np.mean([len(np.unique(np.asarray(c))) / e for c in chosen]))


def random_params(module) -> dict:
    """Random bf16 params of `module` (normal, std 0.02), one leaf at a time (no jitted init)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), tokens, tokens)["params"])
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [(jax.random.normal(k, s.shape, jnp.float32) * 0.02).astype(DTYPE)
                                     for k, s in zip(keys, leaves)])


def bench_expert_parallel(layers: int, smoke: bool, on_gpu: bool) -> list[dict]:
    """Prefill throughput (last-token logits) of the Qwen3-30B-A3B-shaped model on one device
    against expert parallelism over all devices: experts split over `expert`, the batch split over
    the same devices around the MoE layers (`expert_parallel_experts`)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from mobajax.models.llama import Decoder
    from mobajax.parallel import check_parallel, make_mesh, shard_params

    n = jax.device_count()
    if n < 2:
        print(f"expert parallelism needs >= 2 devices, found {n}: skipped", flush=True)
        return []
    rows = []
    config = qwen3_30b_config(layers, "pallas" if on_gpu else "xla", smoke)  # Triton: faster at F 768
    mesh = make_mesh(expert=n)
    check_parallel(config, mesh)
    single, parallel = Decoder(config, DTYPE), Decoder(config, DTYPE, mesh)
    params = jax.device_put(random_params(single), jax.devices()[0])
    sharded = shard_params(params, mesh)
    batch, length = (2 * n, 16) if smoke else (8 * n, 2048)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch, length)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    last = jnp.asarray([length - 1], jnp.int32)
    case = f"qwen3-30b-a3b shape, {layers} layers, prefill {batch} x {length}, {n} devices"
    row = {"kernel": "expert_parallel", "case": case}
    outs = {}
    for name, module, p, where in (
        ("one_device", single, params, jax.devices()[0]),
        ("expert_parallel", parallel, sharded, NamedSharding(mesh, PartitionSpec("expert"))),
    ):
        step = jax.jit(lambda p, t, pos, m=module: m.apply({"params": p}, t, pos, None, last)[0])
        t, pos = jax.device_put(tokens, where), jax.device_put(positions, where)
        outs[name] = step(p, t, pos)
        seconds = timeit(step, p, t, pos, iters=3, reps=3)
        row[f"{name}_ms"] = seconds * 1e3
        row[f"{name}_tok_s"] = batch * length / seconds
    row["speedup"] = row["expert_parallel_tok_s"] / row["one_device_tok_s"]
    row["rel_err"] = rel_err(np.asarray(outs["expert_parallel"]), np.asarray(outs["one_device"]))
    rows.append(row)
    print_row(row)
    return rows


def bench_expert_decode(bandwidth: float, smoke: bool, on_gpu: bool, sets: int = 16) -> list[dict]:
    """One MoE layer's experts for a few tokens (Qwen3-30B-A3B shape): the per-assignment decode
    kernels (`moe_decode`, each of MOE_DECODE_CONFIGS) against the grouped path, and the floor:
    the distinct chosen experts' weights over the copy bandwidth. One timed call runs `sets`
    different expert choices back to back (as a step's layers do), so neither the host's
    dispatch nor weights left in L2 by the previous call flatter the figure."""
    from mobajax.models.moe import grouped_experts
    from mobajax.pallas.moe_decode import moe_decode, moe_decode_reference

    e, d, f, k = (8, 64, 32, 2) if smoke else (128, 2048, 768, 8)
    rng = np.random.default_rng(0)
    gate, up = (jnp.asarray(rng.standard_normal((e, d, f)) * 0.02, DTYPE) for _ in range(2))
    down = jnp.asarray(rng.standard_normal((e, f, d)) * 0.02, DTYPE)

    def over_sets(fn):
        return jax.jit(lambda x, w, chosen, *weights: [fn(x, w, chosen[i], *weights) for i in range(sets)])

    rows = []
    for n in (1, 4):
        x = jnp.asarray(rng.standard_normal((n, d)), DTYPE)
        chosen = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(n)]) for _ in range(sets)])
        weights = jnp.asarray(rng.dirichlet(np.ones(k), n), jnp.float32)
        args = (x, weights, jnp.asarray(chosen, jnp.int32), gate, up, down)
        distinct = float(np.mean([len(np.unique(c)) for c in chosen]))
        floor = distinct * 3 * d * f * 2 / bandwidth
        shape = "smoke" if smoke else "qwen3-30b-a3b"
        case = f"{shape} experts, {n} tokens x top-{k}, {distinct:.1f} experts"
        row = {"kernel": "expert_decode", "case": case, "floor_us": floor * 1e6}
        grouped = functools.partial(grouped_experts, impl="pallas" if on_gpu else "xla")
        row["grouped_us"] = timeit(over_sets(grouped), *args) / sets * 1e6
        want = moe_decode_reference(x, weights, args[2][0], gate, up, down)
        sweep = []
        for config in MOE_DECODE_CONFIGS if on_gpu else MOE_DECODE_CONFIGS[:1]:
            fn = functools.partial(moe_decode, config=config, interpret=not on_gpu)
            sweep.append((timeit(over_sets(fn), *args) / sets, config, fn))
        seconds, config, fn = min(sweep, key=lambda r: r[0])
        row["decode_us"] = seconds * 1e6
        row["decode_x_floor"] = seconds / floor
        row["grouped_x_floor"] = row["grouped_us"] * 1e-6 / floor
        row["decode_rel_err"] = rel_err(fn(x, weights, args[2][0], gate, up, down), want)
        row["decode_config"] = dataclasses.asdict(config)
        row["decode_sweep"] = [[dataclasses.asdict(c), t * 1e6] for t, c, _ in sweep]
        rows.append(row)
        print_row(row)
    return rows


def time_decode(step, params, token, position, caches, iters: int = 10, reps: int = 3) -> float:
    """Seconds per decode step (`timeit`) of `step(params, token, position, caches) -> (logits,
    caches)`, feeding each call the caches the previous one returned (they are donated)."""
    state = [caches]

    def call():
        logits, state[0] = step(params, token, position, state[0])
        return logits

    return timeit(call, iters=iters, reps=reps)


def chained_steps(module, num_steps: int):
    """`num_steps` decode steps in one jitted call, as the engine chains them (fori_loop over
    `paged_step`, the same tokens each step) -> step(params, tokens, inputs, pools) ->
    (sum of the steps' first logits, pools); pools donated."""

    def chain(params, tokens, inputs, pools):
        def body(i, carry):
            pools, acc = carry
            logits, pools = paged_step(module, params, tokens, inputs, pools)
            return pools, acc + logits[0, 0]

        pools, acc = jax.lax.fori_loop(0, num_steps, body, (pools, jnp.float32(0)))
        return acc, pools

    return jax.jit(chain, donate_argnums=(3,))


def bench_decode(layers: int, bandwidth: float, smoke: bool, on_gpu: bool, chain: int = 8) -> list[dict]:
    """The engine's decode step (paged KV pool, donated and updated in place) for each impl: "xla"
    (XLA attention, `lax.ragged_dot` experts) and, on a GPU, the kernels ("pallas": Triton
    paged_decode and MoE kernels; "mosaic": Mosaic grouped matmul), one step per call and, for the
    kernels, `chain` steps per call as the engine runs them."""
    from mobajax.models.llama import Decoder

    rows = []
    context = 64 if smoke else 2048
    impls = ("xla", "pallas", "mosaic") if on_gpu else ("xla",)
    base = qwen3_30b_config(layers, "xla", smoke)
    module = Decoder(base, DTYPE)
    params = random_params(module)
    for batch in (1, 32) if not smoke else (1, 4):
        token, inputs, pools = paged_decode_inputs(base, batch, context)
        fraction = routed_expert_fraction(module, params, token, inputs, pools)
        floor = floor_bytes(base, params, batch, context, fraction) / bandwidth
        row = {"kernel": "decode_step", "case": f"qwen3-30b-a3b shape, {layers} layers, batch {batch}, ctx {context}",
               "floor_ms": floor * 1e3, "experts_read_fraction": fraction}
        for impl in impls:
            config = dataclasses.replace(
                base, attention_impl="xla" if impl == "xla" else "pallas",
                moe=dataclasses.replace(base.moe, impl=impl),
            )
            step = jax.jit(functools.partial(paged_step, Decoder(config, DTYPE)), donate_argnums=(3,))
            try:
                seconds = time_decode(step, params, token, inputs, paged_decode_inputs(base, batch, context)[2])
            except Exception as err:
                print(f"  decode {impl}: {type(err).__name__}: {str(err)[:160]}", flush=True)
                continue
            row[f"{impl}_ms"] = seconds * 1e3
            row[f"{impl}_x_floor"] = seconds / floor
            if impl != "xla":  # the engine's way: `chain` steps per call, no host dispatch between
                chained = chained_steps(Decoder(config, DTYPE), chain)
                seconds = time_decode(
                    chained, params, token, inputs, paged_decode_inputs(base, batch, context)[2]
                ) / chain
                row[f"{impl}_chain{chain}_ms"] = seconds * 1e3
                row[f"{impl}_chain{chain}_x_floor"] = seconds / floor
        rows.append(row)
        print_row(row)
    return rows


def print_row(row: dict) -> None:
    cells = [f"{k}={v:.3g}" for k, v in row.items() if isinstance(v, float)]
    print(f"{row['kernel']:15s} {row['case']:48s} " + " ".join(cells), flush=True)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gemm = [r for r in rows if r["kernel"] == "grouped_matmul"]
    fig, ax = plt.subplots(figsize=(11, 4))
    x = np.arange(len(gemm))
    for i, key in enumerate(("mosaic_tflops", "triton_tflops", "ragged_dot_tflops", "dense_einsum_tflops")):
        ax.bar(x + (i - 1.5) * 0.2, [r.get(key, 0.0) for r in gemm], 0.2, label=key.replace("_tflops", ""))
    ax.set_xticks(x, [r["case"] for r in gemm], fontsize=6)
    ax.set_ylabel("TFLOP/s")
    ax.set_title("grouped matmul, bf16")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m mobajax.bench moe")
    parser.add_argument("--out", default="bench-out", help="folder for moe.json and moe.png")
    parser.add_argument("--layers", type=int, default=8, help="layers of the Qwen3-30B-A3B-shaped model (of 48)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (runs on CPU)")
    parser.add_argument("--only", choices=("gemm", "experts", "decode", "ep"), action="append", help="parts to run")
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error(f"--layers must be >= 1, got {args.layers}")
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.smoke:
        print(f"the moe benchmark needs a GPU (jax backend is {jax.default_backend()!r}); --smoke runs on CPU")
        return 2
    only = set(args.only or ("gemm", "experts", "decode", "ep"))
    os.makedirs(args.out, exist_ok=True)
    bandwidth, peak = copy_bandwidth(), matmul_rate()
    print(f"device {jax.devices()[0].device_kind}; copy bandwidth {bandwidth / 1e12:.2f} TB/s; "
          f"bf16 matmul {peak / 1e12:.0f} TFLOP/s", flush=True)
    rows = []
    if "gemm" in only:
        rows += bench_gemm(SMOKE_CASES if args.smoke else GEMM_CASES, peak, on_gpu)
    if "experts" in only:
        rows += bench_expert_decode(bandwidth, args.smoke, on_gpu)
    if "decode" in only:
        rows += bench_decode(args.layers, bandwidth, args.smoke, on_gpu)
    if "ep" in only:
        rows += bench_expert_parallel(args.layers, args.smoke, on_gpu)
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat(), "copy_bandwidth": bandwidth, "matmul_flops": peak}
    with open(os.path.join(args.out, "moe.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    plot(rows, os.path.join(args.out, "moe.png"))
    return 0
