"""Benchmarks: `make bench` (python -m benchmarks.run) writes docs/benchmarks.md."""
