"""`--log-fmt otlp`: a span per admission request, exported over OTLP by the master.

Spans carry the reference's names (`validation`, `audit`, `validation_raw`) and fields
under the tracer `kubewarden-policy-server`. A worker only times the review and sends one datagram
(name, times, attributes) to the master over a socket pair made before the fork; the master turns
the records into spans and hands them to the SDK's BatchSpanProcessor, whose thread exports them.
So the request path neither builds SDK span objects nor encodes or sends OTLP (measured: an SDK
exporter in every worker cost 0.62x of the req/s without traces), and no worker holds an exporter,
its connection and its thread. A full relay (the master behind, or the collector slow enough to fill
the processor's queue) drops spans; it never holds a request.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from typing import Any

import orjson

from kwserver.admission import EvaluationRequest
from kwserver.observability import otlp
from kwserver.server.service import AUDIT, VALIDATE, VALIDATE_RAW, AdmissionService

log = logging.getLogger(__name__)

SPAN_NAMES = {VALIDATE: "validation", AUDIT: "audit", VALIDATE_RAW: "validation_raw"}
# At shutdown an absent collector may hold the master this long at most.
FINAL_EXPORT_TIMEOUT_MS = 5_000
# Socket buffers of the relay (the kernel caps them at net.core.{w,r}mem_max); a span record is
# usually under 1 KiB, a larger one than the send buffer is dropped.
RELAY_BUFFER_BYTES = 4 * 1024 * 1024
RECEIVE_BYTES = 1024 * 1024
DROP_REPORT_SECONDS = 60.0

Attributes = dict[str, str | bool | int]


def request_attributes(policy_id: str, request: EvaluationRequest, host: str) -> Attributes:
    """The fields the reference records when a request arrives; those the request lacks are absent."""
    attributes: Attributes = {"host": host, "policy_id": policy_id}
    if request.uid:
        attributes["request_uid"] = request.uid
    if request.raw or not isinstance(request.value, dict):
        return attributes
    value = request.value
    for field, key in (("name", "name"), ("namespace", "namespace"), ("operation", "operation"),
                       ("subresource", "subResource")):
        if isinstance(value.get(key), str):
            attributes[field] = value[key]
    for prefix, fields in (("kind", ("group", "version", "kind")), ("resource", ("group", "version", "resource"))):
        gvx = value.get(prefix)
        if isinstance(gvx, dict):
            for field in fields:
                if isinstance(gvx.get(field), str):
                    attributes[field if field == prefix else f"{prefix}_{field}"] = gvx[field]
    return attributes


def response_attributes(response: dict[str, Any]) -> Attributes:
    """The fields the reference records from the AdmissionResponse it answers."""
    attributes: Attributes = {"allowed": bool(response.get("allowed")), "mutated": "patch" in response}
    status = response.get("status") or {}
    if isinstance(status.get("code"), int):
        attributes["response_code"] = status["code"]
    if isinstance(status.get("message"), str):
        attributes["response_message"] = status["message"]
    return attributes


def span_record(origin: str, start_ns: int, end_ns: int, attributes: Attributes, error: str | None = None) -> bytes:
    """What a worker sends the master for one review."""
    return orjson.dumps((SPAN_NAMES[origin], start_ns, end_ns, attributes, error))


class SpanRelay:
    """Span records from the workers to the master: a datagram socket pair made before the fork.

    Every worker inherits the sending end (datagrams from several senders never interleave); the
    master reads the other.
    """

    def __init__(self) -> None:
        self.receiving, self.sending = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for end, option in ((self.sending, socket.SO_SNDBUF), (self.receiving, socket.SO_RCVBUF)):
            with contextlib.suppress(OSError):  # else the default size
                end.setsockopt(socket.SOL_SOCKET, option, RELAY_BUFFER_BYTES)
        self.sending.setblocking(False)
        self.dropped = 0
        self._dropped_reported = 0
        self._reported_at = time.monotonic()

    def send(self, record: bytes) -> None:
        try:
            self.sending.send(record)
        except OSError:  # full (the master is behind), too large, or the master is gone
            self.dropped += 1
            self._report_drops()

    def _report_drops(self) -> None:
        now = time.monotonic()
        if now - self._reported_at >= DROP_REPORT_SECONDS:
            log.warning("%d span(s) dropped: the master's span relay was full", self.dropped - self._dropped_reported)
            self._dropped_reported, self._reported_at = self.dropped, now

    def in_worker(self) -> None:
        self.receiving.close()

    def close(self) -> None:
        self.receiving.close()
        self.sending.close()


class TracedService:
    """The admission service as the HTTP API sees it, each review timed and relayed as a span."""

    def __init__(self, service: AdmissionService, relay: SpanRelay):
        self.service = service
        self.relay = relay
        self.host = os.environ.get("HOSTNAME") or socket.gethostname()

    def review(self, policy_id: str, request: EvaluationRequest, origin: str) -> dict[str, Any]:
        start = time.time_ns()
        attributes = request_attributes(policy_id, request, self.host)
        try:
            response = self.service.review(policy_id, request, origin)
        except Exception as exc:
            self.relay.send(span_record(origin, start, time.time_ns(), attributes, f"{type(exc).__name__}: {exc}"))
            raise
        attributes.update(response_attributes(response))
        self.relay.send(span_record(origin, start, time.time_ns(), attributes))
        return response


class SpanExport:
    """In the master: spans from the relay into the SDK's batch processor and the OTLP exporter."""

    def __init__(self, relay: SpanRelay):
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, TraceFlags
        from opentelemetry.trace.status import Status, StatusCode

        self.relay = relay
        self.processor = BatchSpanProcessor(otlp.span_exporter())
        self._ids = RandomIdGenerator()
        self._resource = otlp.resource()
        self._scope = InstrumentationScope(otlp.SERVICE_NAME)
        self._readable, self._context, self._sampled = ReadableSpan, SpanContext, TraceFlags(TraceFlags.SAMPLED)
        self._status, self._error_code, self._unset = Status, StatusCode.ERROR, Status(StatusCode.UNSET)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="otlp-spans", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def in_worker(self) -> None:
        """In a forked worker: keep only the relay's sending end."""
        self.relay.in_worker()

    def span(self, record: bytes) -> Any:
        """The SDK span of one relayed record; its ids are drawn here (no trace context comes in)."""
        name, start, end, attributes, error = orjson.loads(record)
        context = self._context(self._ids.generate_trace_id(), self._ids.generate_span_id(), is_remote=False,
                                trace_flags=self._sampled)
        return self._readable(name, context=context, resource=self._resource, attributes=attributes,
                              status=self._status(self._error_code, error) if error else self._unset, start_time=start,
                              end_time=end, instrumentation_scope=self._scope)

    def _run(self) -> None:
        receiving = self.relay.receiving
        receiving.settimeout(0.5)
        buffer = bytearray(RECEIVE_BYTES)
        while True:
            if self._stopping.is_set():
                receiving.setblocking(False)  # what the workers sent before they exited, then stop
            try:
                size = receiving.recv_into(buffer)
            except TimeoutError:
                continue
            except OSError:  # drained (at exit) or closed
                return
            try:
                self.processor.on_end(self.span(bytes(buffer[:size])))
            except Exception:  # a record this master cannot read: lose the span, keep the thread
                log.exception("a relayed span could not be exported")

    def stop(self) -> None:
        """At exit, once the workers are gone: what they sent goes out, for a bounded time."""
        self._stopping.set()
        self._thread.join(timeout=2)
        try:
            self.processor.force_flush(FINAL_EXPORT_TIMEOUT_MS)
            self.processor.shutdown()
        except Exception:
            log.exception("closing the OTLP span exporter failed")
