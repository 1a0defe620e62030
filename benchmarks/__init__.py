"""Benchmarks and the `radixkv` command, installed as `radixkv.benchmarks` (needs the `hf` extra)."""
