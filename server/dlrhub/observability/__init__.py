"""Metrics, per-call log lines, tracing and the JSON log format."""
