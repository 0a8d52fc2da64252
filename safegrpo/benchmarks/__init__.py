"""Benchmark adapters (evaluation issue)."""
