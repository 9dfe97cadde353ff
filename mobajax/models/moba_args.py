"""Command-line flags for MoBA attention, shared by `mobajax.generate` and `mobajax.serve`."""

from __future__ import annotations

import argparse

from mobajax.models.config import MobaConfig

DEFAULTS = MobaConfig()


def add_moba_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("MoBA block-sparse attention")
    group.add_argument("--attention", choices=["full", "moba"], default="full", help="attention of the model's layers")
    group.add_argument("--moba-block-size", type=int, default=DEFAULTS.block_size, help="keys per MoBA chunk")
    group.add_argument("--moba-top-k", type=int, default=DEFAULTS.top_k, help="chunks per query, its own included")
    group.add_argument(
        "--moba-full-attn-layers",
        default=",".join(map(str, DEFAULTS.full_attention_layers)),
        help="comma-separated layers that keep full attention, negative = from the end, '' = none "
        "(write negative lists with '=': --moba-full-attn-layers=-3,-2,-1)",
    )
    group.add_argument("--moba-decode", action="store_true", help="MoBA for decode steps too (default: full)")


def moba_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> MobaConfig | None:
    """The MobaConfig the flags ask for (None for full attention); bad values end in parser.error."""
    if args.attention == "full":
        return None
    try:
        text = args.moba_full_attn_layers.strip()
        layers = tuple(int(x) for x in text.split(",")) if text else ()
    except ValueError:
        parser.error(f"--moba-full-attn-layers must be comma-separated integers, got {args.moba_full_attn_layers!r}")
    try:
        return MobaConfig(args.moba_block_size, args.moba_top_k, layers, args.moba_decode)
    except ValueError as err:
        parser.error(str(err))
