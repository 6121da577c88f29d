"""Clients that stall, flood or send too much never delay other clients' requests (the HTTP worker)."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
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
    server.post("/validate/pod-privileged", PRIVILEGED)  # the worker is up and accepting
    server.session.close()
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(4)]
    for sock in held:
        sock.sendall(HALF_HEADER)  # mid-request: none of them is idle, so none makes room
    time.sleep(0.5)  # read by the worker
    try:
        # The held connections are accepted in order; one more is one too many.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            reply = _read_until_closed(sock)
        assert reply.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert reply.endswith(b"Too many connections, try again.")
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.5)  # their closes reach the worker (else a new connection may still find it full)
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


# --- what one client may cost: issue 24 -----------------------------------------------------------

def _worker(server) -> psutil.Process:
    workers = psutil.Process(server.process.pid).children()
    assert len(workers) == 1
    return workers[0]


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """The server closed (or reset) the connection within `seconds`, whatever it sent before."""
    sock.settimeout(seconds)
    try:
        while sock.recv(1 << 20):
            pass
    except TimeoutError:
        return False
    except OSError:
        pass  # reset
    return True


def test_a_client_that_never_reads_costs_one_answer_and_is_cut_off(run_server):
    # Large answers (the uid is echoed back: 2.5 MB each), pipelined, and nothing read: the worker reads no
    # further than what it can answer, and drops the client once it has read nothing for the send timeout.
    server = run_server(POLICIES, env={"KUBEWARDEN_WORKERS": "1", "KWSERVER_SEND_TIMEOUT_SECONDS": "2"})
    worker = _worker(server)
    _normal_requests_are_answered(server.url)
    before = worker.memory_info().rss
    review = {**PRIVILEGED, "request": {**PRIVILEGED["request"], "uid": "u" * 2_500_000}}
    body = json.dumps(review).encode()
    request = (b"POST /validate/pod-privileged HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(1)
        sent = 0
        with contextlib.suppress(TimeoutError, OSError):
            for _ in range(40):
                sock.sendall(request)
                sent += 1
        grown = (worker.memory_info().rss - before) / 2**20
        assert sent < 40, "the worker kept reading requests it could not answer"
        assert grown < 40, f"worker RSS grew {grown:.0f} MiB for answers nobody reads"
        _normal_requests_are_answered(server.url)
        assert _closed_within(sock, 10)
    assert worker.is_running()


def test_silent_connections_are_closed_and_idle_ones_make_room(run_server):
    server = run_server(POLICIES, env={"KUBEWARDEN_WORKERS": "1", "KWSERVER_MAX_CONNECTIONS_PER_WORKER": "50",
                                       "KWSERVER_HEADER_TIMEOUT_SECONDS": "2"})
    silent = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(120)]
    try:
        # Past the cap, the connections that never spoke make room for those that do: nobody is locked out.
        _normal_requests_are_answered(server.url)
        # And one that never speaks is closed after the header timeout, not the 75 s keep-alive timeout.
        assert _closed_within(silent[-1], 6)
    finally:
        for sock in silent:
            sock.close()


def test_a_busy_worker_does_not_slow_down_accepting(run_server):
    # One worker evaluates a 3 s policy; the other must take every new connection at once (a worker with
    # more connections than a busy one used to wait 20 ms per accept: 6 s for these 300).
    server = run_server({**POLICIES, "sleep": {"module": policy_path("sleeping"),
                                               "settings": {"sleepMilliseconds": 0}}},
                        env={"KUBEWARDEN_WORKERS": "2", "KUBEWARDEN_POLICY_TIMEOUT": "10"})
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
        body = json.dumps({"request": {"uid": "slow", "object": {"metadata": {"annotations": {
            "kubewarden.sleep_duration_milliseconds": 3000}}}}}).encode()
        slow.sendall(b"POST /validate_raw/sleep HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.3)
        started = time.monotonic()
        held = []
        try:
            for _ in range(300):
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                held.append(sock)
                sock.sendall(b"GET /readiness HTTP/1.1\r\nHost: x\r\n\r\n")
                assert sock.recv(65536).startswith(b"HTTP/1.1 404 ")
            elapsed = time.monotonic() - started
        finally:
            for sock in held:
                sock.close()
        print(f"300 connections answered in {elapsed:.2f} s")
        assert elapsed < 2.0, f"300 connections took {elapsed:.1f} s to be answered"
        assert b"200 OK" in slow.recv(65536)


def test_http_1_0_keep_alive_answers_say_so(run_server):
    server = run_server(POLICIES, env={"KUBEWARDEN_WORKERS": "1"})
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        for _ in range(2):  # the connection stays open for the second request
            sock.sendall(b"GET /nothing HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            head = sock.recv(65536).lower()
            assert head.startswith(b"http/1.1 404 ") and b"connection: keep-alive\r\n" in head
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /nothing HTTP/1.0\r\n\r\n")
        assert b"connection: close\r\n" in _read_until_closed(sock).lower()


def test_a_worker_out_of_file_descriptors_refuses_instead_of_spinning(run_server):
    # 100 descriptors: the connection cap is lowered to fit, and clients past it get a 503 at once.
    server = run_server(POLICIES, env={"KUBEWARDEN_WORKERS": "1"},
                        command=["prlimit", "--nofile=100:100", sys.executable, "-m", "kwserver", "serve"])
    held = []
    try:
        for _ in range(100):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(HALF_HEADER)
            held.append(sock)
        time.sleep(0.5)  # the connections the worker kept are all mid-request now
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            assert _read_until_closed(sock).startswith(b"HTTP/1.1 503 ")
        worker = _worker(server)
        cpu = worker.cpu_times()
        time.sleep(2)
        spent = sum(worker.cpu_times()[:2]) - sum(cpu[:2])
        assert spent < 0.5, f"the worker spent {spent:.1f} s of CPU holding its connections"
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.5)  # the worker has seen them close
    _normal_requests_are_answered(server.url)
    assert "at most" in server.log() and server.log().count("accept") < 5


EMFILE_SERVER = """
import asyncio, resource, socket, sys
import uvloop
from kwserver.server.worker import ConnectionLimits, HttpServer
resource.setrlimit(resource.RLIMIT_NOFILE, (60, 60))
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1024)
print(listener.getsockname()[1], flush=True)
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
loop = uvloop.new_event_loop()
limits = ConnectionLimits(header_timeout=60, body_timeout=60, idle_timeout=60, handshake_timeout=60,
                          max_connections=10_000)  # far above what 60 descriptors allow
