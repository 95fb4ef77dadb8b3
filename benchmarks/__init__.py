"""Benchmarks (`python -m benchmarks.<name>`); results land in benchmarks/results/."""
