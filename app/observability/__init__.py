"""Observability: Prometheus metrics and their listeners, the status snapshot, Flower's queue list."""
