"""Benchmarks of this project: scripts that print cost ratios measured side by side
in one run and rewrite the tables in BENCHMARKS.md. Run ``python bench/run.py [--quick]``."""
