"""Trace context without an exporter: nothing is recorded, context still propagates."""

from __future__ import annotations

import json
import logging

from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from llmmesh.common.telemetry import (
    JsonFormatter,
    PropagatingTracer,
    extract_trace_context,
    inject_trace_metadata,
)


def _traceparent(metadata: list[tuple[str, str]]) -> tuple[str, str, str]:
    version, trace_id, span_id, flags = dict(metadata)["traceparent"].split("-")
    assert version == "00"
    return trace_id, span_id, flags


def tracer(ratio: float) -> PropagatingTracer:
    return PropagatingTracer(ParentBased(TraceIdRatioBased(ratio)))


def test_root_span_starts_a_trace_sampled_by_the_ratio() -> None:
    for ratio, flags in ((1.0, "01"), (0.0, "00")):
        with tracer(ratio).start_as_current_span("root") as span:
            assert not span.is_recording()
            trace_id, span_id, sent = _traceparent(inject_trace_metadata([]))
        ctx = span.get_span_context()
        assert (trace_id, span_id, sent) == (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", flags)
        assert ctx.trace_id != 0
    assert "traceparent" not in dict(inject_trace_metadata([]))  # the span ended with its block


def test_child_of_a_remote_parent_keeps_its_trace_and_decision() -> None:
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    remote = extract_trace_context([("traceparent", parent)])
    with (
        tracer(1.0).start_as_current_span("server", context=remote),
        tracer(1.0).start_as_current_span("client"),
    ):
        trace_id, span_id, flags = _traceparent(inject_trace_metadata([]))
    # an unsampled parent stays unsampled whatever the local ratio
    assert (trace_id, flags) == ("0af7651916cd43dd8448eb211c80319c", "00")
    assert span_id != "b7ad6b7169203331"


def test_logs_carry_the_trace_id() -> None:
    fmt = JsonFormatter("svc")
    with tracer(1.0).start_as_current_span("x") as span:
        line = json.loads(fmt.format(logging.makeLogRecord({"msg": "hello"})))
    assert line["trace_id"] == f"{span.get_span_context().trace_id:032x}"
