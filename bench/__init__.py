"""Benchmarks, each printing JSON: run from a checkout as `python -m bench.NAME` (bench/*.py says which)."""
