"""Module references by https:// and http:// URL, sources.yml, and the download directory.

Through the CLI (`kwserver pull`, `kwserver check`) against real web servers on loopback ports:
one over HTTPS with a certificate from a CA made for the test, one over plain HTTP.
"""

from __future__ import annotations

import hashlib
import shutil

import pytest

from tests.support.certs import make_ca, make_cert
from tests.support.paths import REPO
from tests.support.registries import FileServer, sources_file
from tests.support.server import check_config, kwserver

MODULE = REPO / "policies" / "dist" / "pod-privileged.wasm"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    shutil.copy(MODULE, root / "pod-privileged.wasm")
    (root / "not-wasm.wasm").write_text("hello")
    (root / "big.wasm").write_bytes(b"\0asm\x01\0\0\0" + bytes(2 * 1024 * 1024))
    ca = make_ca(root, "web-ca")
    https = FileServer(root, make_cert(root, "web", ca))
    http = FileServer(root)
    yield https, http, ca
    https.stop()
    http.stop()


def test_https_download_with_a_source_authority_lands_in_the_reference_layout(served, tmp_path):
    https, _, ca = served
    sources = sources_file(tmp_path, {"source_authorities": {https.host: [{"type": "Path", "path": str(ca.cert)}]}})
    result = kwserver("pull", https.url("pod-privileged.wasm"), "--sources-path", str(sources),
                      "--policies-download-dir", str(tmp_path / "dl"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    stored = tmp_path / "dl" / "https" / https.host / "pod-privileged.wasm"
    assert stored.read_bytes() == MODULE.read_bytes()
    assert f"sha256:{hashlib.sha256(MODULE.read_bytes()).hexdigest()}" in result.stdout


def test_inline_source_authority_data(served, tmp_path):
    https, _, ca = served
    sources = sources_file(tmp_path, {"source_authorities": {https.host: [{"type": "Data",
                                                                           "data": ca.cert.read_text()}]}})
    result = kwserver("pull", https.url("pod-privileged.wasm"), "--sources-path", str(sources), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "https" / https.host / "pod-privileged.wasm").exists()


def test_https_without_the_ca_is_a_tls_error(served, tmp_path):
    https, _, _ = served
    result = kwserver("pull", https.url("pod-privileged.wasm"), cwd=tmp_path)
    assert result.returncode == 1
    assert "TLS error" in result.stderr and "certificate verify failed" in result.stderr


def test_an_insecure_source_falls_back_to_unverified_tls(served, tmp_path):
    https, _, _ = served
    sources = sources_file(tmp_path, {"insecure_sources": [https.host]})
    result = kwserver("pull", https.url("pod-privileged.wasm"), "--sources-path", str(sources), cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_plain_http_needs_an_insecure_source(served, tmp_path):
    _, http, _ = served
    refused = kwserver("pull", http.url("pod-privileged.wasm"), cwd=tmp_path)
    assert refused.returncode == 1 and "add `" + http.host + "` to insecure_sources" in refused.stderr
    sources = sources_file(tmp_path, {"insecure_sources": [http.host]})
    allowed = kwserver("pull", http.url("pod-privileged.wasm"), "--sources-path", str(sources), cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr
    assert (tmp_path / "http" / http.host / "pod-privileged.wasm").exists()


@pytest.mark.parametrize("path,message", [
    ("not-wasm.wasm", "is not a WebAssembly module"),
    ("missing.wasm", "HTTP 404"),
    ("big.wasm", "more than the limit of 1048576 bytes"),
])
def test_bad_downloads_are_that_policys_error(served, tmp_path, path, message):
    _, http, _ = served
    sources = sources_file(tmp_path, {"insecure_sources": [http.host]})
    result = check_config(tmp_path, http.url(path), "--sources-path", str(sources), "--max-module-size-mib", "1")
    assert result.returncode == 1
    assert f"p: ERROR: bootstrap failure: p: Error while downloading policy 'p' from {http.url(path)}: " \
        in result.stdout
    assert message in result.stdout


def test_downloaded_modules_are_reused_and_a_corrupt_copy_is_replaced(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    shutil.copy(MODULE, root / "pod-privileged.wasm")
    server = FileServer(root)
    url = server.url("pod-privileged.wasm")
    sources = sources_file(tmp_path, {"insecure_sources": [server.host]})
    try:
        assert check_config(tmp_path, url, "--sources-path", str(sources)).returncode == 0
        stored = tmp_path / "http" / server.host / "pod-privileged.wasm"
        stored.write_bytes(b"garbage")  # a corrupt download directory: downloaded again
        assert check_config(tmp_path, url, "--sources-path", str(sources)).returncode == 0
        assert stored.read_bytes() == MODULE.read_bytes()
    finally:
        server.stop()
    # The server is gone: the copy in the download directory is used.
    result = check_config(tmp_path, url, "--sources-path", str(sources))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("doc,message", [
    ({"insecure_source": ["x"]}, "unknown field(s) ['insecure_source']"),
    ({"source_authorities": {"h": [{"type": "Data", "data": "-----BEGIN CERTIFICATE-----\nnope\n"}]}},
     "Raw certificate is not in PEM nor in DER encoding"),
    ({"source_authorities": {"h": [{"type": "Path", "path": "/nonexistent.pem"}]}},
     "Cannot read certificate from file"),
    ({"source_authorities": {"h": [{"type": "File", "path": "x"}]}}, "`type: Path` or `type: Data`"),
])
def test_invalid_sources_file_is_refused(tmp_path, doc, message):
    sources = sources_file(tmp_path, doc)
    result = check_config(tmp_path, str(MODULE), "--sources-path", str(sources))
    assert result.returncode == 1
    assert "cannot load sources from" in result.stderr and message in result.stderr


def test_a_download_dir_that_cannot_be_written_is_that_policys_error(served, tmp_path):
    _, http, _ = served
    sources = sources_file(tmp_path, {"insecure_sources": [http.host]})
    (tmp_path / "blocked").write_text("a file where the download directory should be")
    result = check_config(tmp_path, http.url("pod-privileged.wasm"), "--sources-path", str(sources),
                          "--policies-download-dir", str(tmp_path / "blocked"))
    assert result.returncode == 1
    assert "Error while downloading policy 'p'" in result.stdout and "wasm module cannot be saved to" in result.stdout
