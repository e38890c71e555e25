"""Consortium provisioning: the CA, the SuperLink certificate, site identities, checks.

Generated keys and certificates are git-ignored and never bundled into the Flower
App Bundle; see ``certs/README.md`` for what each file is and who keeps it.
"""

from certs.files import CertificateError
from certs.site_keys import (
    SITE_KEY,
    SITE_PUB,
    SiteKeys,
    check_site_name,
    create_site_keys,
    fingerprint,
    load_site_private_key,
    load_site_public_key,
    verify_site_keys,
)
from certs.tls import probe_tls, split_address
from certs.x509 import (
    CA_CERT,
    CA_KEY,
    LOOPBACK_HOSTS,
    SERVER_CERT,
    SERVER_KEY,
    IssuedFiles,
    certificate_hosts,
    create_ca,
    create_server_certificate,
    load_certificate,
    verify_server_certificate,
)

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "LOOPBACK_HOSTS",
    "SERVER_CERT",
    "SERVER_KEY",
    "SITE_KEY",
    "SITE_PUB",
    "CertificateError",
    "IssuedFiles",
    "SiteKeys",
    "certificate_hosts",
    "check_site_name",
    "create_ca",
    "create_server_certificate",
    "create_site_keys",
    "fingerprint",
    "load_certificate",
    "load_site_private_key",
    "load_site_public_key",
    "probe_tls",
    "split_address",
    "verify_server_certificate",
    "verify_site_keys",
]
