"""The span relay: workers send one datagram per review to the master, which builds the OTLP spans.

The request path must never wait on it: a relay nobody reads drops spans instead of blocking.
"""

from __future__ import annotations

import time

import pytest

from kwserver.admission import EvaluationRequest
from kwserver.observability.otlp_traces import SpanExport, SpanRelay, TracedService, span_record
from kwserver.server.service import VALIDATE, VALIDATE_RAW

pytest.importorskip("opentelemetry.sdk")


class Reviews:
    def __init__(self, response=None, error: Exception | None = None):
        self.response, self.error = response, error

    def review(self, policy_id, request, origin):
        if self.error:
            raise self.error
        return self.response


def review_request(value, uid: str = "", raw: bool = False) -> EvaluationRequest:
    return EvaluationRequest(uid=uid, value=value, json=b"", base_object=None, has_base_object=False, raw=raw)


def relayed(relay: SpanRelay) -> list[bytes]:
    relay.receiving.setblocking(False)
    records = []
    while True:
        try:
            records.append(relay.receiving.recv(1 << 20))
        except BlockingIOError:
            return records


@pytest.fixture
def relay():
    relay = SpanRelay()
    yield relay
    relay.close()


@pytest.fixture
def export(relay):
    export = SpanExport(relay)  # never started: these tests read the relay themselves
    yield export
    export.processor.shutdown()


def test_a_review_is_relayed_with_its_times_and_attributes(relay, export, monkeypatch):
    monkeypatch.setenv("HOSTNAME", "pod-1")
    response = {"uid": "u1", "allowed": False, "status": {"message": "no", "code": 403}}
    traced = TracedService(Reviews(response), relay)
    request = review_request({"uid": "u1", "name": "nginx", "operation": "CREATE"}, uid="u1")
    before = time.time_ns()
    assert traced.review("privileged", request, VALIDATE) is response
    [record] = relayed(relay)
    span = export.span(record)
    assert span.name == "validation"
    assert before <= span.start_time <= span.end_time <= time.time_ns()
    assert dict(span.attributes) == {"host": "pod-1", "policy_id": "privileged", "request_uid": "u1", "name": "nginx",
                                     "operation": "CREATE", "allowed": False, "mutated": False,
                                     "response_code": 403, "response_message": "no"}
    assert span.context.trace_flags.sampled and span.context.span_id and span.context.trace_id
    assert span.instrumentation_scope.name == "kubewarden-policy-server"


def test_a_failed_review_is_relayed_as_an_error_span_and_still_raises(relay, export):
    traced = TracedService(Reviews(error=RuntimeError("boom")), relay)
    with pytest.raises(RuntimeError):
        traced.review("raw", review_request([1], raw=True), VALIDATE_RAW)
    span = export.span(relayed(relay)[0])
    assert span.name == "validation_raw" and span.status.status_code.name == "ERROR"
    assert span.status.description == "RuntimeError: boom"


def test_a_relay_nobody_reads_drops_spans_without_blocking(relay, export):
    record = span_record(VALIDATE, 1, 2, {"policy_id": "p", "response_message": "x" * 4096})
    for _ in range(20_000):  # far more than the socket buffers hold: a blocking send would hang here
        relay.send(record)
    assert relay.dropped > 0
    kept = relayed(relay)
    assert kept and len(kept) + relay.dropped == 20_000
    assert export.span(kept[-1]).attributes["policy_id"] == "p"
