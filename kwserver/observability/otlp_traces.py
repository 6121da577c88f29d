"""`--log-fmt otlp`: a span per admission request, exported over OTLP by each worker.

Spans carry the reference's names (`validation`, `audit`, `validation_raw`) and fields (spec §10.4)
under the tracer `kubewarden-policy-server`. Ending a span only queues it: the SDK's
BatchSpanProcessor exports in a background thread of the worker, which is started after the fork
(threads do not survive it), and drops spans when its queue is full, so a slow or absent collector
never holds a request.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from kwserver.admission import EvaluationRequest
from kwserver.observability import otlp
from kwserver.service import AUDIT, VALIDATE, VALIDATE_RAW, AdmissionService

log = logging.getLogger(__name__)

SPAN_NAMES = {VALIDATE: "validation", AUDIT: "audit", VALIDATE_RAW: "validation_raw"}
# A worker that exits waits at most this long for its last spans to reach the collector.
FLUSH_AT_EXIT_MILLIS = 2_000

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


class TracedService:
    """The admission service as the HTTP API sees it, with a span around every review.

    Made in the master (importing the SDK there, before the fork, shares its pages with the
    workers); `start` runs in each worker and builds the exporter and its thread. Until then,
    reviews pass through untraced.
    """

    def __init__(self, service: AdmissionService):
        from opentelemetry.sdk.trace import TracerProvider  # noqa: F401 - imported before the fork

        self.service = service
        self.provider: Any = None
        self.tracer: Any = None
        self.host = os.environ.get("HOSTNAME") or socket.gethostname()

    def start(self) -> None:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.provider = TracerProvider(resource=otlp.resource())
        self.provider.add_span_processor(BatchSpanProcessor(otlp.span_exporter()))
        self.tracer = self.provider.get_tracer(otlp.SERVICE_NAME)

    def review(self, policy_id: str, request: EvaluationRequest, origin: str) -> dict[str, Any]:
        tracer = self.tracer
        if tracer is None:
            return self.service.review(policy_id, request, origin)
        with tracer.start_as_current_span(SPAN_NAMES[origin],
                                          attributes=request_attributes(policy_id, request, self.host)) as span:
            response = self.service.review(policy_id, request, origin)
            span.set_attributes(response_attributes(response))
            return response

    def shutdown(self) -> None:
        """In the worker, as it exits: send what is queued, for a bounded time."""
        if self.provider is None:
            return
        try:
            self.provider.force_flush(FLUSH_AT_EXIT_MILLIS)
            self.provider.shutdown()
        except Exception:
            log.exception("closing the OTLP span exporter failed")
        self.provider = self.tracer = None
