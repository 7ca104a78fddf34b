"""Benchmarks. A package so that ``python -m bench.fidelity.run`` works from the repository root;
the single-file benchmarks beside it still run as scripts (``python bench/bench_masks.py``)."""
