import json

import pytest

from kwserver.capabilities import NO_KUBERNETES_CLIENT, Capabilities, HostCallError

CAPABILITIES = Capabilities("policy")


def test_dns_lookup_host():
    answer = json.loads(CAPABILITIES("kubewarden", "net", "v1/dns_lookup_host", b'"localhost"'))
    assert "127.0.0.1" in answer["ips"] or "::1" in answer["ips"]


@pytest.mark.parametrize("payload", [b"not json", b"42", b'"' + b'a' * 64 + b'.example"'])
def test_dns_lookup_host_errors_are_host_errors(payload):
    with pytest.raises(HostCallError):
        CAPABILITIES("kubewarden", "net", "v1/dns_lookup_host", payload)


def test_log_never_fails():
    assert CAPABILITIES("kubewarden", "tracing", "log", b'{"level":"info","message":"hi","k":1}') == b""
    assert CAPABILITIES("kubewarden", "tracing", "log", b"garbage") == b""


@pytest.mark.parametrize("call,message", [
    (("other", "x", "y"), "unknown binding: other"),
    (("kubewarden", "nope", "y"), "unknown namespace: nope"),
    (("kubewarden", "net", "v2/other"), "unknown operation: v2/other"),
    (("kubewarden", "kubernetes", "get_resource"), "missing field `api_version`"),
    (("kubernetes", "namespaces", "list"), NO_KUBERNETES_CLIENT),
])
def test_reference_error_strings(call, message, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", "/nonexistent/kubeconfig")
    with pytest.raises(HostCallError, match=message):
        CAPABILITIES(*call, b"{}")
