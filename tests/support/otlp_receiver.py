"""A local OTLP receiver for the tests and bench/telemetry.py: the collector's Export services over gRPC and over HTTP.

Both decode the `opentelemetry-proto` messages (ExportMetricsServiceRequest, ExportTraceServiceRequest)
and keep them; TLS (optionally with mandatory client certificates) uses the tests' throwaway CAs.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.support.certs import CertPair


@dataclass
class Received:
    """What the receiver got, in arrival order."""

    metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = field(default_factory=list)
    traces: list[trace_service_pb2.ExportTraceServiceRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_metrics(self, request: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
        with self.lock:
            self.metrics.append(request)

    def add_traces(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self.lock:
            self.traces.append(request)

    def latest_points(self, name: str) -> dict[tuple, Any]:
        """The data points of metric `name` in the latest export that has it, by sorted attributes.

        Exports are cumulative, so the latest one holds the totals.
        """
        with self.lock:
            exports = list(self.metrics)
        for export in reversed(exports):
            points = {}
            for scoped in metric_scopes(export):
                for metric in scoped.metrics:
                    if metric.name == name:
                        data = metric.sum if metric.HasField("sum") else metric.histogram
                        for point in data.data_points:
                            points[tuple(sorted(attributes(point.attributes).items()))] = point
            if points:
                return points
        return {}

    def spans(self) -> list[tuple[str, Any, dict[str, Any], dict[str, Any]]]:
        """Every span received: (scope name, span, span attributes, resource attributes)."""
        with self.lock:
            exports = list(self.traces)
        found = []
        for export in exports:
            for resource_spans in export.resource_spans:
                resource = attributes(resource_spans.resource.attributes)
                for scoped in resource_spans.scope_spans:
                    for span in scoped.spans:
                        found.append((scoped.scope.name, span, attributes(span.attributes), resource))
        return found


def metric_scopes(export: metrics_service_pb2.ExportMetricsServiceRequest) -> Iterator[Any]:
    for resource_metrics in export.resource_metrics:
        yield from resource_metrics.scope_metrics


def attributes(key_values: Any) -> dict[str, Any]:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in key_values}


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, received: Received):
        self.received = received

    def Export(self, request, context):
        self.received.add_metrics(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, received: Received):
        self.received = received

    def Export(self, request, context):
        self.received.add_traces(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@dataclass
class Receiver:
    port: int
    received: Received
    stop: Any
    scheme: str

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"


def start_grpc(server_cert: CertPair | None = None, client_ca: Path | None = None) -> Receiver:
    received = Received()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsService(received), server)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(received), server)
    if server_cert is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        credentials = grpc.ssl_server_credentials(
            [(server_cert.key.read_bytes(), server_cert.cert.read_bytes())],
            root_certificates=client_ca.read_bytes() if client_ca else None,
            require_client_auth=client_ca is not None)
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return Receiver(port, received, lambda: server.stop(grace=None).wait(), "http" if server_cert is None else "https")


def start_http(server_cert: CertPair | None = None, client_ca: Path | None = None) -> Receiver:
    received = Received()
    messages = {"/v1/metrics": (metrics_service_pb2.ExportMetricsServiceRequest, received.add_metrics,
                                metrics_service_pb2.ExportMetricsServiceResponse),
                "/v1/traces": (trace_service_pb2.ExportTraceServiceRequest, received.add_traces,
                               trace_service_pb2.ExportTraceServiceResponse)}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            kind = messages.get(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if kind is None or self.headers.get("Content-Type") != "application/x-protobuf":
                self.send_response(404)
                self.end_headers()
                return
            request_type, add, response_type = kind
            add(request_type.FromString(body))
            answer = response_type().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if server_cert is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(server_cert.cert, server_cert.key)
        if client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(client_ca)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join()

    return Receiver(server.server_address[1], received, stop, "http" if server_cert is None else "https")
