"""Certificate and client-CA rotation in the TLS context cache (in-process; tests/test_tls.py serves it)."""

from __future__ import annotations

import logging
import ssl

import pytest

from kwserver.server.tls import TlsContextCache, TlsError
from tests.support.certs import make_ca, make_cert, openssl, pem_block, reencoded_key


@pytest.fixture
def pki(tmp_path):
    ca = make_ca(tmp_path, "ca")
    pairs = [make_cert(tmp_path, f"server-{i}", ca) for i in (1, 2)]
    client_cas = [make_ca(tmp_path, f"client-ca-{i}") for i in range(3)]
    live_cert, live_key = tmp_path / "tls.crt", tmp_path / "tls.key"
    live_cert.write_bytes(pairs[0].cert.read_bytes())
    live_key.write_bytes(pairs[0].key.read_bytes())
    return {"dir": tmp_path, "ca": ca, "pairs": pairs, "client_cas": client_cas, "cert": live_cert, "key": live_key}


def served_name(server_context: ssl.SSLContext, ca_file) -> str:
    """The common name of the certificate a handshake with `server_context` presents (in memory)."""
    client_context = ssl.create_default_context(cafile=str(ca_file))
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(client_in, client_out, server_hostname="localhost")
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    done = set()
    for _ in range(10):
        for side in (client, server):
            if side in done:
                continue
            try:
                side.do_handshake()
                done.add(side)
            except ssl.SSLWantReadError:
                pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if client in done:
            return dict(item[0] for item in client.getpeercert()["subject"])["commonName"]
    raise AssertionError("no handshake")


def client_ca_names(context: ssl.SSLContext) -> list[str]:
    return sorted(dict(item[0] for item in ca["subject"])["commonName"] for ca in context.get_ca_certs())


def renew_keeping_the_key(pki, name: str):
    """A new certificate for the live key (cert-manager's default `rotationPolicy: Never` does this)."""
    directory, ca = pki["dir"], pki["ca"]
    (directory / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("req", "-new", "-key", str(pki["key"]), "-subj", f"/CN={name}", "-out", f"{name}.csr", cwd=directory)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=directory)
    return (directory / f"{name}.pem").read_bytes()


def test_a_renewal_that_keeps_the_key_is_picked_up(pki):
    cache = TlsContextCache(str(pki["cert"]), str(pki["key"]), [])
    first = cache.context()
    pki["cert"].write_bytes(renew_keeping_the_key(pki, "server-1-renewed"))
    renewed = cache.context()
    assert renewed is not first and cache.reloads == 1
    assert served_name(renewed, pki["ca"].cert) == "server-1-renewed"


def test_the_pair_is_reloaded_only_once_both_files_changed(pki, caplog):
    cache = TlsContextCache(str(pki["cert"]), str(pki["key"]), [])
    first = cache.context()
    assert served_name(first, pki["ca"].cert) == "server-1"
    assert cache.context() is first  # nothing changed: the same context
    new = pki["pairs"][1]
    pki["cert"].write_bytes(new.cert.read_bytes())
    with caplog.at_level(logging.INFO, logger="kwserver.server.tls"):
        assert cache.context() is first and cache.reloads == 0
    assert caplog.records == []  # half a rotation is no error: the key is on its way
    pki["key"].write_bytes(new.key.read_bytes())
    rotated = cache.context()
    assert rotated is not first and cache.reloads == 1
    assert served_name(rotated, pki["ca"].cert) == "server-2"
    assert cache.context() is rotated


def test_a_key_rotated_first_waits_for_its_certificate(pki):
    cache = TlsContextCache(str(pki["cert"]), str(pki["key"]), [])
    first = cache.context()
    new = pki["pairs"][1]
    pki["key"].write_bytes(new.key.read_bytes())
    assert cache.context() is first
    pki["cert"].write_bytes(new.cert.read_bytes())
    assert served_name(cache.context(), pki["ca"].cert) == "server-2"


