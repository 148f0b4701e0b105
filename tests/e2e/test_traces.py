"""One trace from a write to its side effects, across real processes: the listener and a Celery worker
run with OTEL_EXPORTER_OTLP_ENDPOINT pointing at an OTLP/HTTP receiver in this test (the SDK's own
exporter, protobuf over HTTP, decoded with opentelemetry-proto).

A user inserted with plain pymongo must give one trace holding the listener's event span (started at
the write's wallTime), each task's span as its child (Celery's instrumentation, continued from the
`traceparent` header the listener's publisher put in the message), and under the tasks their MongoDB
commands (pymongo's instrumentation) and the SMTP conversation. Both publishers are covered.

Not covered: the application's own write span (the test's pymongo client is not instrumented; the
trace starts at the listener, dated to the write).
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from harness.pipeline import LocalPipeline, wait_until

pytestmark = pytest.mark.e2e


class Receiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces, protobuf; keeps (service, span) pairs."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                with receiver.lock:
                    for resource_spans in request.resource_spans:
                        service = next(
                            (a.value.string_value for a in resource_spans.resource.attributes
                             if a.key == "service.name"), "?",
                        )  # fmt: skip
                        for scope in resource_spans.scope_spans:
                            receiver.spans.extend((service, span) for span in scope.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def trace(self, trace_id: bytes) -> list[tuple[str, object]]:
        with self.lock:
            return [(service, span) for service, span in self.spans if span.trace_id == trace_id]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as running:
        yield running


def attributes(span: object) -> dict[str, str]:
    return {a.key: a.value.string_value or str(a.value.int_value) for a in span.attributes}  # type: ignore[attr-defined]


@pytest.mark.parametrize("publisher", ["pipelined", "celery"])
def test_one_trace_from_the_write_to_the_email(receiver: Receiver, publisher: str) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s instead of 5 s
        "LISTENER_PUBLISHER": publisher,
    }
    with LocalPipeline(workers=1, worker_concurrency=1, extra_env=env) as pipeline:
        assert pipeline.sink is not None
        written = datetime.now(UTC)
        user_id = pipeline.db.users.insert_one({"name": "Ada", "email": "ada@example.com"}).inserted_id
        pipeline.sink.wait_for(1, timeout=30)

        def event_span() -> object | None:
            for service, span in list(receiver.spans):
                if service == "changeflow-listener" and attributes(span).get(
                    "changeflow.document_key"
                ) == str(user_id):
                    return span
            return None

        assert wait_until(lambda: event_span() is not None, timeout=20), pipeline.logs()
        root = event_span()
        tasks = ("run/tasks.send_welcome_email", "run/tasks.create_profile")
        assert wait_until(
            lambda: {span.name for _, span in receiver.trace(root.trace_id)} >= {*tasks, "smtp.send"},  # type: ignore[attr-defined]
            timeout=20,
        ), sorted({span.name for _, span in receiver.trace(root.trace_id)})  # type: ignore[attr-defined]
        trace = receiver.trace(root.trace_id)  # type: ignore[attr-defined]

    assert root.name == "changeflow.event users insert"  # type: ignore[attr-defined]
    assert root.parent_span_id == b""  # type: ignore[attr-defined]
    assert attributes(root)["db.mongodb.collection"] == "users"
    assert attributes(root)["changeflow.operation"] == "insert"
    assert attributes(root)["changeflow.event_id"]
    # Started at the write's wallTime (MongoDB's clock, millisecond precision), not when it was read.
    start = root.start_time_unix_nano / 1e9  # type: ignore[attr-defined]
    assert abs(start - written.timestamp()) < 1.0

    by_id = {span.span_id: (service, span) for service, span in trace}
    runs = {span.name: span for service, span in trace if span.name in tasks}
    for name, run in runs.items():
        assert run.parent_span_id == root.span_id, name  # type: ignore[attr-defined]
        assert by_id[run.span_id][0] == "changeflow-worker"
    [smtp] = [span for _, span in trace if span.name == "smtp.send"]
    assert smtp.parent_span_id == runs["run/tasks.send_welcome_email"].span_id
    mongo = [span for _, span in trace if attributes(span).get("db.system") == "mongodb"
             or attributes(span).get("db.system.name") == "mongodb"]  # fmt: skip
    assert {span.parent_span_id for span in mongo} & {run.span_id for run in runs.values()}, (
        "no MongoDB command span under a task"
    )
