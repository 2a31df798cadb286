"""Load tests and benchmarks for memory-worker: `python -m loadtest.bench --help`."""