def test_a_failing_reload_keeps_the_previous_context_and_waits_for_new_files(pki, caplog):
    cache = TlsContextCache(str(pki["cert"]), str(pki["key"]), [])
    first = cache.context()
    # Both files change, but to a pair that does not match: the reload fails.
    pki["cert"].write_bytes(pki["pairs"][1].cert.read_bytes())
    pki["key"].write_bytes(pki["pairs"][0].key.read_bytes() + b"\n")
    with caplog.at_level(logging.ERROR, logger="kwserver.server.tls"):
        assert cache.context() is first
        assert cache.context() is first
    failures = [r for r in caplog.records if "TLS reload failed, keeping the previous certificate" in r.message]
    assert len(failures) == 1  # not retried on every connection
    assert served_name(first, pki["ca"].cert) == "server-1" and cache.reloads == 0
    # Garbage, then files that go missing: still serving, still no exception.
    pki["cert"].write_bytes(b"not a certificate")
    pki["key"].write_bytes(b"not a key")
    assert cache.context() is first
    pki["cert"].unlink()
    pki["key"].unlink()
    assert cache.context() is first
    # A good pair again: it is used.
    pki["cert"].write_bytes(pki["pairs"][1].cert.read_bytes())
    pki["key"].write_bytes(pki["pairs"][1].key.read_bytes())
    assert served_name(cache.context(), pki["ca"].cert) == "server-2" and cache.reloads == 1


def _client_ca_files(pki, count):
    files = []
    for i, ca in enumerate(pki["client_cas"][:count]):
        path = pki["dir"] / f"live-client-ca-{i}.pem"
        path.write_bytes(ca.cert.read_bytes())
        files.append(path)
    return files


def test_client_cas_rotate_on_any_change_and_unusable_ones_are_skipped(pki, caplog):
    files = _client_ca_files(pki, 2)
    cache = TlsContextCache(str(pki["cert"]), str(pki["key"]), [str(f) for f in files])
    first = cache.context()
    assert first.verify_mode == ssl.CERT_REQUIRED
    assert client_ca_names(first) == ["client-ca-0", "client-ca-1"]
    files[1].write_bytes(pki["client_cas"][2].cert.read_bytes())
    second = cache.context()
    assert second is not first and client_ca_names(second) == ["client-ca-0", "client-ca-2"]
    assert served_name(second, pki["ca"].cert) == "server-1"  # the pair did not change
    with caplog.at_level(logging.WARNING, logger="kwserver.server.tls"):
        files[0].write_bytes(b"garbage")
        third = cache.context()
    assert client_ca_names(third) == ["client-ca-2"]
    assert any(f"skipping client CA file {files[0]}" in r.message for r in caplog.records)
    # None usable: the reload fails, the previous CAs stay.
    files[1].unlink()
    assert cache.context() is third and cache.reloads == 2


def test_no_usable_client_ca_at_start_is_an_error(pki):
    bad = pki["dir"] / "bad-ca.pem"
    bad.write_bytes(b"garbage")
    with pytest.raises(TlsError, match=f"no usable client CA certificate in {bad}, "):
        TlsContextCache(str(pki["cert"]), str(pki["key"]), [str(bad), str(pki["dir"] / "missing.pem")]).context()


def test_a_client_ca_rotation_keeps_a_half_rotated_pair_out(pki):
    files = _client_ca_files(pki, 1)
    cache = TlsContextCache(str(pki["cert"]), str(pki["key"]), [str(files[0])])
    cache.context()
    pki["cert"].write_bytes(pki["pairs"][1].cert.read_bytes())  # the certificate alone: half a rotation
    files[0].write_bytes(pki["client_cas"][1].cert.read_bytes())
    rotated = cache.context()
    assert client_ca_names(rotated) == ["client-ca-1"] and cache.reloads == 1
    assert served_name(rotated, pki["ca"].cert) == "server-1"  # the loaded pair, not the files' new certificate


# --- key files: every key the reference reads ----------------------------------------------------------

def _pair_for_key(pki, name: str, key_pem: bytes):
    """A certificate of the test CA for a key given as PEM (written where openssl can read it)."""
    directory, ca = pki["dir"], pki["ca"]
    key_file = directory / f"{name}.key"
    key_file.write_bytes(key_pem)
    (directory / f"{name}.ext").write_text("subjectAltName=DNS:localhost\n")
    openssl("req", "-new", "-key", str(key_file), "-subj", f"/CN={name}", "-out", f"{name}.csr", cwd=directory)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=directory)
    return directory / f"{name}.pem"


