"""Stackduck benchmark suite: ``python -m bench.run --help`` (see bench/README.md)."""
