"""Builders of synthetic fixtures (random-weight tiny checkpoints, tiny tokenizers) for tests and benchmarks."""