KEY_FILES = {
    # label on the file, how the DER inside is encoded
    "pkcs8-ec": ("PRIVATE KEY", "ec", "pkcs8"),
    "sec1-ec": ("EC PRIVATE KEY", "ec", "traditional"),
    "controller-v1.32": ("RSA PRIVATE KEY", "ec", "traditional"),  # SEC1 DER under the RSA label
    "pkcs1-rsa": ("RSA PRIVATE KEY", "rsa", "traditional"),
    "pkcs8-rsa": ("PRIVATE KEY", "rsa", "pkcs8"),
    "pkcs1-rsa-as-ec": ("EC PRIVATE KEY", "rsa", "traditional"),
    "pkcs8-under-rsa-label": ("RSA PRIVATE KEY", "ec", "pkcs8"),
    "pkcs8-ed25519": ("PRIVATE KEY", "ed25519", "pkcs8"),
}


@pytest.mark.parametrize("name", sorted(KEY_FILES))
def test_every_key_the_reference_reads_serves(pki, name):
    label, kind, encoding = KEY_FILES[name]
    key_file = pki["dir"] / f"live-{name}.key"
    key_file.write_bytes(reencoded_key(kind, encoding, label))
    cert = _pair_for_key(pki, name, reencoded_key(kind, "pkcs8", "PRIVATE KEY"))
    assert served_name(TlsContextCache(str(cert), str(key_file), []).context(), pki["ca"].cert) == name


def test_other_blocks_around_the_key_are_skipped(pki):
    key = reencoded_key("ec", "traditional", "RSA PRIVATE KEY")
    cert = _pair_for_key(pki, "bundled", reencoded_key("ec", "pkcs8", "PRIVATE KEY"))
    key_file = pki["dir"] / "bundled-live.key"
    key_file.write_bytes(pem_block("EC PARAMETERS", bytes.fromhex("06082a8648ce3d030107")) + key + cert.read_bytes())
    assert served_name(TlsContextCache(str(cert), str(key_file), []).context(), pki["ca"].cert) == "bundled"


def test_a_rotation_to_a_mislabelled_key_is_picked_up(pki):
    cache = TlsContextCache(str(pki["cert"]), str(pki["key"]), [])
    cache.context()
    cert = _pair_for_key(pki, "rotated-v1.32", reencoded_key("ec", "pkcs8", "PRIVATE KEY"))
    pki["cert"].write_bytes(cert.read_bytes())
    pki["key"].write_bytes(reencoded_key("ec", "traditional", "RSA PRIVATE KEY"))
    assert served_name(cache.context(), pki["ca"].cert) == "rotated-v1.32" and cache.reloads == 1


@pytest.mark.parametrize("content,message", [
    (b"", "no private key in {key} (expected a PEM block labelled PRIVATE KEY or RSA PRIVATE KEY or EC PRIVATE KEY)"),
    (pem_block("ENCRYPTED PRIVATE KEY", b"0000"), "no private key in {key}: encrypted keys are not supported"),
    (pem_block("PRIVATE KEY", b"\x30\x03\x02\x01\x00") * 2, "2 private keys in {key}, expected one"),
    (b"-----BEGIN PRIVATE KEY-----\n!!!\n-----END PRIVATE KEY-----\n", "cannot read the private key in {key}: "),
    (pem_block("RSA PRIVATE KEY", b"not der"), "cannot read the private key in {key}: not a PKCS#8, PKCS#1"),
    (pem_block("PRIVATE KEY", b"\x30\x06\x02\x01\x00\x30\x01\x00"),
     "cannot use the certificate in {cert} with the key in {key}: "),  # a PKCS#8 shape, no key inside
])
def test_a_key_that_cannot_be_read_names_the_file(pki, content, message):
    pki["key"].write_bytes(content)
    with pytest.raises(TlsError) as error:
        TlsContextCache(str(pki["cert"]), str(pki["key"]), []).context()
    assert str(error.value).startswith(message.format(key=pki["key"], cert=pki["cert"]))


def test_a_key_of_another_certificate_names_both_files(pki):
    pki["key"].write_bytes(pki["pairs"][1].key.read_bytes())
    with pytest.raises(TlsError, match=f"the private key in {pki['key']} does not belong to the certificate in "
                                       f"{pki['cert']}"):
        TlsContextCache(str(pki["cert"]), str(pki["key"]), []).context()
