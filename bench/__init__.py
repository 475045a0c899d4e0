"""Benchmarks: `make bench` (python -m bench). They print tables; none is a timed test."""
