"""Prometheus exposition: per-probe metric families and rendering, the exporter's internals."""
