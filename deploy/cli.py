"""``medfed deploy ...``: start the consortium's Flower processes, certificates checked first.

Mounted on the ``medfed`` front door by :func:`register_deploy_commands`. Every
command checks the certificates and keys it is given (dates, CA signature, host
names, 0600 keys) and only then replaces itself with the Flower process
(``--print`` shows the command instead). TLS and SuperNode authentication are on
unless ``--insecure`` is given, which logs a warning.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.logging import RichHandler

from certs import CA_CERT, SERVER_CERT, SERVER_KEY, CertificateError, probe_tls
from deploy.commands import (
    FLEET_PUBLIC_PORT,
    SUPERLINK_PORT,
    SuperLinkSpec,
    SuperNodeSpec,
    connection_entry,
    shell,
    superlink_command,
    supernode_command,
)
from deploy.fast_supernode import POLL_ENV
from deploy.flwr_config import write_connection
from deploy.nginx import FleetProxy, render_fleet_proxy, write_standalone
from federation.console import stderr_console as console

deploy_app = typer.Typer(
    name="deploy",
    help="Run a real consortium: SuperLink, Fleet-only reverse proxy, SuperNodes, flwr connection.",
    no_args_is_help=True,
    add_completion=False,
)
InsecureOpt = Annotated[
    bool, typer.Option("--insecure", help="No TLS, no node authentication (closed test networks only; warns).")
]
PrintOpt = Annotated[bool, typer.Option("--print", help="Only print the checked command.")]
PollOpt = Annotated[
    float,
    typer.Option("--poll-interval", min=0.0, help="Seconds between idle polls (Flower's own: 3; 0 = leave Flower's)."),
]


@deploy_app.callback()
def _logging() -> None:
    logging.basicConfig(level=logging.INFO, handlers=[RichHandler(console=console, show_path=False)], force=True)


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {escape(str(err))}")
    raise typer.Exit(code=2)


def _exec(cmd: list[str], *, only_print: bool, env: dict[str, str] | None = None) -> None:
    if env:
        console.print(" ".join(f"{k}={v}" for k, v in env.items()))
    print(shell(cmd))
    if only_print:
        return
    sys.stdout.flush()
    os.execve(cmd[0], cmd, {**os.environ, **(env or {})})


@deploy_app.command("superlink")
def superlink_cmd(
    certs: Annotated[Path, typer.Option("--certs", help="Folder with server.pem, server.key, ca.pem.")] = Path(
        "certs/server"
    ),
    port: Annotated[
        int, typer.Option("--port", help="Loopback port (the proxy forwards Fleet here).")
    ] = SUPERLINK_PORT,
    database: Annotated[
        str, typer.Option("--database", help="LinkState file: registered sites survive restarts.")
    ] = "superlink.db",
    public_host: Annotated[
        Optional[list[str]], typer.Option("--public-host", help="Name hospitals use; the certificate must cover it.")
    ] = None,
    poll_interval: PollOpt = 0.5,
    insecure: InsecureOpt = False,
    only_print: PrintOpt = False,
) -> None:
    """Coordinator: start the SuperLink on 127.0.0.1 with TLS and SuperNode authentication."""
    try:
        spec = SuperLinkSpec(
            certs_dir=certs, port=port, database=database, insecure=insecure, public_hosts=tuple(public_host or ())
        )
        cmd = superlink_command(spec)
    except (CertificateError, FileNotFoundError) as err:
        _fail(err)
    _exec(cmd, only_print=only_print, env={POLL_ENV: str(poll_interval)} if poll_interval else None)


@deploy_app.command("proxy-config")
def proxy_config_cmd(
    server_name: Annotated[str, typer.Option("--server-name", help="Public DNS name of the coordinator.")],
    certs: Annotated[Path, typer.Option("--certs", help="Folder with server.pem, server.key, ca.pem.")] = Path(
        "certs/server"
    ),
    listen: Annotated[str, typer.Option("--listen", help="nginx listen address for hospitals.")] = str(
        FLEET_PUBLIC_PORT
    ),
    superlink_port: Annotated[
        int, typer.Option("--superlink-port", help="The SuperLink's loopback port.")
    ] = SUPERLINK_PORT,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write here (default: stdout).")] = None,
    standalone: Annotated[
        Optional[Path],
        typer.Option("--standalone", help="Write a complete nginx set-up in this folder; print its start command."),
    ] = None,
) -> None:
    """Coordinator: nginx config exposing only the Fleet API (drop into /etc/nginx/conf.d/)."""
    proxy = FleetProxy(
        listen=listen,
        server_name=server_name,
        ssl_cert=certs / SERVER_CERT,
        ssl_key=certs / SERVER_KEY,
        ca_cert=certs / CA_CERT,
        superlink_port=superlink_port,
    )
    try:
        if standalone is not None:
            print(shell(write_standalone(proxy, prefix=standalone)))
            return
        text = render_fleet_proxy(proxy)
    except (CertificateError, ValueError) as err:
        _fail(err)
    if out is None:
        print(text)
    else:
        out.write_text(text)
        console.print(f"wrote {out}; check it with `nginx -t` and reload nginx")


@deploy_app.command("connection")
def connection_cmd(
    name: Annotated[str, typer.Argument(help="Connection name for `flwr run . NAME`.")] = "consortium",
    address: Annotated[str, typer.Option("--address", help="The SuperLink (loopback, coordinator only).")] = (
        f"127.0.0.1:{SUPERLINK_PORT}"
    ),
    ca: Annotated[Path, typer.Option("--ca", help="Consortium ca.pem.")] = Path("certs/server") / CA_CERT,
    insecure: InsecureOpt = False,
) -> None:
    """Coordinator: define the SuperLink connection in Flower's config ($FLWR_HOME/config.toml)."""
    try:
        entry = connection_entry(name=name, address=address, ca_cert=ca, insecure=insecure)
        path = write_connection(name=name, entry=entry)
    except (CertificateError, ValueError) as err:
        _fail(err)
    console.print(f"[superlink.{name}] written to {path}; use `flwr run . {name} --stream`", markup=False)


