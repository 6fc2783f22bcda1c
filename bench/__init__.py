"""Benchmarks and the evaluation runner; run each from the repository's root as ``python -m bench.<name>``."""
