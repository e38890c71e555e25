"""``medfed certs ...``: provision the consortium CA, the SuperLink certificate and site keys.

Mounted on the ``medfed`` front door by :func:`register_certs_commands`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from certs.files import CertificateError
from certs.site_keys import create_site_keys, verify_site_keys
from certs.tls import probe_tls
from certs.x509 import (
    CA_CERT,
    certificate_hosts,
    check_ca,
    create_ca,
    create_server_certificate,
    load_certificate,
    verify_server_certificate,
)
from federation.console import console

certs_app = typer.Typer(
    name="certs",
    help="Consortium certificates: CA, SuperLink TLS certificate, site keys, checks.",
    no_args_is_help=True,
    add_completion=False,
)

ForceOpt = Annotated[bool, typer.Option("--force", help="Replace existing files (old keys are lost).")]


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {escape(str(err))}")
    raise typer.Exit(code=2)


def ca_file(path: Path) -> Path:
    """A CA given as its folder (``certs/ca``) or its file (``certs/ca/ca.pem``)."""
    return path / CA_CERT if path.is_dir() else path


@certs_app.command("init")
def init_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for ca.pem and ca.key.")] = Path("certs/ca"),
    name: Annotated[str, typer.Option("--name", help="CA common name.")] = "medfed consortium CA",
    days: Annotated[int, typer.Option("--days", min=1, help="Validity in days.")] = 3650,
    force: ForceOpt = False,
) -> None:
    """Create the consortium CA (coordinator, once). Keep ca.key offline."""
    try:
        files = create_ca(out_dir=out, name=name, days=days, force=force)
    except CertificateError as err:
        _fail(err)
    console.print(f"CA certificate  {files.cert}  (public: give it to every site)")
    console.print(f"CA private key  {files.key}  (0600: keep it offline, never on the SuperLink)")


@certs_app.command("server")
def server_command(
    host: Annotated[
        list[str], typer.Option("--host", help="DNS name or IP hospitals connect to (repeatable).")
    ],
    ca: Annotated[Path, typer.Option("--ca", help="CA folder (with ca.pem and ca.key).")] = Path("certs/ca"),
    out: Annotated[Path, typer.Option("--out", help="Folder for server.pem, server.key, ca.pem.")] = Path(
        "certs/server"
    ),
    days: Annotated[int, typer.Option("--days", min=1, help="Validity in days.")] = 365,
    force: ForceOpt = False,
) -> None:
    """Issue the SuperLink's TLS certificate, valid for every --host (and localhost)."""
    try:
        files = create_server_certificate(ca_dir=ca, hosts=host, out_dir=out, days=days, force=force)
        cert = verify_server_certificate(cert_path=files.cert, ca_path=files.ca_cert, hosts=host, key_path=files.key)
    except CertificateError as err:
        _fail(err)
    console.print(f"SuperLink certificate  {files.cert}  valid for {certificate_hosts(cert)}")
    console.print(f"SuperLink private key  {files.key}  (0600: stays on the coordinator machine)")
    console.print(f"CA certificate copy    {files.ca_cert}")


@certs_app.command("site")
def site_command(
    name: Annotated[str, typer.Argument(help="Site name, e.g. hospital-a.")],
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Folder for site.key and site.pub (default certs/sites/NAME).")
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Create a site's SuperNode key pair (run it at the hospital; send only site.pub)."""
    out = out or Path("certs/sites") / name
    try:
        keys = create_site_keys(name=name, out_dir=out, force=force)
    except CertificateError as err:
        _fail(err)
    console.print(f"private key  {keys.private_key}  (0600: never leaves the hospital)")
    console.print(f"public key   {keys.public_key}  fingerprint {keys.fingerprint}")
    console.print("Send site.pub to the coordinator, who registers it with:")
    console.print(f"  flwr supernode register {keys.public_key} <connection> --name {name}", markup=False)


@certs_app.command("check")
def check_command(
    ca: Annotated[Path, typer.Option("--ca", help="Consortium ca.pem (or its folder).")] = Path("certs/ca"),
    cert: Annotated[Optional[Path], typer.Option("--cert", help="SuperLink certificate to check.")] = None,
    key: Annotated[Optional[Path], typer.Option("--key", help="Its private key (must match, 0600).")] = None,
    host: Annotated[
        Optional[list[str]], typer.Option("--host", help="A host the certificate must cover (repeatable).")
    ] = None,
    site_key: Annotated[Optional[Path], typer.Option("--site-key", help="A site's site.key to check.")] = None,
    site_pub: Annotated[Optional[Path], typer.Option("--site-pub", help="Its site.pub (must match).")] = None,
    connect: Annotated[
        Optional[str], typer.Option("--connect", help="HOST:PORT: check the live SuperLink's TLS against the CA.")
    ] = None,
) -> None:
    """Check certificates and keys: validity dates, CA signature, host names, key match."""
    ca_path = ca_file(ca)
    try:
        if cert is not None:
            checked = verify_server_certificate(cert_path=cert, ca_path=ca_path, hosts=host or [], key_path=key)
            console.print(
                f"[green]ok[/] {cert}: signed by {ca_path}, valid until "
                f"{checked.not_valid_after_utc:%Y-%m-%d}, hosts {certificate_hosts(checked)}"
            )
        if site_key is not None:
            fp = verify_site_keys(private_key=site_key, public_key=site_pub)
            console.print(f"[green]ok[/] {site_key}: SuperNode key {fp}")
        if connect is not None:
            version = probe_tls(address=connect, ca_path=ca_path)
            console.print(f"[green]ok[/] {connect}: {version}, certificate trusted by {ca_path}")
        if cert is None and site_key is None and connect is None:
            check_ca(load_certificate(ca_path), source=ca_path)
            console.print(f"[green]ok[/] {ca_path}: CA certificate")
    except CertificateError as err:
        _fail(err)


def register_certs_commands(app: typer.Typer) -> None:
    """Mount the consortium's ``certs`` group on the ``medfed`` app."""
    app.add_typer(certs_app, name="certs")
