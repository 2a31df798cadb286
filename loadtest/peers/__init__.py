"""Peers for the benchmark: other workers that do memory-worker's job, to measure it against."""
