"""Metrics, per-call log lines, the store's health, tracing and the JSON log format."""
