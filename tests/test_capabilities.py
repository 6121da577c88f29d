import json

import pytest

from kwserver.capabilities import NO_KUBERNETES_CLIENT, Capabilities, HostCallError, host_request
from kwserver.host_capabilities import ALLOW_ALL

CAPABILITIES = Capabilities("policy", host_capabilities=ALLOW_ALL)


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
    (("kubewarden", "kubernetes", "can_i"), "missing field `subject_access_review`"),
    (("kubernetes", "namespaces", "list"), "unknown binding: kubernetes"),
])
def test_reference_error_strings(call, message, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", "/nonexistent/kubeconfig")
    with pytest.raises(HostCallError, match=message):
        CAPABILITIES(*call, b"{}")


def test_without_a_cluster_kubernetes_calls_fail_as_the_reference(monkeypatch):
    monkeypatch.setenv("KUBECONFIG", "/nonexistent/kubeconfig")
    with pytest.raises(HostCallError, match=NO_KUBERNETES_CLIENT):
        CAPABILITIES("kubewarden", "kubernetes", "can_i",
                     b'{"subject_access_review": {"user": "u"}, "disable_cache": false}')


@pytest.mark.parametrize("operation", ["list_resources_all", "list_resources_by_namespace", "get_resource"])
def test_field_masks_are_a_set_of_strings(operation):
    payload = {"api_version": "v1", "kind": "Pod", "namespace": "a", "name": "n", "disable_cache": False}
    decoded = host_request("kubewarden", "kubernetes", operation, json.dumps(
        {**payload, "field_masks": ["spec.b", "spec.a", "spec.b"]}).encode())
    assert decoded.fields["field_masks"] == ["spec.a", "spec.b"]
    assert host_request("kubewarden", "kubernetes", operation, json.dumps(payload).encode()).fields["field_masks"] \
        is None
    for masks, message in (("spec", 'invalid type: string "spec", expected a sequence'),
                           ([1], "invalid type: integer `1`, expected a string")):
        with pytest.raises(HostCallError, match=f"^{message}$"):
            host_request("kubewarden", "kubernetes", operation, json.dumps({**payload, "field_masks": masks}).encode())
