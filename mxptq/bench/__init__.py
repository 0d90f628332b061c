"""Benchmarks: scripts that measure and print tables (run with `python -m mxptq.bench.NAME`)."""
