"""OpenTelemetry: `--enable-metrics` pushes the reference's metrics and `--log-fmt otlp` its spans.

A local OTLP receiver (tests/support/otlp_receiver.py, the collector's Export services over gRPC and HTTP)
listens on a free loopback port; the real server is pointed at it with the standard `OTEL_*`
variables, serves AdmissionReviews, and what arrives is checked: metric names, attributes and
values, span names and attributes, over both protocols, with TLS and client certificates, and with
no collector at all.
"""

from __future__ import annotations

import pytest
import requests

from tests.support.certs import make_ca, make_cert
from tests.support.otlp_receiver import Receiver, start_grpc, start_http
from tests.support.paths import SERVER_FIXTURES, load_json, policy_path
from tests.support.server import free_port, wait_for

pytestmark = pytest.mark.integration

PRIVILEGED = load_json(SERVER_FIXTURES / "pod_with_privileged_containers.json")
UNPRIVILEGED = load_json(SERVER_FIXTURES / "pod_without_privileged_containers.json")
RAW_REVIEW = load_json(SERVER_FIXTURES / "raw_review.json")
POLICIES = {
    "pod-privileged": {"module": policy_path("pod-privileged")},
    "pod-privileged-monitor": {"module": policy_path("pod-privileged"), "policyMode": "monitor"},
    "raw-mutation": {"module": policy_path("raw-mutation"), "allowedToMutate": True,
                     "settings": {"forbiddenResources": ["banana"], "defaultResource": "hay"}},
    "broken": {"module": policy_path("sleeping"), "settings": {"sleepMilliseconds": "abc"}},
}
STARTERS = {"grpc": start_grpc, "http/protobuf": start_http}
HOST = "kwserver-test-pod"
EVALUATIONS = "kubewarden_policy_evaluations_total"
LATENCY = "kubewarden_policy_evaluation_latency_milliseconds"
POD = {"resource_kind": "Pod", "resource_request_operation": "CREATE", "resource_namespace": "default"}


def telemetry_env(receiver_endpoint: str, protocol: str, **extra: str) -> dict[str, str]:
    return {
        "KUBEWARDEN_ENABLE_METRICS": "true", "KUBEWARDEN_LOG_FMT": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver_endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_METRIC_EXPORT_INTERVAL": "300", "OTEL_BSP_SCHEDULE_DELAY": "100", "HOSTNAME": HOST, **extra,
    }


@pytest.fixture
def receivers():
    started: list[Receiver] = []

    def start(protocol: str, **tls) -> Receiver:
        receiver = STARTERS[protocol](**tls)
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


def serve_requests(server) -> None:
    for _ in range(2):
        assert server.post("/validate/pod-privileged", PRIVILEGED).json()["response"]["allowed"] is False
    assert server.post("/audit/pod-privileged", UNPRIVILEGED).json()["response"]["allowed"] is True
    assert server.post("/validate/pod-privileged-monitor", PRIVILEGED).json()["response"]["allowed"] is True
    assert "patch" in server.post("/validate_raw/raw-mutation", RAW_REVIEW).json()["response"]
    assert server.post("/validate/broken", PRIVILEGED).json()["response"]["status"]["code"] == 500


def key(**attributes) -> tuple:
    return tuple(sorted(attributes.items()))


def wait_for_points(receiver: Receiver, name: str, total: int) -> dict:
    """The latest points of a counter (or histogram) once they add up to `total` evaluations."""
    def arrived():
        points = receiver.received.latest_points(name)
        counted = sum(p.count if name == LATENCY else p.as_int for p in points.values())
        return points if counted == total else None

    return wait_for(arrived, timeout=30)


