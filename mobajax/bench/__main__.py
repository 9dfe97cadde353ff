"""Entry point: `python -m mobajax.bench <suite> [args]`; each suite writes a table, JSON and a PNG."""

import importlib
import sys

SUITES = ("kernels", "moba", "serve", "throughput", "moe", "perplexity", "profile")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in SUITES:
        print(f"usage: python -m mobajax.bench {{{','.join(SUITES)}}} [options]", file=sys.stderr)
        return 2
    try:
        suite = importlib.import_module(f"mobajax.bench.{argv[0]}")
    except ModuleNotFoundError as err:
        if err.name != f"mobajax.bench.{argv[0]}":
            raise
        print(f"benchmark suite {argv[0]!r} is not available in this version", file=sys.stderr)
        return 2
    return suite.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
