"""Benchmarks (`make bench-*`): rates as ratios to ceilings measured in the same run."""