@deploy_app.command("supernode")
def supernode_cmd(
    superlink: Annotated[str, typer.Option("--superlink", help="The coordinator's proxy, HOST:PORT.")],
    site_name: Annotated[str, typer.Option("--site-name", help="This hospital's name.")],
    data_dir: Annotated[str, typer.Option("--data-dir", help="The site's data folder (required).")],
    state_dir: Annotated[
        str, typer.Option("--state-dir", help="Where the site keeps its privacy ledger and audit log (required).")
    ],
    ca: Annotated[Path, typer.Option("--ca", help="Consortium ca.pem.")] = Path("certs/ca.pem"),
    key: Annotated[Path, typer.Option("--key", help="This site's site.key (0600).")] = Path("certs/site.key"),
    policy: Annotated[str, typer.Option("--policy", help="The site's policy YAML.")] = "",
    pacs: Annotated[str, typer.Option("--pacs", help="The site's PACS YAML: train on its cohort (data from the PACS).")
                    ] = "",
    trusted_entities: Annotated[str, typer.Option(
        "--trusted-entities", help="YAML of trusted ed25519 keys: run only app code (FABs) one of them signed.")] = "",
    runtime_port: Annotated[int, typer.Option("--runtime-port", help="Local port for ClientApp processes.")] = 9094,
    partition_id: Annotated[
        Optional[int], typer.Option("--partition-id", help="Demo/test only: this site's slice of a shared dataset.")
    ] = None,
    num_partitions: Annotated[
        Optional[int], typer.Option("--num-partitions", help="Demo/test only: number of slices.")
    ] = None,
    poll_interval: PollOpt = 0.5,
    insecure: InsecureOpt = False,
    only_print: PrintOpt = False,
) -> None:
    """Hospital: start this site's SuperNode (checks its key and the SuperLink's TLS first)."""
    extra: dict[str, str | int] = {}
    if partition_id is not None:
        extra = {"partition-id": partition_id, "num-partitions": num_partitions or partition_id + 1}
    spec = SuperNodeSpec(
        superlink=superlink, site_name=site_name,
        ca_cert=None if insecure else ca, private_key=None if insecure else key,
        data_dir=data_dir, state_dir=state_dir, policy=policy, pacs=pacs, runtime_port=runtime_port,
        insecure=insecure,
        extra_node_config=extra, trusted_entities=trusted_entities,
    )
    try:
        cmd = supernode_command(spec)
        if not insecure and not only_print:
            console.print(f"SuperLink {superlink}: {probe_tls(address=superlink, ca_path=ca)}, trusted")
    except (CertificateError, FileNotFoundError, ValueError) as err:
        _fail(err)
    if poll_interval and poll_interval < 3:
        cmd = [sys.executable, "-m", "deploy.fast_supernode", "--poll-interval", str(poll_interval), "--", *cmd[1:]]
    _exec(cmd, only_print=only_print)


def register_deploy_commands(app: typer.Typer) -> None:
    """Mount the consortium's ``deploy`` group on the ``medfed`` app."""
    app.add_typer(deploy_app, name="deploy")