def wait_for_spans(receiver: Receiver, count: int) -> list:
    return wait_for(lambda: (spans := receiver.received.spans()) and len(spans) >= count and spans, timeout=30)


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_metrics_and_spans_arrive_with_the_reference_names_and_attributes(run_server, receivers, protocol):
    receiver = receivers(protocol)
    server = run_server(POLICIES, args=["--continue-on-errors"], env=telemetry_env(receiver.endpoint, protocol))
    serve_requests(server)

    counters = wait_for_points(receiver, EVALUATIONS, total=6)
    denied = key(policy_name="pod-privileged", policy_mode="protect", accepted=False, mutated=False,
                 request_origin="validate", **POD)
    assert {attributes: point.as_int for attributes, point in counters.items()} == {
        denied: 2,
        key(policy_name="pod-privileged", policy_mode="protect", accepted=True, mutated=False,
            request_origin="audit", **POD): 1,
        # Monitor mode records the policy's own decision; the client was answered allowed.
        key(policy_name="pod-privileged-monitor", policy_mode="monitor", accepted=False, mutated=False,
            request_origin="validate", **POD): 1,
        # Raw requests have no kind, operation, origin or namespace.
        key(policy_name="raw-mutation", policy_mode="protect", accepted=True, mutated=True): 1,
        key(policy_name="broken", initialization_error=next(
            dict(a)["initialization_error"] for a in counters if dict(a)["policy_name"] == "broken")): 1,
    }
    assert "sleepMilliseconds" in next(dict(a)["initialization_error"] for a in counters
                                       if dict(a)["policy_name"] == "broken")
    export = receiver.received.metrics[-1]
    scope = export.resource_metrics[0].scope_metrics[0]
    assert scope.scope.name == "kubewarden"
    counter = next(m for m in scope.metrics if m.name == EVALUATIONS)
    assert counter.sum.is_monotonic and counter.sum.aggregation_temporality == 2  # cumulative

    histograms = wait_for_points(receiver, LATENCY, total=5)  # initialisation errors have no latency
    assert set(histograms) == set(counters) - {a for a in counters if dict(a)["policy_name"] == "broken"}
    latency = histograms[denied]
    assert latency.count == 2 and sum(latency.bucket_counts) == 2
    assert list(latency.explicit_bounds) == [0, 5, 10, 25, 50, 75, 100, 250, 500, 750, 1000, 2500, 5000, 7500, 10000]

    spans = wait_for_spans(receiver, 6)
    by_name = {}
    for scope_name, span, attributes, resource in spans:
        assert scope_name == "kubewarden-policy-server"
        assert resource["service.name"] == "kubewarden-policy-server"
        by_name.setdefault(span.name, []).append(attributes)
    assert sorted((name, len(found)) for name, found in by_name.items()) == [
        ("audit", 1), ("validation", 4), ("validation_raw", 1)]
    request = PRIVILEGED["request"]
    assert by_name["validation"][0] == {
        "host": HOST, "policy_id": "pod-privileged", "request_uid": request["uid"], "name": "nginx",
        "namespace": "default", "operation": "CREATE", "kind_group": "", "kind_version": "v1", "kind": "Pod",
        "resource_group": "", "resource_version": "v1", "resource": "pods", "allowed": False, "mutated": False,
        "response_message": "Privileged container is not allowed",  # the policy sets no code: none recorded
    }
    assert by_name["validation_raw"] == [{"host": HOST, "policy_id": "raw-mutation", "allowed": True, "mutated": True}]
    broken = next(a for a in by_name["validation"] if a["policy_id"] == "broken")
    assert broken["allowed"] is False and broken["response_code"] == 500
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_tls_with_client_certificates_from_the_standard_variables(run_server, receivers, tmp_path, protocol):
    ca = make_ca(tmp_path, "collector-ca")
    collector = make_cert(tmp_path, "collector", ca)
    client_ca = make_ca(tmp_path, "client-ca")
    client = make_cert(tmp_path, "kwserver", client_ca)
    receiver = receivers(protocol, server_cert=collector, client_ca=client_ca.cert)
    server = run_server({"pod-privileged": POLICIES["pod-privileged"]}, env=telemetry_env(
        receiver.endpoint, protocol, OTEL_EXPORTER_OTLP_CERTIFICATE=str(ca.cert),
        OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE=str(client.cert), OTEL_EXPORTER_OTLP_CLIENT_KEY=str(client.key),
        # requests prefers these to the exporter's own CA file (psf/requests#3829); a pod has none.
        REQUESTS_CA_BUNDLE="", CURL_CA_BUNDLE=""))
    assert server.post("/validate/pod-privileged", PRIVILEGED).status_code == 200

    counters = wait_for_points(receiver, EVALUATIONS, total=1)
    assert [dict(a)["policy_name"] for a in counters] == ["pod-privileged"]
    assert [span.name for _, span, _, _ in wait_for_spans(receiver, 1)] == ["validation"]


def test_spans_of_the_last_requests_are_exported_at_shutdown(run_server, receivers):
    receiver = receivers("grpc")
    # The batch would wait a minute: only the shutdown sends these spans.
    server = run_server({"pod-privileged": POLICIES["pod-privileged"]},
                        env=telemetry_env(receiver.endpoint, "grpc", OTEL_BSP_SCHEDULE_DELAY="60000"))
    for _ in range(3):
        assert server.post("/validate/pod-privileged", PRIVILEGED).status_code == 200
    server.process.terminate()
    assert server.process.wait(timeout=30) == 0
    assert [span.name for _, span, _, _ in wait_for_spans(receiver, 3)] == ["validation"] * 3


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_an_absent_collector_changes_no_answer(run_server, protocol):
    nobody = f"http://127.0.0.1:{free_port()}"
    server = run_server(POLICIES, args=["--continue-on-errors"], env=telemetry_env(nobody, protocol))
    for _ in range(3):
        response = server.post("/validate/pod-privileged", PRIVILEGED)
        assert response.status_code == 200
        assert response.json()["response"]["status"]["message"] == "Privileged container is not allowed"
    assert server.post("/validate_raw/raw-mutation", RAW_REVIEW).status_code == 200
    metrics = f"http://127.0.0.1:{server.metrics_port}/metrics"
    # Prometheus still counts (workers publish about once a second).
    wait_for(lambda: "kubewarden_policy_evaluations_total{" in requests.get(metrics, timeout=10).text)
    server.process.terminate()
    assert server.process.wait(timeout=30) == 0
    assert "Traceback" not in server.log()


def test_an_unknown_protocol_is_refused_at_startup(run_server):
    server = run_server({"pod-privileged": POLICIES["pod-privileged"]}, wait=False,
                        env=telemetry_env("http://127.0.0.1:1", "http/json"))
    assert server.process.wait(timeout=60) == 1
    assert "OTLP protocol 'http/json' is not supported" in server.log()


def test_the_overflow_series_is_sent_with_the_sdks_overflow_attribute_only():
    from kwserver.observability.metrics import EVALUATION_LABELS, OVERFLOW
    from kwserver.observability.otlp_metrics import evaluation_attributes

    assert evaluation_attributes(dict(zip(EVALUATION_LABELS, OVERFLOW, strict=True))) == {"otel.metric.overflow": True}
