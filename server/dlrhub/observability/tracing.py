"""Tracing: OpenTelemetry's gRPC instrumentation, off unless DLRHUB_TRACING is `console` or `otlp`.

The OTLP exporter reads the standard OTEL_EXPORTER_OTLP_* variables; the service
is named by OTEL_SERVICE_NAME (or service.name in OTEL_RESOURCE_ATTRIBUTES), and
"dlrhub" when neither says. A call's
log line carries its trace id (calls.CallLog); the log formatter adds the
current trace id to any other line logged inside a traced call (logs.py).
"""

from __future__ import annotations

import grpc
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor


def tracing_interceptor(mode: str) -> grpc.aio.ServerInterceptor | None:  # type: ignore[type-arg]
    """OpenTelemetry's server interceptor exporting to the console or OTLP; None when off."""
    if mode in ("", "off"):
        return None
    interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(tracer_provider=_provider(mode))  # type: ignore[type-arg, no-untyped-call]
    return interceptor


def _provider(mode: str) -> TracerProvider:
    provider = TracerProvider(resource=_resource())
    if mode == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    elif mode == "otlp":
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        raise ValueError(f"DLRHUB_TRACING must be off, console or otlp, not {mode!r}")
    return provider


def _resource() -> Resource:
    """The SDK's resource (it reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES), named "dlrhub"
    where they name no service (the SDK's default is "unknown_service")."""
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "dlrhub"}))
    return resource


def current_trace_id() -> str | None:
    """The trace id of the span being served, as 32 hex digits, if tracing is on."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None
