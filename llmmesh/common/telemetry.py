"""Logging, tracing and metrics set-up shared by every service.

- Logs: one JSON object per line with the current request id (a context variable set by the
  servicers), trace id when a span is active.
- Traces: OpenTelemetry SDK, OTLP/gRPC exporter when an endpoint is configured; W3C trace context
  travels in gRPC metadata (`traceparent`, `tracestate`).
- Metrics: prometheus_client's default registry served over HTTP.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from prometheus_client import start_http_server

request_id_var: ContextVar[str] = ContextVar("request_id", default="")

_RESERVED = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid:
            out["request_id"] = rid
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            out["trace_id"] = f"{span.trace_id:032x}"
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        rid = request_id_var.get()
        base = super().format(record)
        return f"{base} [request_id={rid}]" if rid else base


def setup_logging(service: str, level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if as_json else TextFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def setup_tracing(service: str, otlp_endpoint: str | None, sample_ratio: float) -> TracerProvider:
    """Install a tracer provider; spans are exported only when an OTLP endpoint is set."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"llmmesh-{service}"}),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
    )
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    trace.set_tracer_provider(provider)
    return provider


def inject_trace_metadata(metadata: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Append W3C trace context of the current span to outgoing gRPC metadata."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    metadata.extend(carrier.items())
    return metadata


def extract_trace_context(
    metadata: Iterable[tuple[str, str | bytes]] | None,
) -> otel_context.Context:
    """Context carrying the caller's span, from incoming gRPC metadata."""
    carrier: Mapping[str, str] = {
        k: v
        for k, v in (metadata or ())
        if isinstance(v, str) and k in ("traceparent", "tracestate")
    }
    return propagate.extract(carrier)


def start_metrics_server(host: str, port: int) -> int:
    """Serve the default Prometheus registry; returns the bound port (useful with port 0)."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)


def monotonic_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
