"""The OpenAI-compatible server, and its CLI.

    python -m mobajax.serve [--model default] [--host 127.0.0.1] [--port 8000] [--api-key KEY] ...

Loads the model, builds the engine (warm-up compiles its shape buckets), then serves
/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics, /tokenize and /detokenize
with uvicorn. Binds 127.0.0.1 unless told otherwise (pass --host 0.0.0.0 to listen everywhere,
and set --api-key then). Engine flags have vLLM's names.
"""

from __future__ import annotations

import argparse
import os
import sys

from mobajax.models.default_model import cache_dir
from mobajax.models.moba_args import add_moba_arguments, moba_from_args
from mobajax.serving.config import EngineConfig


def _positive_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mobajax.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="HF checkpoint directory, .gguf file or 'default'")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (1-65535; 0 picks a free one)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on API routes")
    p.add_argument("--served-model-name", default=None, help="model name in the API (default: the model's)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="params and KV dtype")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page (8, 16, 32, 64 or 128)")
    p.add_argument("--num-pages", type=_positive_int("--num-pages"), default=None,
                   help="KV pages in the pool (default: sized from --gpu-memory-utilization)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of free GPU memory for the KV pool, in (0, 1]")
    p.add_argument("--max-num-seqs", type=_positive_int("--max-num-seqs"), default=64,
                   help="requests running at once")
    p.add_argument("--max-num-batched-tokens", type=_positive_int("--max-num-batched-tokens"), default=512,
                   help="tokens per engine step")
    p.add_argument("--max-model-len", type=_positive_int("--max-model-len"), default=None,
                   help="prompt + output tokens per request (default: the model's maximum)")
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="turn off prefix caching (on by default)")
    p.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false",
                   help="read each fused decode's tokens before dispatching the next (async is on by default)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip compiling the step buckets at start (they compile on first use)")
    p.add_argument("--compilation-cache-dir", default=os.path.join(cache_dir(), "jax"),
                   help="JAX's persistent compilation cache: a restart reuses the compiled step buckets "
                        "(default: the mobajax cache's jax/ folder; '' turns it off)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn log level")
    p.add_argument("--tensor-parallel-size", type=_positive_int("--tensor-parallel-size"), default=1,
                   help="shard attention heads, MLPs and the KV pool over this many devices")
    p.add_argument("--expert-parallel-size", type=_positive_int("--expert-parallel-size"), default=1,
                   help="spread each MoE layer's experts over this many devices")
    add_moba_arguments(p)
    return p


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, EngineConfig]:
    """Parsed flags and the EngineConfig they describe; bad flags exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    if args.api_key is not None and not args.api_key.strip():
        parser.error("--api-key must not be empty")
    if args.served_model_name is not None and not args.served_model_name.strip():
        parser.error("--served-model-name must not be empty")
    args.moba = moba_from_args(parser, args)
    if args.moba is not None and args.moba.block_size % args.page_size:
        parser.error(f"--moba-block-size ({args.moba_block_size}) must be a multiple of --page-size ({args.page_size})")
    try:
        config = EngineConfig(
            dtype=args.dtype, page_size=args.page_size, num_pages=args.num_pages,
            gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
            enable_prefix_caching=args.enable_prefix_caching, warmup=args.warmup,
            async_scheduling=args.async_scheduling,
            tensor_parallel_size=args.tensor_parallel_size, expert_parallel_size=args.expert_parallel_size,
        )
    except ValueError as err:  # EngineConfig names the field; give the flag's name instead
        field = str(err).split(" ", 1)[0]
        parser.error(f"--{field.replace('_', '-')} {str(err).split(' ', 1)[1]}")
    return args, config


def enable_compilation_cache(path: str) -> None:
    """Persist every compiled program that took >= 1 s under `path` (JAX's compilation cache)."""
    import jax

    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: list[str] | None = None) -> int:
    args, config = parse_args(sys.argv[1:] if argv is None else argv)
    import uvicorn

    from mobajax.serving.async_engine import AsyncEngine
    from mobajax.serving.server import build_app

    if args.compilation_cache_dir:
        enable_compilation_cache(args.compilation_cache_dir)
    try:
        engine = AsyncEngine.from_pretrained(args.model, engine_config=config, moba=args.moba)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this port can use it",
              file=sys.stderr)
    app = build_app(engine, api_key=args.api_key, served_model_name=args.served_model_name)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
