"""Tracing switched on by configuration: a service exports spans over OTLP/HTTP to the collector
it is given, continuing the caller's trace (traceparent) rather than starting a new one."""
from __future__ import annotations

import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)

from devstack.servers import ServiceProcess, free_port


class Collector(BaseHTTPRequestHandler):
    received: list[ExportTraceServiceRequest] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path == "/v1/traces":
            message = ExportTraceServiceRequest()
            message.ParseFromString(body)
            Collector.received.append(message)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _spans() -> list[tuple[str, str, str]]:
    found = []
    for message in Collector.received:
        for resource_spans in message.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), ""
            )
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    found.append((service, span.trace_id.hex(), span.name))
    return found


def test_service_exports_spans_continuing_the_callers_trace(fresh_database: str, service_token: str,
                                                            tmp_path: Path) -> None:
    collector = ThreadingHTTPServer(("127.0.0.1", free_port()), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    port = free_port()
    service = ServiceProcess("sessions-traced", port, tmp_path / "svc", module="chat_sessions", env={
        "DATABASE_URL": fresh_database, "SERVICE_TOKEN": service_token, "SESSIONS_PORT": str(port),
        "OTEL_ENABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.server_port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }).start()
    try:
        trace_id = uuid.uuid4().hex
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/sessions?user_id={uuid.uuid4()}",
            headers={"x-service-token": service_token, "traceparent": f"00-{trace_id}-{'ab' * 8}-01"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not any(t == trace_id for _, t, _ in _spans()):
            time.sleep(0.2)
        ours = [(service_name, name) for service_name, t, name in _spans() if t == trace_id]
        assert ours, f"no span of trace {trace_id}; got {_spans()}"
        assert all(service_name == "chat-sessions" for service_name, _ in ours)
    finally:
        service.stop()
        collector.shutdown()


def test_tracing_is_off_by_default(fresh_database: str, service_token: str, tmp_path: Path) -> None:
    from chat_common import tracing

    assert tracing.tracing_enabled() is False
    carrier: dict[str, str] = {}
    tracing.inject_context(carrier)
    assert carrier == {}
