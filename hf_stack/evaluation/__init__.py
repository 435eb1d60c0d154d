"""Stage 4, evaluation: the eight benchmarks as data, the lm-eval harness run and the prefix-sharing scorer."""
