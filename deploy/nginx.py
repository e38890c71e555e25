"""The reverse proxy that exposes only Flower's Fleet API: nginx config rendering and start-up."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from certs import CertificateError, verify_server_certificate

NGINX_DIR = Path(__file__).resolve().parent / "nginx"
FLEET_TEMPLATE = NGINX_DIR / "medfed-fleet.conf.template"
STANDALONE_TEMPLATE = NGINX_DIR / "standalone.conf.template"
_PLACEHOLDER = re.compile(r"\$\{(MEDFED_[A-Z_]+)\}")


def render_template(template: Path, values: dict[str, str]) -> str:
    """Fill the ``${MEDFED_*}`` placeholders of ``template`` (nginx's own ``$vars`` stay).

    Raises:
        ValueError: A placeholder has no value, or a value is not used.
    """
    text = template.read_text()
    wanted = set(_PLACEHOLDER.findall(text))
    missing = sorted(wanted - values.keys())
    unused = sorted(values.keys() - wanted)
    if missing or unused:
        raise ValueError(f"{template.name}: missing values {missing}, unknown values {unused}")
    for name, value in values.items():
        if any(ch in str(value) for ch in ";{}\n\"'"):
            raise ValueError(f"{template.name}: value of {name} ({value!r}) contains nginx syntax characters")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


@dataclass(frozen=True)
class FleetProxy:
    """Where the proxy listens, which certificate it shows, and the loopback SuperLink behind it."""

    listen: str
    server_name: str
    ssl_cert: Path
    ssl_key: Path
    ca_cert: Path
    superlink_port: int


def render_fleet_proxy(proxy: FleetProxy, *, check: bool = True) -> str:
    """The ``server {}`` block for ``/etc/nginx/conf.d/`` exposing only ``/v1/fleet/``.

    Args:
        proxy: Listen address, certificate files and the SuperLink's loopback port.
        check: Verify the certificate (CA signature, dates, ``server_name``) first.
    """
    if check:
        hosts = [] if proxy.server_name == "_" else [proxy.server_name]
        verify_server_certificate(
            cert_path=proxy.ssl_cert, ca_path=proxy.ca_cert, hosts=[*hosts, "localhost"], key_path=proxy.ssl_key
        )
    return render_template(
        FLEET_TEMPLATE,
        {
            "MEDFED_LISTEN": proxy.listen,
            "MEDFED_SERVER_NAME": proxy.server_name,
            "MEDFED_SSL_CERT": str(proxy.ssl_cert.resolve()),
            "MEDFED_SSL_KEY": str(proxy.ssl_key.resolve()),
            "MEDFED_CA_CERT": str(proxy.ca_cert.resolve()),
            "MEDFED_SUPERLINK_PORT": str(proxy.superlink_port),
        },
    )


def write_standalone(proxy: FleetProxy, *, prefix: Path) -> list[str]:
    """Write a self-contained nginx set-up under ``prefix`` and return the command starting it.

    The command runs nginx in the foreground (``daemon off``) so the caller owns
    its PID; no root and no system nginx config are needed.
    """
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        raise CertificateError("nginx is not installed (Debian/Ubuntu: `apt-get install nginx`)")
    prefix = prefix.resolve()
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    site = prefix / "medfed-fleet.conf"
    site.write_text(render_fleet_proxy(proxy))
    main = prefix / "nginx.conf"
    main.write_text(
        render_template(STANDALONE_TEMPLATE, {"MEDFED_PREFIX": str(prefix), "MEDFED_SITE_CONF": str(site)})
    )
    return [nginx, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(main)]
