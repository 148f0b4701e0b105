"""changeflow/tracing.py: when traces are on, the event span (name, attributes, start at the write's
time) and its W3C context in the task headers, in-process with the SDK's in-memory exporter; when off,
nothing at all, and no OpenTelemetry import."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from bson import ObjectId, Timestamp
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from changeflow import tracing
from changeflow.listener.publish import messages_for
from changeflow.listener.routes import Route

ROOT = Path(__file__).resolve().parents[2]
WRITTEN = datetime(2026, 12, 1, 12, 0, 0, 250_000, tzinfo=UTC)


def event() -> dict:
    key = ObjectId()
    return {
        "_id": {"_data": "826A1B2C3D000000012B0429296E1404"},
        "operationType": "insert",
        "ns": {"db": "shop", "coll": "users"},
        "documentKey": {"_id": key},
        "fullDocument": {"_id": key, "email": "a@example.com"},
        "clusterTime": Timestamp(int(WRITTEN.timestamp()), 1),
        "wallTime": WRITTEN.replace(tzinfo=None),  # pymongo's naive UTC
    }


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.setup("changeflow-listener", instrument=False, env={"OTEL_TRACES_EXPORTER": "otlp"},
                         exporter=exporter)  # fmt: skip
    try:
        yield exporter
    finally:
        tracing.shutdown()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
    ],
)
def test_configured_reads_the_sdks_usual_variables(env: dict[str, str], expected: bool) -> None:
    assert tracing.configured(env) is expected


def test_off_means_no_span_no_headers_and_nothing_imported() -> None:
    assert not tracing.setup("changeflow-listener", env={})
    assert tracing.event_headers(event()) is None
    with tracing.span("smtp.send"):
        pass
    # A fresh interpreter in which OpenTelemetry cannot be imported at all: routing, message building
    # and the worker's app work, and no event carries headers.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'opentelemetry': raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from changeflow.listener.publish import messages_for\n"
        "from changeflow.listener.routes import Route\n"
        "import worker, tasks.email\n"
        "event = {'_id': {'_data': '82'}, 'operationType': 'insert', 'ns': {'db': 'd', 'coll': 'users'},\n"
        "         'documentKey': {'_id': 1}, 'fullDocument': {'_id': 1}}\n"
        "[m] = messages_for(event, [Route('users', 'insert', ['t'])])\n"
        "print(m.headers, [n for n in sys.modules if n.startswith('opentelemetry')])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None []"


def test_an_event_span_starts_at_the_write_and_its_context_rides_in_the_headers(
    spans: InMemorySpanExporter,
) -> None:
    change = event()
    before = datetime.now(UTC)
    messages = messages_for(change, [Route("users", "insert", ["a.welcome", "a.profile"])])
    assert len(messages) == 2
    assert messages[0].headers is messages[1].headers  # one span per event, shared by its tasks
    headers = messages[0].headers
    assert headers is not None and set(headers) == {"traceparent"}
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert (version, len(trace_id), len(span_id)) == ("00", 32, 16)
    assert int(flags, 16) & 1  # sampled

    tracing.flush()
    [span] = spans.get_finished_spans()
    assert span.name == "changeflow.event users insert"
    assert span.context.trace_id == int(trace_id, 16) and span.context.span_id == int(span_id, 16)
    assert span.parent is None  # each event starts a trace
    assert span.start_time == int(WRITTEN.timestamp() * 1e9)
    assert span.end_time >= int(before.timestamp() * 1e9)
    assert span.attributes == {
        "db.mongodb.collection": "users",
        "changeflow.database": "shop",
        "changeflow.operation": "insert",
        "changeflow.document_key": str(change["documentKey"]["_id"]),
        "changeflow.event_id": "826A1B2C3D000000012B0429296E1404",
    }
    assert span.resource.attributes["service.name"] == "changeflow-listener"


def test_two_events_are_two_traces(spans: InMemorySpanExporter) -> None:
    first, second = event(), event()
    tracing.event_headers(first)
    tracing.event_headers(second)
    tracing.flush()
    a, b = spans.get_finished_spans()
    assert a.context.trace_id != b.context.trace_id


def test_without_wall_time_the_cluster_time_is_the_start() -> None:
    change = event()
    del change["wallTime"]
    assert tracing.event_time(change) == WRITTEN.replace(microsecond=0)
    assert tracing.event_time({"operationType": "insert"}) is None
    assert tracing.event_time(event()) == WRITTEN
