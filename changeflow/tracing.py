"""OpenTelemetry traces, when configured: write -> listener -> each task -> its MongoDB and SMTP calls.

Configured means the SDK's usual environment says where spans go: OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (OTLP over HTTP), or OTEL_TRACES_EXPORTER=otlp|console (and
OTEL_SDK_DISABLED is not true). Otherwise every function here returns at once and nothing of
OpenTelemetry is imported: tracing off costs one dict lookup per event.

- The listener (`setup("changeflow-listener", instrument=False)` at start) starts one span per change event,
  `changeflow.event <coll> <operation>`, beginning at the event's wall time (wallTime, else
  clusterTime: when the write happened) and ending when its task messages are built, so its length is
  the write-to-listener delay. Its context goes into each task message's headers (W3C `traceparent`,
  via propagate.inject): `event_headers(event)`.
- Workers (`setup("changeflow-worker")` in each worker process) continue it: Celery's instrumentation
  reads the headers and makes the task's span a child; pymongo's instrumentation adds a span per
  MongoDB command; `span("smtp.send")` wraps the SMTP conversation.

Needs the `otel` extra: `pip install 'changeflow[otel]'`. Configured without it, setup() says so
on stderr once and the process runs untraced.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("changeflow.tracing")

TRACER_NAME = "changeflow"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")

_state: dict[str, Any] = {"tracer": None}  # the listener's/worker's tracer once setup() succeeded


def configured(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for traces (see the module doc)."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(exporter) or any(env.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def enabled() -> bool:
    return _state["tracer"] is not None


def setup(
    service_name: str,
    *,
    instrument: bool = True,
    env: Mapping[str, str] | None = None,
    exporter: Any = None,
) -> bool:
    """Start tracing in this process when configured: the SDK's provider and exporter and, with
    `instrument` (workers), pymongo's and Celery's instrumentation; the listener passes False (its
    getMores and checkpoint saves would be a span every half second). `exporter` replaces the one the
    environment names (tests: an in-memory exporter). Returns whether traces are on. Idempotent."""
    if _state["tracer"] is not None:
        return True
    if not configured(env):
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if instrument:
            from opentelemetry.instrumentation.celery import CeleryInstrumentor
            from opentelemetry.instrumentation.pymongo import PymongoInstrumentor
    except ImportError as exc:
        log.warning("OpenTelemetry is configured but not installed (pip install 'changeflow[otel]'): %s", exc)
        return False
    environment = os.environ if env is None else env
    provider = TracerProvider(
        resource=Resource.create({"service.name": environment.get("OTEL_SERVICE_NAME") or service_name})
    )
    provider.add_span_processor(BatchSpanProcessor(exporter or _exporter(environment)))
    trace.set_tracer_provider(provider)
    if instrument:
        PymongoInstrumentor().instrument(tracer_provider=provider)
        CeleryInstrumentor().instrument(tracer_provider=provider)
    _state["tracer"] = provider.get_tracer(TRACER_NAME)
    _state["provider"] = provider
    log.info("tracing on: %s spans as service %s", type(provider).__name__, service_name)
    return True


def _exporter(env: Mapping[str, str]) -> Any:
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    # OTLP over HTTP; it reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, _HEADERS, _TIMEOUT itself.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def flush() -> None:
    """Export the buffered spans now."""
    provider = _state.get("provider")
    if provider is not None:
        provider.force_flush()


def shutdown() -> None:
    """Flush the spans not exported yet and stop tracing (a process about to exit)."""
    provider = _state.pop("provider", None)
    _state["tracer"] = None
    if provider is not None:
        provider.shutdown()


def event_time(event: Mapping[str, Any]) -> datetime | None:
    """When the event's write happened: its wallTime, else its clusterTime (seconds), else None."""
    wall = event.get("wallTime")
    if isinstance(wall, datetime):
        return wall if wall.tzinfo else wall.replace(tzinfo=UTC)
    cluster = event.get("clusterTime")
    seconds = getattr(cluster, "time", None)  # bson.Timestamp
    if isinstance(seconds, int):
        return datetime.fromtimestamp(seconds, UTC)
    return None


def event_attributes(event: Mapping[str, Any]) -> dict[str, str]:
    ns = event.get("ns") if isinstance(event.get("ns"), Mapping) else {}
    key = event.get("documentKey") if isinstance(event.get("documentKey"), Mapping) else {}
    token = event.get("_id") if isinstance(event.get("_id"), Mapping) else {}
    return {
        "db.mongodb.collection": str(ns.get("coll", "")),
        "changeflow.database": str(ns.get("db", "")),
        "changeflow.operation": str(event.get("operationType", "")),
        "changeflow.document_key": str(key.get("_id", "")),
        "changeflow.event_id": str(token.get("_data", "")),
    }


def event_headers(event: Mapping[str, Any]) -> dict[str, str] | None:
    """The task headers carrying this event's span (W3C traceparent), or None when tracing is off.

    Records the event's span: from the write's time to now.
    """
    tracer = _state["tracer"]
    if tracer is None:
        return None
    from opentelemetry import context, propagate, trace

    attributes = event_attributes(event)
    started = event_time(event)
    start_ns = int(started.timestamp() * 1e9) if started is not None else None
    span = tracer.start_span(
        f"changeflow.event {attributes['db.mongodb.collection']} {attributes['changeflow.operation']}",
        kind=trace.SpanKind.PRODUCER,
        attributes=attributes,
        start_time=start_ns,
        context=context.Context(),  # each event is a trace of its own, never a child of another
    )
    headers: dict[str, str] = {}
    propagate.inject(headers, context=trace.set_span_in_context(span))
    span.end()
    return headers


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[None]:
    """A span around a block of a task (an SMTP conversation): nothing when tracing is off."""
    tracer = _state["tracer"]
    if tracer is None:
        yield
        return
    with tracer.start_as_current_span(name, attributes={k: str(v) for k, v in attributes.items()}):
        yield
