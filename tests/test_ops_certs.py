"""`pilot certs`: what it writes, that TLS clients accept it exactly where they should, and that it never
overwrites a deployment's keys by accident."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from flwr.cli.supernode.register import try_load_public_key

from pilot.cli import main
from pilot.coordination import free_port
from pilot.ops import certs

SITES = ["client_0", "client_1"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> certs.Bundle:
    out = tmp_path_factory.mktemp("certs") / "secrets"
    return certs.create(out, ["link.example.org", "10.0.0.5", "127.0.0.1"], ["localhost", "127.0.0.1"], SITES)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_private_files_are_private_and_public_ones_readable(bundle):
    roles = ["server", "energy", "site-client_0", "site-client_1"]
    private = ["ca.key", "superlink.key", "redis.key", "blob.key", "redis-password", "redis-users.acl",
               "sites/client_0", "sites/client_1", *(f"redis-passwords/{role}" for role in roles)]
    public = ["ca.crt", "superlink.crt", "redis.crt", "blob.crt", "sites/client_0.pub", "sites/client_1.pub"]
    for name in private:
        assert stat.S_IMODE((bundle.out / name).stat().st_mode) == 0o600, name
    for name in public:
        assert stat.S_IMODE((bundle.out / name).stat().st_mode) == 0o644, name
    assert sorted(p.relative_to(bundle.out).as_posix() for p in bundle.out.rglob("*") if p.is_file()) == \
        sorted(private + public), "nothing else (no temporary files) is left behind"
    passwords = [(bundle.out / name).read_text().strip() for name in private if "password" in name]
    assert len(set(passwords)) == len(passwords) == 5 and min(map(len, passwords)) >= 40
    acl = (bundle.out / "redis-users.acl").read_text()
    assert [line.split()[1] for line in acl.splitlines()] == ["default", *roles]
    assert not [pw for pw in passwords if pw in acl], "the ACL file holds hashes, never a password"


def test_server_certificates_are_signed_by_the_ca_for_their_hosts(bundle):
    ca = load_cert(bundle.ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name, hosts in (("superlink", ["link.example.org", "10.0.0.5", "127.0.0.1"]),
                        ("blob", ["link.example.org", "10.0.0.5", "127.0.0.1"]),
                        ("redis", ["localhost", "127.0.0.1"])):
        cert = load_cert(bundle.path(f"{name}.crt"))
        cert.verify_directly_issued_by(ca)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = sans.get_values_for_type(x509.DNSName) + [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
        assert sorted(names) == sorted(hosts), name
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert certs.subject_alt_names(["::1"]) == [x509.IPAddress(ipaddress.ip_address("::1"))]


def handshake(bundle: certs.Bundle, server_name: str, cafile: Path | None) -> str:
    """A real TLS handshake on loopback against redis.crt: '' when it succeeds, else the client's error."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(bundle.path("redis.crt"), bundle.path("redis.key"))
    client_ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.sendall(b"x")
        return ""
    except ssl.SSLError as error:
        return str(error)
    finally:
        thread.join(timeout=10)
        listener.close()


def test_tls_clients_trust_the_certificates_only_with_the_ca_and_for_their_hosts(bundle):
    assert handshake(bundle, "localhost", bundle.ca) == ""
    assert handshake(bundle, "127.0.0.1", bundle.ca) == ""
    assert "Hostname mismatch" in handshake(bundle, "redis.example.org", bundle.ca)
    assert "certificate verify failed" in handshake(bundle, "localhost", None)


def test_site_keys_are_openssh_p384_pairs_that_flower_accepts(bundle):
    for site in SITES:
        private = serialization.load_ssh_private_key(bundle.site_private_key(site).read_bytes(), password=None)
        public_text = bundle.site_public_key(site).read_text()
        assert public_text.startswith("ecdsa-sha2-nistp384 ") and public_text.strip().endswith(f"pilot-{site}")
        public = serialization.load_ssh_public_key(public_text.encode())
        assert public.public_numbers() == private.public_key().public_numbers(), "the pair belongs together"
        assert try_load_public_key(bundle.site_public_key(site)), "flwr supernode register reads it"
    first, second = (bundle.site_public_key(s).read_text().split()[1] for s in SITES)
    assert first != second
    assert bundle.registered_sites() == SITES


