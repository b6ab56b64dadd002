"""OpenTelemetry tracing configured only from the standard OTEL_* variables.

W3C trace context rides in NATS message headers: `inject()` before publishing,
`extract(msg)` in the handler, so one request is one trace across all services.
"""

from __future__ import annotations

import os

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

_provider: TracerProvider | None = None


def setup_tracing(role: str, instance_id: str) -> None:
    """Idempotent. Exports over OTLP/HTTP when an OTLP endpoint is configured."""
    global _provider
    if _provider is not None:
        return
    resource = Resource.create(
        {
            "service.name": os.environ.get("OTEL_SERVICE_NAME", f"hetserve-{role}"),
            "service.instance.id": instance_id,
        }
    )
    _provider = TracerProvider(resource=resource)
    exporter_names = os.environ.get("OTEL_TRACES_EXPORTER", "otlp")
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if "otlp" in exporter_names and endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if "console" in exporter_names:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        _provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(_provider)


def shutdown_tracing() -> None:
    if _provider is not None:
        _provider.shutdown()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers carrying the current span's context."""
    headers = dict(headers or {})
    propagate.inject(headers)
    return headers


def extract(headers: dict[str, str] | None) -> context.Context:
    return propagate.extract(headers or {})
