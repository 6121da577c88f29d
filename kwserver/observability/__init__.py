"""Observability: Prometheus metrics, psutil memory views, and the master's small HTTP endpoints."""