def test_existing_files_are_never_overwritten_without_force(tmp_path):
    out = tmp_path / "secrets"
    certs.create(out, ["localhost"], ["localhost"], ["a"])
    ca_before = (out / "ca.crt").read_bytes()
    with pytest.raises(certs.CertsError, match="refusing to overwrite") as error:
        certs.create(out, ["localhost"], ["localhost"], ["a"])
    assert str(out / "ca.key") in str(error.value)
    assert (out / "ca.crt").read_bytes() == ca_before
    # one existing file is enough to refuse the whole set: no half-replaced deployment
    (out / "sites" / "a").unlink()
    with pytest.raises(certs.CertsError):
        certs.create(out, ["localhost"], ["localhost"], ["a"])
    assert not (out / "sites" / "a").exists() and (out / "ca.crt").read_bytes() == ca_before
    certs.create(out, ["localhost"], ["localhost"], ["a"], force=True)
    assert (out / "ca.crt").read_bytes() != ca_before


def test_bad_input_is_reported():
    assert certs.parse_list(" a, b ,a,", "sites") == ["a", "b"]
    with pytest.raises(certs.CertsError, match="no sites given"):
        certs.parse_list(" , ", "sites")
    with pytest.raises(certs.CertsError, match="site name '../x'"):
        certs.check_site_names(["client_0", "../x"])
    with pytest.raises(certs.CertsError, match="reserved"):
        certs.check_site_names(["server"])
    with pytest.raises(certs.CertsError, match="no site public keys"):
        certs.register(certs.Bundle(Path("/nonexistent-pilot-certs")), "secure-deployment")


def test_the_command_prints_every_next_step_and_refuses_a_second_run(tmp_path, capsys):
    out = tmp_path / "secrets"
    assert main(["certs", "--out", str(out), "--superlink-host", "link.example.org", "--redis-host",
                 "redis.example.org", "--sites", "client_0,client_1,client_2"]) == 0
    text = capsys.readouterr().out
    assert "--tls-port 6380" in text and f"--aclfile {out / 'redis-users.acl'}" in text
    assert f'rediss://ROLE@redis.example.org:6380/0?ssl_ca_certs={out / "ca.crt"}' in text
    assert f"PILOT_REDIS_PASSWORD_FILE={out / 'redis-passwords'}/ROLE" in text
    assert "--enable-supernode-auth" in text and f"--ssl-certfile {out / 'superlink.crt'}" in text
    assert 'address = "link.example.org:8000"' in text and f'root-certificates = "{out / "ca.crt"}"' in text
    assert f"pilot certs register --out {out}" in text
    for i, site in enumerate(["client_0", "client_1", "client_2"]):
        assert f"--auth-supernode-private-key {out / 'sites' / site} --node-config 'name=\"{site}\" " \
               f"partition-id={i} redis-url=\"rediss://site-{site}@redis.example.org:6380/0" in text
    assert "--insecure" not in text
    for password in [out / "redis-password", *(out / "redis-passwords").iterdir()]:
        assert password.read_text().strip() not in text, "a password itself is never printed"
    assert main(["certs", "--out", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_register_reports_a_superlink_it_cannot_reach(tmp_path, monkeypatch, capsys):
    """The real `flwr supernode register`, against a port where no SuperLink listens: every site FAILED, exit 1."""
    out = tmp_path / "secrets"
    certs.create(out, ["localhost"], ["localhost"], ["client_0"])
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "nowhere"\n\n[superlink.nowhere]\naddress = "127.0.0.1:{free_port()}"\n'
        f'root-certificates = "{out / "ca.crt"}"\n')
    monkeypatch.setenv("FLWR_HOME", str(flwr_home))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["certs", "register", "--out", str(out), "--connection", "nowhere"]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["client_0: FAILED"]
    assert "unavailable" in captured.err