HttpServer(loop, app, limits, None, lambda: None).start([listener])
loop.run_forever()
"""


def test_out_of_descriptors_the_waiting_client_gets_503_and_accepting_pauses(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", EMFILE_SERVER], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    held = []
    try:
        port = int(process.stdout.readline())
        for _ in range(80):  # more than the process may open
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        time.sleep(0.5)
        refused = []
        for sock in held:
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                refused.append(sock.recv(65536))
        assert any(reply.startswith(b"HTTP/1.1 503 ") for reply in refused)
        cpu = psutil.Process(process.pid).cpu_times()
        time.sleep(2)
        spent = sum(psutil.Process(process.pid).cpu_times()[:2]) - sum(cpu[:2])
        assert spent < 0.5, f"{spent:.1f} s of CPU in 2 s: accept() is spinning"
    finally:
        for sock in held:
            sock.close()
        process.kill()
        _, stderr = process.communicate()
    assert stderr.count("cannot accept connections") < 10, stderr[-2000:]


def test_a_worker_waits_for_another_with_fewer_connections_unless_it_is_stuck():
    from kwserver.server.worker import ConnectionTable

    table = ConnectionTable()
    table.join(0)
    table.join(1)  # both slots in this process: the table looks at slots, not at who writes them
    table.counts[1] = 1
    assert not table.should_defer(0, 2)  # one more than the other: it takes the connection
    assert table.should_defer(0, 3)
    table.evaluation_started(1)  # it accepts as soon as this evaluation ends
    assert table.should_defer(0, 3)
    table.evaluating_since[1] -= ConnectionTable.LONG_EVALUATION_MS  # a long evaluation: not waited for
    assert not table.should_defer(0, 3)
    table.evaluation_ended(1)
    table.beats[1] -= ConnectionTable.STALE_SECONDS + 1  # no heartbeat (killed, stuck): not waited for
    assert not table.should_defer(0, 3)
    table.beat(1)
    table.leave(1)
    assert not table.should_defer(0, 3)
