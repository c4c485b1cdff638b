"""Sampling the kernel's view while load runs: the collector."""
