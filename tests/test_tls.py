"""TLS and mutual TLS on the API port; readiness stays plain HTTP (spec §7.1, reference test_tls)."""

import pytest
import requests

from tests.support.certs import make_ca, make_cert
from tests.support.paths import SERVER_FIXTURES, load_json, policy_path
from tests.support.server import wait_for

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


def test_a_refused_client_certificate_gets_an_alert_and_a_log_line(run_server, tmp_path):
    import socket
    import ssl

    ca = make_ca(tmp_path, "ca")
    server_cert = make_cert(tmp_path, "server", ca)
    server = run_server(POLICIES, scheme="https", args=[
        "--cert-file", str(server_cert.cert), "--key-file", str(server_cert.key),
        "--client-ca-file", str(make_ca(tmp_path, "client-ca").cert)])
    stranger = make_cert(tmp_path, "stranger", make_ca(tmp_path, "unknown-ca"), san="DNS:client")
    context = ssl.create_default_context(cafile=str(ca.cert))
    context.load_cert_chain(str(stranger.cert), str(stranger.key))
    # TLS 1.3: the client's side of the handshake ends before the server has checked its certificate, so
    # the refusal arrives as an alert on the first read, instead of a bare close.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls, \
            pytest.raises(ssl.SSLError, match="ALERT_UNKNOWN_CA"):
        tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        tls.recv(1024)
    wait_for(lambda: "TLS handshake with 127.0.0.1 refused: CERTIFICATE_VERIFY_FAILED" in server.log(), timeout=10)


def test_tls_flags_must_come_together(run_server, tmp_path):
    ca = make_ca(tmp_path, "ca")
    with pytest.raises(RuntimeError, match="both certificate and key must be provided together"):
        run_server(POLICIES, args=["--cert-file", str(ca.cert)])


def _served_certificate_name(server, ca, client) -> str:
    import socket
    import ssl

    context = ssl.create_default_context(cafile=str(ca.cert))
    context.load_cert_chain(str(client.cert), str(client.key))
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        subject = dict(item[0] for item in tls.getpeercert()["subject"])
        return subject["commonName"]


def test_detect_certificate_rotation(run_server, tmp_path):
    ca = make_ca(tmp_path, "ca")
    cert1, cert2 = make_cert(tmp_path, "server-1", ca), make_cert(tmp_path, "server-2", ca)
    live_cert, live_key = tmp_path / "tls.crt", tmp_path / "tls.key"
    live_cert.write_bytes(cert1.cert.read_bytes())
    live_key.write_bytes(cert1.key.read_bytes())
    client_cas = [make_ca(tmp_path, "client-ca-a"), make_ca(tmp_path, "client-ca-b")]
    live_cas = [tmp_path / "client-ca-1.pem", tmp_path / "client-ca-2.pem"]
    for live, ca_pair in zip(live_cas, client_cas, strict=True):
        live.write_bytes(ca_pair.cert.read_bytes())
    client = make_cert(tmp_path, "client-a", client_cas[0], san="DNS:client")
    server = run_server(POLICIES, scheme="https", env={"KUBEWARDEN_WORKERS": "1"}, args=[
        "--cert-file", str(live_cert), "--key-file", str(live_key),
        "--client-ca-file", ",".join(str(p) for p in live_cas)])
    _readiness_is_plain_http(server)
    assert _served_certificate_name(server, ca, client) == "server-1"

    live_cert.write_bytes(cert2.cert.read_bytes())  # only the certificate: the old pair stays
    assert _served_certificate_name(server, ca, client) == "server-1"
    live_key.write_bytes(cert2.key.read_bytes())  # now the key too: switch
    assert _served_certificate_name(server, ca, client) == "server-2"

    new_cas = [make_ca(tmp_path, "client-ca-c"), make_ca(tmp_path, "client-ca-d")]
    for live, ca_pair in zip(live_cas, new_cas, strict=True):
        live.write_bytes(ca_pair.cert.read_bytes())
    for i, ca_pair in enumerate(new_cas):
        new_client = make_cert(tmp_path, f"client-new-{i}", ca_pair, san="DNS:client")
        reply = requests.post(server.url + "/validate/pod-privileged", json=UNPRIVILEGED, verify=str(ca.cert),
                              cert=(str(new_client.cert), str(new_client.key)), timeout=5)
        assert reply.status_code == 200
    with pytest.raises(requests.exceptions.RequestException):
        requests.post(server.url + "/validate/pod-privileged", json=UNPRIVILEGED, verify=str(ca.cert),
                      cert=(str(client.cert), str(client.key)), timeout=5)
