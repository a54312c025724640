"""Benchmarks (not collected by pytest): see run_all.py."""
