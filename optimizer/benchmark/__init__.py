"""The benchmark: strategies and baselines replayed through the same simulated world (docs/benchmarks.md)."""
