"""`proxies:` in sources.yml (policy-fetcher 1.33): downloads and the OCI callbacks go through them.

A forward proxy of the test's own (tests/support/registries.py, CONNECT tunnels included) runs on a free
loopback port in front of Debian's docker-registry with TLS; what it forwarded is how the tests see
which requests went through it.
"""

from __future__ import annotations

import json
import shutil

import pytest

from kwserver.config import ConfigError
from kwserver.sources.trust import Proxies, parse_sources
from tests.support.modules import answer, host_policy
from tests.support.paths import REPO
from tests.support.registries import ForwardProxy, raw_push, sources_file, start_registry
from tests.support.server import check_config, free_port, kwserver

needs_registry = pytest.mark.skipif(not shutil.which("docker-registry"), reason="needs Debian's docker-registry")
MODULE = REPO / "policies" / "dist" / "pod-privileged.wasm"


# --- the block ----------------------------------------------------------------------------------------

def test_a_proxies_block_is_the_whole_proxy_configuration(tmp_path):
    sources = parse_sources({"proxies": {"https_proxy": "http://proxy.corp:3128", "no_proxy": "127.0.0.1,.corp"}},
                            tmp_path)
    assert sources.proxies == Proxies(https_proxy="http://proxy.corp:3128", no_proxy="127.0.0.1,.corp")
    assert sources.proxies.for_url("https://ghcr.io/v2/") == {"https": "http://proxy.corp:3128"}
    assert sources.proxies.for_url("https://registry.corp/v2/") == {"https": None}  # no_proxy: a domain
    assert sources.proxies.for_url("https://127.0.0.1:5000/v2/") == {"https": None}
    assert sources.proxies.for_url("http://ghcr.io/v2/") == {"http": None}  # no http_proxy: direct
    assert parse_sources({"insecure_sources": []}, tmp_path).proxies is None  # the environment's


@pytest.mark.parametrize("block,message", [
    (["http://proxy:3128"], "proxies must be a map with http_proxy, https_proxy, no_proxy, found list"),
    ({"https_proxy": "http://p:1", "ftp_proxy": "x"}, "proxies: unknown field(s) ['ftp_proxy']"),
    ({"no_proxy": ["a", "b"]}, "proxies.no_proxy must be a string, found list"),
    ({"https_proxy": "proxy.corp:3128"}, "proxies.https_proxy: 'proxy.corp:3128' is not a proxy URL"),
    ({"http_proxy": "socks5://proxy.corp:1080"}, "proxies.http_proxy: 'socks5://proxy.corp:1080' is not a proxy URL"),
])
def test_a_malformed_block_is_a_clear_error(tmp_path, block, message):
    with pytest.raises(ConfigError) as error:
        parse_sources({"proxies": block}, tmp_path)
    assert message in str(error.value)
    # The same through the command line, naming the file.
    path = sources_file(tmp_path, {"proxies": block})
    result = check_config(tmp_path, str(MODULE), "--sources-path", str(path))
    assert result.returncode != 0 and f"cannot load sources from '{path}'" in result.stderr
    assert message in result.stderr


# --- through a proxy ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory):
    registry = start_registry(tmp_path_factory.mktemp("tls-registry"), tls=True)
    yield registry
    registry.stop()


@pytest.fixture
def proxy():
    proxy = ForwardProxy(tunnel=True)
    yield proxy
    proxy.stop()


def _sources(directory, registry, **proxies):
    authority = {registry.host: [{"type": "Data", "data": registry.tls.cert.read_text()}]}
    return sources_file(directory, {"source_authorities": authority, **({"proxies": proxies} if proxies else {})})


@needs_registry
def test_downloads_go_through_the_configured_proxy_unless_no_proxy(tls_registry, proxy, tmp_path):
    plain = _sources(tmp_path, tls_registry)
    pushed = kwserver("push", str(MODULE), tls_registry.ref("proxied/p:v1"), "--sources-path", str(plain), cwd=tmp_path)
    assert pushed.returncode == 0, pushed.stderr
    # An environment proxy that does not exist: sources.yml's block replaces it.
    dead = f"http://127.0.0.1:{free_port()}"
    env = {"HTTPS_PROXY": dead, "HTTP_PROXY": dead, "NO_PROXY": ""}

    through = _sources(tmp_path, tls_registry, https_proxy=proxy.url)
    pulled = kwserver("pull", tls_registry.ref("proxied/p:v1"), "--sources-path", str(through), cwd=tmp_path,
                      env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert proxy.forwarded and set(proxy.forwarded) == {f"CONNECT {tls_registry.host}"}

    proxy.forwarded.clear()
    bypass = _sources(tmp_path, tls_registry, https_proxy=proxy.url, no_proxy="127.0.0.1")
    checked = check_config(tmp_path, tls_registry.ref("proxied/p:v1"), "--sources-path", str(bypass))
    assert checked.returncode == 0, checked.stderr + checked.stdout
    assert proxy.forwarded == []


@needs_registry
def test_the_oci_callbacks_go_through_the_configured_proxy(run_server, tls_registry, proxy, tmp_path):
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}})
    digest = raw_push(tls_registry, "apps/web", "1.0", [("application/vnd.oci.image.layer.v1.tar+gzip", b"x")],
                      config=("application/vnd.oci.image.config.v1+json", config.encode()))
    image = f"{tls_registry.host}/apps/web:1.0"
    policy = host_policy(tmp_path, "digest", "v1/manifest_digest", image, namespace="oci")
    (tmp_path / "through").mkdir()
    server = run_server({"digest": policy}, env={"KUBEWARDEN_WORKERS": "1"}, args=[
        "--sources-path", str(_sources(tmp_path / "through", tls_registry, https_proxy=proxy.url))])
    assert answer(server, "digest") == ("ok", {"digest": digest})
    assert f"CONNECT {tls_registry.host}" in proxy.forwarded

    (tmp_path / "dead").mkdir()
    dead = f"http://127.0.0.1:{free_port()}"
    stopped = run_server({"digest": policy}, env={"KUBEWARDEN_WORKERS": "1"}, args=[
        "--sources-path", str(_sources(tmp_path / "dead", tls_registry, https_proxy=dead))])
    outcome, text = answer(stopped, "digest")
    assert outcome == "error" and "Callback evaluation failure" in text and "proxy" in text.lower(), text
