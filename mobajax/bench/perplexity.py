"""Quality of MoBA applied to a model trained with full attention:
`python -m mobajax.bench perplexity --text FILE [--model default] [--moba-block-size 512] [--moba-top-k 3]`.

Perplexity of one long text (up to --max-tokens tokens, one sequence) with full attention, MoBA
in every layer, and hybrid MoBA (the last --hybrid-full-layers layers keep full attention), plus
the perplexity over the tokens past the first two chunks, where MoBA actually drops keys. MoBA is
meant to be trained in (continued pre-training); this measures what it costs without that.
Prints a table, writes perplexity.json and perplexity.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def token_nlls(pretrained, tokens: list[int]) -> np.ndarray:
    """Negative log-likelihood (natural log) of tokens[1:] given their prefixes."""
    from mobajax.models import forward

    logits = forward(pretrained, [tokens[:-1]])[0].astype(np.float64)
    peak = logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[:, 0]
    return log_z - logits[np.arange(len(tokens) - 1), tokens[1:]]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m mobajax.bench perplexity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", required=True, help="a UTF-8 text file")
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--moba-block-size", type=int, default=512)
    parser.add_argument("--moba-top-k", type=int, default=3)
    parser.add_argument("--hybrid-full-layers", type=int, default=3)
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args(argv)
    if args.max_tokens < 2:
        parser.error("--max-tokens must be >= 2")
    try:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        parser.error(f"cannot read --text {args.text}: {err}")

    from mobajax.models import MobaConfig, load_pretrained, with_moba

    try:
        model = load_pretrained(args.model)
        full_layers = tuple(range(-args.hybrid_full_layers, 0))
        variants = {
            "full attention": None,
            "MoBA, all layers": MobaConfig(args.moba_block_size, args.moba_top_k, ()),
            f"MoBA, last {args.hybrid_full_layers} layers full": MobaConfig(
                args.moba_block_size, args.moba_top_k, full_layers
            ),
        }
        tokens = model.tokenizer.encode(text)[: min(args.max_tokens, model.config.max_position_embeddings)]
        rows = []
        tail = 2 * args.moba_block_size  # from here on, MoBA can leave chunks out
        for name, moba in variants.items():
            start = time.perf_counter()
            nll = token_nlls(with_moba(model, moba), tokens)
            rows.append({
                "variant": name, "ppl": float(np.exp(nll.mean())),
                "ppl_past_two_chunks": float(np.exp(nll[tail:].mean())) if len(nll) > tail else None,
                "seconds": time.perf_counter() - start,
            })
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}")
        return 2
    result = {"model": args.model, "text": os.path.basename(args.text), "tokens": len(tokens),
              "block_size": args.moba_block_size, "top_k": args.moba_top_k, "date": time.strftime("%Y-%m-%d"),
              "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "perplexity.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"{args.model} on {result['text']} ({len(tokens)} tokens), "
          f"MoBA block {args.moba_block_size}, top-{args.moba_top_k}")
    print(f"{'variant':<34}{'ppl':>9}{'ppl past 2 chunks':>20}")
    for r in rows:
        past = f"{r['ppl_past_two_chunks']:.3f}" if r["ppl_past_two_chunks"] else "-"
        print(f"{r['variant']:<34}{r['ppl']:>9.3f}{past:>20}")
    _plot(rows, os.path.join(args.out, "perplexity.png"))
    return 0


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh([r["variant"] for r in rows], [r["ppl"] for r in rows], color="tab:blue")
    ax.set_xlabel("perplexity (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
