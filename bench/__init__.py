"""Benchmarks (run as scripts: ``python bench/bench_supervision.py --help``)."""
