"""Load generators that feed one role at a set rate (benchmarks and load tests)."""
