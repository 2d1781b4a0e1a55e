"""Benchmark scripts: each prints a table with the machine and versions that produced it."""
