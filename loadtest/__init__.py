"""Benchmark and load scenarios, and the load generator and real servers the tests use too."""
