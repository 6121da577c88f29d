"""Clients that stall, flood or send too much never delay other clients' requests (the HTTP worker)."""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator

import pytest
import requests

from tests.support.certs import make_ca, make_cert
from tests.support.paths import SERVER_FIXTURES, load_json, policy_path

pytestmark = pytest.mark.integration

POLICIES = {"pod-privileged": {"module": policy_path("pod-privileged")}}
PRIVILEGED = load_json(SERVER_FIXTURES / "pod_with_privileged_containers.json")
UNPRIVILEGED = load_json(SERVER_FIXTURES / "pod_without_privileged_containers.json")
HALF_HEADER = b"POST /validate/pod-privileged HTTP/1.1\r\nHost: x\r\n"
PARTIAL_BODY = (b"POST /validate/pod-privileged HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{\"req")
STALLED = 200  # connections of each kind


@contextlib.contextmanager
def stalled_connections(port: int, kinds: dict[str, bytes | None],
                        tls: ssl.SSLContext | None = None) -> Iterator[list[socket.socket]]:
    """`STALLED` connections per kind, each sending its bytes (None: not even a TLS ClientHello)."""
    opened: list[socket.socket] = []
    try:
        for payload in kinds.values():
            for _ in range(STALLED):
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                if payload is not None and tls is not None:
                    sock = tls.wrap_socket(sock, server_hostname="localhost")
                if payload:
                    sock.sendall(payload)
                opened.append(sock)
        yield opened
    finally:
        for sock in opened:
            sock.close()


def _normal_requests_are_answered(url: str, verify: str | bool = True) -> None:
    # A stalled server made these wait past 40 s; 5 s is far beyond what an evaluation takes.
    with requests.Session() as session:
        for _ in range(20):
            for body, allowed in ((PRIVILEGED, False), (UNPRIVILEGED, True)):
                reply = session.post(url + "/validate/pod-privileged", json=body, timeout=5, verify=verify)
                assert reply.status_code == 200 and reply.json()["response"]["allowed"] is allowed
            session.close()  # a new connection each time: accepting must not be blocked either


def test_stalled_clients_do_not_delay_other_requests(run_server):
    server = run_server(POLICIES, env={"KUBEWARDEN_WORKERS": "2"})
    with stalled_connections(server.port, {"half header": HALF_HEADER, "partial body": PARTIAL_BODY}) as sockets:
        _normal_requests_are_answered(server.url)
        assert all(sock.fileno() != -1 for sock in sockets)


def test_stalled_clients_do_not_delay_other_requests_over_tls(run_server, tmp_path):
    ca = make_ca(tmp_path, "ca")
    cert = make_cert(tmp_path, "server", ca)
    server = run_server(POLICIES, scheme="https", env={"KUBEWARDEN_WORKERS": "2"},
                        args=["--cert-file", str(cert.cert), "--key-file", str(cert.key)])
    client = ssl.create_default_context(cafile=str(ca.cert))
    kinds = {"no ClientHello": None, "half header": HALF_HEADER, "partial body": PARTIAL_BODY}
    with stalled_connections(server.port, kinds, tls=client):
        _normal_requests_are_answered(server.url, verify=str(ca.cert))


def _read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    with contextlib.suppress(ConnectionResetError):  # closed with our unread bytes still in its buffer
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_slow_requests_are_answered_408_and_idle_connections_closed(run_server):
    server = run_server(POLICIES, env={
        "KUBEWARDEN_WORKERS": "1", "KWSERVER_HEADER_TIMEOUT_SECONDS": "0.5",
        "KWSERVER_BODY_TIMEOUT_SECONDS": "0.5", "KWSERVER_KEEPALIVE_TIMEOUT_SECONDS": "1"})
    for payload in (HALF_HEADER, PARTIAL_BODY):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(payload)
            reply = _read_until_closed(sock)
        assert reply.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert reply.endswith(b"The request did not arrive in time.")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        assert _read_until_closed(sock) == b""  # idle: closed without a word
    _normal_requests_are_answered(server.url)


def test_a_tls_handshake_that_never_comes_is_closed(run_server, tmp_path):
    ca = make_ca(tmp_path, "ca")
    cert = make_cert(tmp_path, "server", ca)
    server = run_server(POLICIES, scheme="https", args=["--cert-file", str(cert.cert), "--key-file", str(cert.key)],
                        env={"KUBEWARDEN_WORKERS": "1", "KWSERVER_TLS_HANDSHAKE_TIMEOUT_SECONDS": "0.5"})
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        assert _read_until_closed(sock) == b""
    _normal_requests_are_answered(server.url, verify=str(ca.cert))


def test_connections_past_the_cap_are_refused_with_503(run_server):
    server = run_server(POLICIES, env={"KUBEWARDEN_WORKERS": "1", "KWSERVER_MAX_CONNECTIONS_PER_WORKER": "4"})
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(4)]
    try:
        # The held connections are accepted in order; one more is one too many.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            reply = _read_until_closed(sock)
        assert reply.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert reply.endswith(b"Too many connections, try again.")
    finally:
        for sock in held:
            sock.close()
    _normal_requests_are_answered(server.url)


def test_headers_past_64_kib_are_answered_431(run_server):
    server = run_server(POLICIES, env={"KUBEWARDEN_WORKERS": "1"})
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /validate/pod-privileged HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
        assert _read_until_closed(sock).startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    _normal_requests_are_answered(server.url)


def test_a_body_past_the_limit_is_refused_before_it_is_sent(run_server):
    server = run_server(POLICIES, env={"KUBEWARDEN_WORKERS": "1"})
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /validate/pod-privileged HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 4194304\r\n\r\n")
        head = sock.recv(65536)  # answered at once, with the body still to come
        assert head.startswith(b"HTTP/1.1 413 ")
        assert b"connection: close" in head.lower()
        # A client that sends the body anyway past what is drained is cut off.
        with contextlib.suppress(OSError):
            for _ in range(20):
                sock.sendall(b"x" * 1024 * 1024)
        assert _read_until_closed(sock) == b""
    _normal_requests_are_answered(server.url)
