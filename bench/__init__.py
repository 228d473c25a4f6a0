"""Benchmarks: figures to steer by, never timed tests."""
