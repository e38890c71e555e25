"""Consortium provisioning: CA, SuperLink certificate, site keys, checks on use, and the FAB."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from typer.testing import CliRunner

from certs import (
    CertificateError,
    create_ca,
    create_server_certificate,
    create_site_keys,
    load_certificate,
    probe_tls,
    verify_server_certificate,
    verify_site_keys,
)
from certs.cli import certs_app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _out(result) -> str:  # noqa: ANN001 - click Result; rich wraps long lines
    return " ".join(result.output.split())


def _issue(ca_dir: Path, out: Path, *, start: dt.datetime, days: int) -> Path:
    """A localhost certificate signed by the CA with chosen dates (medfed never issues these)."""
    from cryptography.hazmat.primitives import hashes, serialization

    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    ca_cert = load_certificate(ca_dir / "ca.pem")
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    out.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a SuperLink certificate for superlink.example.org/10.1.2.3 and one site, via the CLI."""
    root = tmp_path_factory.mktemp("pki")
    for args in (
        ["init", "--out", str(root / "ca")],
        ["server", "--host", "superlink.example.org", "--host", "10.1.2.3", "--ca", str(root / "ca"),
         "--out", str(root / "server")],
        ["site", "hospital-a", "--out", str(root / "sites" / "hospital-a")],
    ):
        result = runner.invoke(certs_app, args)
        assert result.exit_code == 0, result.output
    return root


