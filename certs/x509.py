"""The consortium CA and the SuperLink's TLS certificate (X.509, ECDSA P-384).

Layout written by the ``medfed certs`` commands:

* ``<ca>/ca.pem`` (public, every party gets it) and ``<ca>/ca.key`` (0600, kept
  offline by the consortium coordinator);
* ``<server>/server.pem``, ``<server>/server.key`` (0600) and a copy of ``ca.pem``:
  everything the SuperLink and its reverse proxy need, without the CA key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.files import CertificateError, check_private_file, make_dir, refuse_overwrite, write_file

logger = logging.getLogger(__name__)

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
#: Names every SuperLink certificate carries: the coordinator's own processes
#: (ServerApp runtime, ``flwr`` CLI, the reverse proxy) reach it over loopback.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1")
_CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class IssuedFiles:
    """Files written by one provisioning step."""

    cert: Path
    key: Path
    ca_cert: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _parse_host(host: str) -> x509.GeneralName:
    host = host.strip()
    if not host:
        raise CertificateError("empty --host value: give a DNS name or an IP address")
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    if any(ch in host for ch in " /:@") or host.startswith(".") or host.endswith("."):
        raise CertificateError(f"--host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host.lower())


def create_ca(
    *, out_dir: Path, name: str = "medfed consortium CA", days: int = 3650, force: bool = False
) -> IssuedFiles:
    """Create the consortium's certificate authority.

    Args:
        out_dir: Folder receiving ``ca.pem`` and ``ca.key`` (created 0700).
        name: The CA's common name.
        days: Validity in days.
        force: Replace existing files (every certificate the old CA signed stops working).

    Returns:
        The written files (``cert`` and ``ca_cert`` are both ``ca.pem``).
    """
    cert_path, key_path = out_dir / CA_CERT, out_dir / CA_KEY
    refuse_overwrite([cert_path, key_path], force=force)
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = _now() - _CLOCK_SKEW
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA384())
    )
    make_dir(out_dir, private=True)
    write_file(key_path, _key_pem(key), private=True, force=force)
    write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False, force=force)
    logger.info("consortium CA written to %s", out_dir)
    return IssuedFiles(cert=cert_path, key=key_path, ca_cert=cert_path)


def load_certificate(path: Path) -> x509.Certificate:
    """Read one PEM certificate, with a clear error when it is missing or not one."""
    if not path.is_file():
        raise CertificateError(f"certificate {path} does not exist")
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as err:
        raise CertificateError(f"{path} is not a PEM certificate ({err})") from err


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read a PEM private key (0600 enforced)."""
    check_private_file(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise CertificateError(f"{path} is not an unencrypted PEM private key ({err})") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{path}: expected an EC private key, got {type(key).__name__}")
    return key


def create_server_certificate(
    *,
    ca_dir: Path,
    hosts: list[str],
    out_dir: Path,
    days: int = 365,
    force: bool = False,
) -> IssuedFiles:
    """Issue the SuperLink's TLS certificate, signed by the consortium CA.

    Args:
        ca_dir: Folder with ``ca.pem`` and ``ca.key``.
        hosts: Every DNS name and IP address hospitals use to reach the SuperLink
            (its reverse proxy); ``localhost`` and ``127.0.0.1`` are always added.
        out_dir: Folder receiving ``server.pem``, ``server.key`` and a copy of ``ca.pem``.
        days: Validity in days (capped by the CA's own expiry).
        force: Replace existing files.

    Returns:
        The written files.
    """
    if not hosts:
        raise CertificateError("give at least one --host: the name or IP hospitals connect to")
    ca_cert = load_certificate(ca_dir / CA_CERT)
    ca_key = load_private_key(ca_dir / CA_KEY)
    check_ca(ca_cert, source=ca_dir / CA_CERT)
    names: list[x509.GeneralName] = []
    for host in [*hosts, *LOOPBACK_HOSTS]:
        name = _parse_host(host)
        if name not in names:
            names.append(name)
    cert_path, key_path, ca_copy = out_dir / SERVER_CERT, out_dir / SERVER_KEY, out_dir / CA_CERT
    refuse_overwrite([cert_path, key_path, ca_copy], force=force)
    key = _new_key()
    start = _now() - _CLOCK_SKEW
    end = min(start + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cn = str(names[0].value)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    make_dir(out_dir, private=True)
    write_file(key_path, _key_pem(key), private=True, force=force)
    write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False, force=force)
    write_file(ca_copy, ca_cert.public_bytes(serialization.Encoding.PEM), private=False, force=force)
    logger.info("SuperLink certificate for %s written to %s", [str(n.value) for n in names], out_dir)
    return IssuedFiles(cert=cert_path, key=key_path, ca_cert=ca_copy)


def check_validity(cert: x509.Certificate, *, source: Path, now: dt.datetime | None = None) -> None:
    """Refuse a certificate outside its validity window (warn 30 days before expiry)."""
    now = now or _now()
    if now < cert.not_valid_before_utc:
        raise CertificateError(
            f"{source} is not valid yet (valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC); "
            "check this machine's clock, or reissue the certificate"
        )
    if now > cert.not_valid_after_utc:
        raise CertificateError(
            f"{source} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
            "reissue it (see certs/README.md, 'Rotate')"
        )
    if cert.not_valid_after_utc - now < dt.timedelta(days=30):
        logger.warning("%s expires on %s UTC: reissue it soon", source, f"{cert.not_valid_after_utc:%Y-%m-%d}")


def check_ca(ca_cert: x509.Certificate, *, source: Path, now: dt.datetime | None = None) -> None:
    """Refuse a file that is not a usable CA certificate."""
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CertificateError(f"{source} is not a CA certificate (use the consortium's ca.pem)")
    check_validity(ca_cert, source=source, now=now)


def check_signed_by(cert: x509.Certificate, ca_cert: x509.Certificate, *, source: Path, ca_source: Path) -> None:
    """Refuse a certificate the consortium CA did not sign."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError) as err:
        reason = str(err) or "signature does not verify"
        raise CertificateError(
            f"{source} is not signed by the consortium CA {ca_source} ({reason}); "
            "issue it with `medfed certs server --ca <consortium ca dir>`"
        ) from err


def certificate_hosts(cert: x509.Certificate) -> list[str]:
    """DNS names and IP addresses in the certificate's subject alternative names."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def check_host(cert: x509.Certificate, host: str, *, source: Path) -> None:
    """Refuse a certificate whose subject alternative names do not cover ``host``."""
    wanted = _parse_host(host)
    if isinstance(wanted, x509.IPAddress):
        ok = str(wanted.value) in certificate_hosts(cert)
    else:
        ok = str(wanted.value) in [h.lower() for h in certificate_hosts(cert)]
    if not ok:
        raise CertificateError(
            f"{source} is not valid for host {host!r} (it covers {certificate_hosts(cert)}); "
            f"reissue it with `medfed certs server --host {host} ...`"
        )


def verify_server_certificate(
    *,
    cert_path: Path,
    ca_path: Path,
    hosts: list[str] = (),  # type: ignore[assignment]
    key_path: Path | None = None,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """Check the SuperLink certificate before anything uses it.

    Checks: both files parse; the CA is a CA and in its validity window; the
    certificate is in its validity window, signed by the CA and covers every host
    in ``hosts``; ``key_path`` (when given) is 0600 and matches it.

    Returns:
        The certificate.

    Raises:
        CertificateError: The first problem found, naming the file and the fix.
    """
    ca_cert = load_certificate(ca_path)
    check_ca(ca_cert, source=ca_path, now=now)
    cert = load_certificate(cert_path)
    check_signed_by(cert, ca_cert, source=cert_path, ca_source=ca_path)
    check_validity(cert, source=cert_path, now=now)
    for host in hosts:
        check_host(cert, host, source=cert_path)
    if key_path is not None:
        key = load_private_key(key_path)
        if key.public_key().public_numbers() != cert.public_key().public_numbers():
            raise CertificateError(f"{key_path} is not the private key of {cert_path}")
    return cert
