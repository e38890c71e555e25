"""Pre-flight TLS check: does the SuperLink at an address present a certificate we trust?"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from certs.files import CertificateError
from certs.x509 import check_ca, load_certificate


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) into its parts, with a clear error."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise CertificateError(f"address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def probe_tls(*, address: str, ca_path: Path, timeout: float = 5.0) -> str:
    """Open one TLS handshake to ``address`` verifying it against the consortium CA.

    Nothing is sent after the handshake. Use it before starting a SuperNode so a
    wrong CA, wrong host name or expired certificate is reported as such instead
    of as a generic connection failure.

    Returns:
        The negotiated TLS version.

    Raises:
        CertificateError: Naming what failed and what to do.
    """
    check_ca(load_certificate(ca_path), source=ca_path)
    host, port = split_address(address)
    context = ssl.create_default_context(cafile=str(ca_path))
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                return str(tls.version())
    except ssl.SSLCertVerificationError as err:
        raise CertificateError(
            f"the SuperLink at {address} is not trusted with {ca_path}: {err.verify_message}. "
            "Check that ca.pem is the consortium's CA and that the server certificate "
            f"covers {host!r} (`medfed certs check --cert server.pem --host {host}`)"
        ) from err
    except ssl.SSLError as err:
        raise CertificateError(f"TLS handshake with {address} failed: {err}; is it a TLS endpoint?") from err
    except OSError as err:
        raise CertificateError(f"cannot reach {address}: {err}") from err
