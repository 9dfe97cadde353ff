"""Benchmarks: `python -m mobajax.bench <suite> ...` (each suite is a module with `main(argv)`)."""
