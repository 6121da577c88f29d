"""The master's readiness and metrics listeners: bounded, and `/status` only for this host."""

from __future__ import annotations

import contextlib
import socket
import time

import psutil
import pytest
import requests

from tests.support.paths import policy_path

pytestmark = pytest.mark.integration

POLICIES = {"pod-privileged": {"module": policy_path("pod-privileged")}}
HALF_REQUEST = b"GET /readiness HTTP/1.1\r\nHost: x\r\n"


def _read_all(sock: socket.socket) -> bytes:
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_half_sent_requests_cost_the_master_no_thread_and_are_dropped(run_server):
    server = run_server(POLICIES, env={"KUBEWARDEN_WORKERS": "1"})
    master = psutil.Process(server.process.pid)
    threads = master.num_threads()
    held = []
    try:
        for port in (server.readiness_port, server.metrics_port):
            for _ in range(150):
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.sendall(HALF_REQUEST)
                held.append(sock)
        time.sleep(0.5)
        assert master.num_threads() <= threads + 2, "a master thread per connection"
        # Probes keep being answered while the listeners are full of stalled clients.
        for _ in range(20):
            reply = requests.get(f"http://127.0.0.1:{server.readiness_port}/readiness", timeout=2)
            assert reply.status_code in (200, 503)
        # Each listener holds a bounded number of them, and drops the rest after its request timeout.
        assert held[-1].recv(1024).startswith(b"HTTP/1.1 503 ")
        held[0].settimeout(10)
        assert _read_all(held[0]) == b""
    finally:
        for sock in held:
            sock.close()
    assert requests.get(f"http://127.0.0.1:{server.readiness_port}/readiness", timeout=2).status_code == 200


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 9))  # no packet is sent: this only picks the outgoing address
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_status_is_served_to_this_host_only(run_server):
    server = run_server(POLICIES, env={"KUBEWARDEN_WORKERS": "1", "KUBEWARDEN_BIND_ADDRESS": "0.0.0.0"})
    status = requests.get(f"http://127.0.0.1:{server.metrics_port}/status", timeout=5)
    assert status.status_code == 200 and status.json()["workers"] == 1
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this host has no address but loopback")
    # Reached on its own address from that address: the same host.
    assert requests.get(f"http://{address}:{server.metrics_port}/status", timeout=5).status_code == 200
    # A client from elsewhere (here: an address that is not the one it reached) gets 403, metrics still 200.
    for path, expected in (("/status", b"HTTP/1.1 403 "), ("/metrics", b"HTTP/1.1 200 ")):
        with socket.socket() as sock:
            sock.settimeout(5)
            sock.bind((address, 0))
            sock.connect(("127.0.0.1", server.metrics_port))
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert _read_all(sock).startswith(expected)


def test_workers_forked_while_a_probe_is_open_boot_and_do_not_hold_it(run_server):
    import signal

    from tests.support.server import wait_for

    server = run_server(POLICIES, env={"KUBEWARDEN_WORKERS": "1"})
    master = psutil.Process(server.process.pid)
    with socket.create_connection(("127.0.0.1", server.readiness_port), timeout=10) as probe:
        probe.sendall(HALF_REQUEST)
        time.sleep(0.3)
        master.send_signal(signal.SIGTTIN)  # one more worker, forked with the probe's connection open
        wait_for(lambda: len(master.children()) == 2, timeout=20)
        probe.sendall(b"\r\n")
        assert _read_all(probe).startswith(b"HTTP/1.1 200 ")  # closed by the master alone: no worker holds it
    assert server.process.poll() is None
    assert requests.get(f"http://127.0.0.1:{server.readiness_port}/readiness", timeout=2).status_code == 200
