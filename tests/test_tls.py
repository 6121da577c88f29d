"""TLS and mutual TLS on the API port; readiness stays plain HTTP (spec §7.1, reference test_tls)."""

import pytest
import requests

from tests.conftest import SERVER_FIXTURES, load_json, make_ca, make_cert, policy_path

pytestmark = pytest.mark.integration

POLICIES = {"pod-privileged": {"module": policy_path("pod-privileged")}}
UNPRIVILEGED = load_json(SERVER_FIXTURES / "pod_without_privileged_containers.json")


def _readiness_is_plain_http(server):
    assert requests.get(f"http://127.0.0.1:{server.readiness_port}/readiness", timeout=5).status_code == 200


def test_server_tls(run_server, tmp_path):
    ca = make_ca(tmp_path, "ca")
    server_cert = make_cert(tmp_path, "server", ca)
    server = run_server(POLICIES, args=["--cert-file", str(server_cert.cert), "--key-file", str(server_cert.key)],
                        scheme="https")
    _readiness_is_plain_http(server)
    reply = server.post("/validate/pod-privileged", UNPRIVILEGED, verify=str(ca.cert))
    assert reply.status_code == 200 and reply.json()["response"]["allowed"] is True
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(f"http://127.0.0.1:{server.port}/validate/pod-privileged", json=UNPRIVILEGED, timeout=5)


def test_mutual_tls_with_three_client_cas(run_server, tmp_path):
    ca = make_ca(tmp_path, "ca")
    server_cert = make_cert(tmp_path, "server", ca)
    client_cas = [make_ca(tmp_path, f"client-ca-{i}") for i in range(3)]
    server = run_server(POLICIES, scheme="https", args=[
        "--cert-file", str(server_cert.cert), "--key-file", str(server_cert.key),
        "--client-ca-file", ",".join(str(c.cert) for c in client_cas)])
    _readiness_is_plain_http(server)
    for i, client_ca in enumerate(client_cas):
        client = make_cert(tmp_path, f"client-{i}", client_ca, san="DNS:client")
        reply = server.post("/validate/pod-privileged", UNPRIVILEGED, verify=str(ca.cert),
                            cert=(str(client.cert), str(client.key)))
        assert reply.status_code == 200
    stranger = make_cert(tmp_path, "stranger", make_ca(tmp_path, "unknown-ca"), san="DNS:client")
    for cert in (None, (str(stranger.cert), str(stranger.key))):
        with pytest.raises(requests.exceptions.RequestException):
            requests.post(server.url + "/validate/pod-privileged", json=UNPRIVILEGED, verify=str(ca.cert),
                          cert=cert, timeout=5)


def test_tls_flags_must_come_together(run_server, tmp_path):
    ca = make_ca(tmp_path, "ca")
    with pytest.raises(RuntimeError, match="both certificate and key must be provided together"):
        run_server(POLICIES, args=["--cert-file", str(ca.cert)])
