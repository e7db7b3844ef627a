"""Logging, tracing and metrics set-up shared by every service.

- Logs: one JSON object per line with the current request id (a context variable set by the
  servicers), trace id when a span is active.
- Traces: OpenTelemetry SDK, OTLP/gRPC exporter when an endpoint is configured; W3C trace context
  travels in gRPC metadata (`traceparent`, `tracestate`). Without an endpoint no span is ever
  exported, so none is recorded either (`PropagatingTracerProvider`): spans still get their
  ids in their parent's trace (or a new trace, head-sampled by the ratio), so trace context still
  reaches the next service and the logs, at a few µs per span instead of the SDK's ~60.
- Metrics: prometheus_client's default registry served over HTTP.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    TraceFlags,
)
from opentelemetry.util.types import Attributes
from prometheus_client import start_http_server
from prometheus_client.metrics import MetricWrapperBase

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


class TracingHandle(Protocol):
    def shutdown(self) -> None: ...


class PropagatingTracer(trace.Tracer):
    """Spans that are never recorded but carry trace context like the SDK's: a span's trace id
    and sampled flag are its parent's (the current span, or the one in `context`), a root's trace
    is new and sampled as `sampler` decides; every span gets a fresh span id."""

    def __init__(self, sampler: Sampler) -> None:
        self._sampler = sampler

    def start_span(
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> Span:
        parent = trace.get_current_span(context).get_span_context()
        if parent.is_valid:
            trace_id, flags, state = parent.trace_id, parent.trace_flags, parent.trace_state
        else:
            trace_id = random.getrandbits(128) or 1
            decision = self._sampler.should_sample(context, trace_id, name).decision
            sampled = decision is Decision.RECORD_AND_SAMPLE
            flags, state = TraceFlags(TraceFlags.SAMPLED if sampled else 0), None
        span_id = random.getrandbits(64) or 1
        return NonRecordingSpan(SpanContext(trace_id, span_id, False, flags, state))

    @contextlib.contextmanager
    def start_as_current_span(  # type: ignore[override]  # the API's own decorator is private
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[Span]:
        span = self.start_span(name, context)
        with trace.use_span(span, end_on_exit=False) as current:
            yield current


class PropagatingTracerProvider(trace.TracerProvider):
    """The tracer provider of a service that exports no traces (`PropagatingTracer`)."""

    def __init__(self, sampler: Sampler) -> None:
        self._tracer = PropagatingTracer(sampler)

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Attributes = None,
    ) -> trace.Tracer:
        return self._tracer

    def shutdown(self) -> None:
        pass


def setup_tracing(service: str, otlp_endpoint: str | None, sample_ratio: float) -> TracingHandle:
    """Install a tracer provider: the SDK's with an OTLP exporter when an endpoint is set, else
    one that records nothing and only propagates trace context."""
    sampler = ParentBased(TraceIdRatioBased(sample_ratio))
    if not otlp_endpoint:
        light = PropagatingTracerProvider(sampler)
        trace.set_tracer_provider(light)
        return light
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"llmmesh-{service}"}), sampler=sampler
    )
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    trace.set_tracer_provider(provider)
    return provider


def trace_carrier() -> dict[str, str]:
    """W3C trace context of the current span (traceparent, tracestate), for a message field
    when the call's metadata is not per request (a stream's)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def inject_trace_metadata(metadata: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Append W3C trace context of the current span to outgoing gRPC metadata."""
    metadata.extend(trace_carrier().items())
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


def remove_series(series: Iterable[tuple[MetricWrapperBase, Sequence[str]]]) -> None:
    """Remove labelled series (those of a replica that left: replica ids come and go with
    pods, so kept series would only grow); one never labelled so is skipped."""
    for metric, labels in series:
        with contextlib.suppress(KeyError):
            metric.remove(*labels)


def monotonic_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
