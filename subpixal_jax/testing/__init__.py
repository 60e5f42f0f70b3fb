"""Helpers for judging accuracy in tests and benchmarks."""