def test_files_permissions_and_subject_alternative_names(pki: Path) -> None:
    for private in ("ca/ca.key", "server/server.key", "sites/hospital-a/site.key"):
        assert _mode(pki / private) == 0o600, private
    for public in ("ca/ca.pem", "server/server.pem", "server/ca.pem", "sites/hospital-a/site.pub"):
        assert _mode(pki / public) == 0o644, public
    for folder in ("ca", "server", "sites/hospital-a"):
        assert _mode(pki / folder) == 0o700, folder
    cert = load_certificate(pki / "server" / "server.pem")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3", "127.0.0.1"]
    assert (pki / "server" / "ca.pem").read_bytes() == (pki / "ca" / "ca.pem").read_bytes()
    ca = load_certificate(pki / "ca" / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    cert.verify_directly_issued_by(ca)


def test_site_keys_are_what_flower_loads(pki: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    site = pki / "sites" / "hospital-a"
    private = load_ssh_private_key((site / "site.key").read_bytes(), None)  # as flower-supernode reads it
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    public_pem = try_load_public_key(site / "site.pub")  # as `flwr supernode register` reads it
    assert public_pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert (site / "site.pub").read_text().endswith(" medfed-site:hospital-a\n")
    assert verify_site_keys(private_key=site / "site.key", public_key=site / "site.pub").startswith("SHA256:")


def test_nothing_is_overwritten_without_force(pki: Path, tmp_path: Path) -> None:
    before = (pki / "ca" / "ca.key").read_bytes()
    result = runner.invoke(certs_app, ["init", "--out", str(pki / "ca")])
    assert result.exit_code == 2
    assert "already exists; refusing to overwrite" in _out(result) and "--force" in _out(result)
    assert (pki / "ca" / "ca.key").read_bytes() == before
    result = runner.invoke(certs_app, ["site", "hospital-a", "--out", str(pki / "sites" / "hospital-a")])
    assert result.exit_code == 2 and "site.key already exists" in _out(result)
    # --force replaces, still 0600
    create_site_keys(name="b", out_dir=tmp_path / "b")
    old = (tmp_path / "b" / "site.key").read_bytes()
    result = runner.invoke(certs_app, ["site", "b", "--out", str(tmp_path / "b"), "--force"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b" / "site.key").read_bytes() != old and _mode(tmp_path / "b" / "site.key") == 0o600


def test_certificates_are_checked_on_use(pki: Path, tmp_path: Path) -> None:
    cert, ca = pki / "server" / "server.pem", pki / "ca" / "ca.pem"
    good = verify_server_certificate(cert_path=cert, ca_path=ca, hosts=["superlink.example.org", "10.1.2.3"],
                                     key_path=pki / "server" / "server.key")
    with pytest.raises(CertificateError, match=r"server.pem expired on .* reissue it"):
        verify_server_certificate(cert_path=cert, ca_path=ca, now=good.not_valid_after_utc + dt.timedelta(days=1))
    now = dt.datetime.now(dt.timezone.utc)
    future = _issue(pki / "ca", tmp_path / "future.pem", start=now + dt.timedelta(days=2), days=30)
    with pytest.raises(CertificateError, match="future.pem is not valid yet"):
        verify_server_certificate(cert_path=future, ca_path=ca)
    past = _issue(pki / "ca", tmp_path / "past.pem", start=now - dt.timedelta(days=30), days=29)
    with pytest.raises(CertificateError, match="past.pem expired on"):
        verify_server_certificate(cert_path=past, ca_path=ca)
    result = runner.invoke(certs_app, ["check", "--ca", str(ca), "--cert", str(past)])
    assert result.exit_code == 2 and "past.pem expired on" in _out(result)
    with pytest.raises(CertificateError, match="not valid for host 'other.example.org'"):
        verify_server_certificate(cert_path=cert, ca_path=ca, hosts=["other.example.org"])
    other = create_ca(out_dir=tmp_path / "other-ca")
    with pytest.raises(CertificateError, match="is not signed by the consortium CA"):
        verify_server_certificate(cert_path=cert, ca_path=other.cert)
    with pytest.raises(CertificateError, match="is not a CA certificate"):
        verify_server_certificate(cert_path=cert, ca_path=cert)
    # the CLI says the same and exits 2
    result = runner.invoke(certs_app, ["check", "--ca", str(other.cert), "--cert", str(cert)])
    assert result.exit_code == 2 and "not signed by the consortium CA" in _out(result)
    result = runner.invoke(certs_app, ["check", "--ca", str(pki / "ca"), "--cert", str(cert), "--host", "10.9.9.9"])
    assert result.exit_code == 2 and "not valid for host '10.9.9.9'" in _out(result)
    result = runner.invoke(certs_app, ["check", "--ca", str(pki / "ca"), "--cert", str(cert), "--host", "10.1.2.3"])
    assert result.exit_code == 0 and "ok" in _out(result)


def test_expired_ca_and_mismatched_or_exposed_keys_are_refused(pki: Path, tmp_path: Path) -> None:
    ca = load_certificate(pki / "ca" / "ca.pem")
    with pytest.raises(CertificateError, match="ca.pem expired on"):
        verify_server_certificate(cert_path=pki / "server" / "server.pem", ca_path=pki / "ca" / "ca.pem",
                                  now=ca.not_valid_after_utc + dt.timedelta(seconds=1))
    with pytest.raises(CertificateError, match="is not the private key of"):
        verify_server_certificate(cert_path=pki / "server" / "server.pem", ca_path=pki / "ca" / "ca.pem",
                                  key_path=pki / "ca" / "ca.key")
    other = create_site_keys(name="other", out_dir=tmp_path / "other")
    with pytest.raises(CertificateError, match="is not the public half of"):
        verify_site_keys(private_key=pki / "sites" / "hospital-a" / "site.key", public_key=other.public_key)
    other.private_key.chmod(0o644)
    with pytest.raises(CertificateError, match=r"readable by others \(mode 644\); run `chmod 600"):
        verify_site_keys(private_key=other.private_key)


def test_bad_names_are_refused(tmp_path: Path) -> None:
    create_ca(out_dir=tmp_path / "ca")
    with pytest.raises(CertificateError, match="neither an IP address nor a DNS name"):
        create_server_certificate(ca_dir=tmp_path / "ca", hosts=["https://x.org/"], out_dir=tmp_path / "s")
    with pytest.raises(CertificateError, match="site name '../evil' is not valid"):
        create_site_keys(name="../evil", out_dir=tmp_path / "e")
    assert not (tmp_path / "s").exists() and not (tmp_path / "e").exists()


def _tls_server(cert: Path, key: Path) -> tuple[int, threading.Thread]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        with listener:
            for _ in range(2):
                conn, _addr = listener.accept()
                try:
                    with context.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(1)
                except (ssl.SSLError, OSError):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return port, thread


def test_probe_tls_trusts_only_the_consortium_ca(pki: Path, tmp_path: Path) -> None:
    port, thread = _tls_server(pki / "server" / "server.pem", pki / "server" / "server.key")
    assert probe_tls(address=f"127.0.0.1:{port}", ca_path=pki / "ca" / "ca.pem").startswith("TLSv1.")
    other = create_ca(out_dir=tmp_path / "other-ca")
    with pytest.raises(CertificateError, match=f"SuperLink at 127.0.0.1:{port} is not trusted"):
        probe_tls(address=f"127.0.0.1:{port}", ca_path=other.cert)
    thread.join(timeout=10)
    with pytest.raises(CertificateError, match="cannot reach"):
        probe_tls(address=f"127.0.0.1:{port}", ca_path=pki / "ca" / "ca.pem", timeout=2)


def test_generated_keys_and_certificates_never_enter_the_fab(pki: Path) -> None:
    """Build the FAB exactly as `flwr build`/`flwr run` do, with key material planted in certs/."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_files
    from flwr.cli.utils import collect_files

    files: dict[str, bytes | Path] = dict(collect_files(ROOT))
    planted = {
        "certs/ca/ca.key": pki / "ca" / "ca.key",
        "certs/ca/ca.pem": pki / "ca" / "ca.pem",
        "certs/server/server.key": pki / "server" / "server.key",
        "certs/server/server.pem": pki / "server" / "server.pem",
        "certs/server/ca.pem": pki / "server" / "ca.pem",
        "certs/sites/hospital-a/site.key": pki / "sites" / "hospital-a" / "site.key",
        "certs/sites/hospital-a/site.pub": pki / "sites" / "hospital-a" / "site.pub",
        "certs/elsewhere/extra.key": pki / "ca" / "ca.key",
        "certs/elsewhere/extra.crt": pki / "ca" / "ca.pem",
        "certs/sites/hospital-a/notes.json": b"{}",
        "certs/sites/hospital-a/policy.yaml": b"x: 1",
    }
    files.update({name: path.read_bytes() if isinstance(path, Path) else path for name, path in planted.items()})
    fab, _ = build_fab_from_files(files)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert "certs/x509.py" in names and "client/app.py" in names  # the app code is there ...
    leaked = [n for n in names if n.startswith("certs/") and not (n.endswith(".py") or n == "certs/README.md")]
    assert leaked == []  # ... but no key, certificate or site file
    secrets = [path.read_bytes().strip() for path in planted.values() if isinstance(path, Path)]
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        contents = [archive.read(name) for name in names]
    assert not [n for n, c in zip(names, contents) if any(secret in c for secret in secrets)]
