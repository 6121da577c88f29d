"""TLS and mutual TLS on the API port; readiness stays plain HTTP (the reference's test_tls)."""

import time

import pytest
import requests

from tests.support.certs import as_controller_v132_wrote_it, make_ca, make_cert
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


def _v132_pair(tmp_path):
    """A server certificate and its key as controllers up to v1.32 wrote it: SEC1 DER labelled RSA."""
    ca = make_ca(tmp_path, "ca")
    pair = make_cert(tmp_path, "server", ca)
    mislabelled = tmp_path / "v1.32.key"
    mislabelled.write_bytes(as_controller_v132_wrote_it(pair.key.read_bytes()))
    return ca, pair.cert, mislabelled


def test_the_v132_controllers_mislabelled_key_serves(run_server, tmp_path):
    ca, cert, key = _v132_pair(tmp_path)
    server = run_server(POLICIES, args=["--cert-file", str(cert), "--key-file", str(key)], scheme="https")
    reply = server.post("/validate/pod-privileged", UNPRIVILEGED, verify=str(ca.cert))
    assert reply.status_code == 200 and reply.json()["response"]["allowed"] is True


def _never_ready(server, timeout: float = 60) -> int:
    """Until the server exits: its exit code; the readiness probe must never have answered 200."""
    deadline = time.monotonic() + timeout
    while server.process.poll() is None and time.monotonic() < deadline:
        try:
            status = requests.get(f"http://127.0.0.1:{server.readiness_port}/readiness", timeout=2).status_code
            assert status != 200, server.log()
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    return server.process.wait(timeout=5)


def test_a_key_that_cannot_be_read_fails_the_start_naming_the_file(run_server, tmp_path):
    ca = make_ca(tmp_path, "ca")
    cert = make_cert(tmp_path, "server", ca)
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"-----BEGIN RSA PRIVATE KEY-----\nbm90IGEga2V5\n-----END RSA PRIVATE KEY-----\n")
    server = run_server(POLICIES, args=["--cert-file", str(cert.cert), "--key-file", str(garbage)], wait=False)
    assert _never_ready(server) == 1
    assert f"cannot read the private key in {garbage}: not a PKCS#8, PKCS#1 (RSA) or SEC1 (EC)" in server.log()


def test_a_worker_that_cannot_serve_tls_never_leaves_readiness_at_200(run_server, tmp_path):
    # The master's pair is fine; the workers' TLS context (a gunicorn config's hook here) is not.
    ca = make_ca(tmp_path, "ca")
    cert = make_cert(tmp_path, "server", ca)
    config = tmp_path / "broken_tls.py"
    config.write_text("def ssl_context(config, factory):\n    raise OSError('the HSM is unreachable')\n")
    server = run_server(POLICIES, args=["--cert-file", str(cert.cert), "--key-file", str(cert.key),
                                        "--gunicorn-config", str(config)], wait=False)
    assert _never_ready(server) != 0
    assert "cannot serve TLS: the HSM is unreachable" in server.log()
