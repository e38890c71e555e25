"""The exact Flower commands a consortium runs, built only after the certificates check out.

Secure by default: TLS and SuperNode authentication are always on unless the
caller passes ``insecure=True``, which logs a warning.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from certs import (
    CA_CERT,
    SERVER_CERT,
    SERVER_KEY,
    CertificateError,
    check_site_name,
    load_certificate,
    verify_server_certificate,
    verify_site_keys,
)
from certs.x509 import check_ca

logger = logging.getLogger(__name__)

#: Node-config keys medfed's ClientApp reads (see client/site.py); ``policy`` is the
#: site policy file path read by the site policy feature where installed; ``pacs`` the site's PACS YAML.
NODE_CONFIG_KEYS = ("site-name", "data-dir", "state-dir", "policy", "pacs", "partition-id", "num-partitions")
SUPERLINK_PORT = 9093
FLEET_PUBLIC_PORT = 9092
INSECURE_WARNING = (
    "INSECURE: TLS and SuperNode authentication are OFF. Anyone who can reach this port can read "
    "model updates, impersonate sites or (on the SuperLink) start runs. Use only on a closed test network."
)


def flower_executable(name: str) -> str:
    """Path of a Flower console script (``flower-superlink`` ...), preferring this Python's venv."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: install medfed (it depends on flwr) in this environment")
    return found


def _node_config(values: dict[str, str | int]) -> str:
    parts = []
    for key, value in values.items():
        if key not in NODE_CONFIG_KEYS:
            raise ValueError(f"unknown node-config key {key!r}; medfed reads {list(NODE_CONFIG_KEYS)}")
        parts.append(f"{key}={value}" if isinstance(value, int) else f'{key}="{value}"')
    return " ".join(parts)


@dataclass(frozen=True)
class SuperLinkSpec:
    """How the coordinator's SuperLink is started."""

    certs_dir: Path | None
    port: int = SUPERLINK_PORT
    host: str = "127.0.0.1"
    database: str = ":flwr-in-memory:"
    insecure: bool = False
    public_hosts: tuple[str, ...] = ()


def superlink_command(spec: SuperLinkSpec) -> list[str]:
    """``flower-superlink`` with TLS, SuperNode authentication and no runtime installs.

    The SuperLink binds to loopback: hospitals reach only the Fleet API through
    the reverse proxy (``deploy/nginx``). The certificate is checked first.
    """
    cmd = [flower_executable("flower-superlink"), "--host", spec.host, "--port", str(spec.port)]
    cmd += ["--database", spec.database, "--disable-runtime-dependency-installation"]
    if spec.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            "SuperLink bound to %s: its Control API (no authentication in OSS Flower) is reachable "
            "from the network. Bind 127.0.0.1 and publish the Fleet API through deploy/nginx.",
            spec.host,
        )
    if spec.insecure:
        logger.warning(INSECURE_WARNING)
        return [*cmd, "--insecure"]
    if spec.certs_dir is None:
        raise CertificateError("give the SuperLink's certificate folder (medfed certs server --out ...)")
    cert, key, ca = spec.certs_dir / SERVER_CERT, spec.certs_dir / SERVER_KEY, spec.certs_dir / CA_CERT
    verify_server_certificate(cert_path=cert, ca_path=ca, key_path=key, hosts=["localhost", *spec.public_hosts])
    return [
        *cmd,
        "--ssl-ca-certfile", str(ca),
        "--ssl-certfile", str(cert),
        "--ssl-keyfile", str(key),
        "--enable-supernode-auth",
    ]


@dataclass(frozen=True)
class SuperNodeSpec:
    """How a hospital's SuperNode is started."""

    superlink: str
    site_name: str
    ca_cert: Path | None
    private_key: Path | None
    data_dir: str = ""
    state_dir: str = ""
    policy: str = ""
    pacs: str = ""  # the site's PACS YAML: its cohort is its data (README "Train from your PACS")
    runtime_port: int = 9094
    insecure: bool = False
    extra_node_config: dict[str, str | int] = field(default_factory=dict)
    trusted_entities: str = ""  # YAML of ed25519 keys: run only FABs (app code) signed by one of them


def supernode_command(spec: SuperNodeSpec) -> list[str]:
    """``flower-supernode`` trusting the consortium CA and signing with the site key.

    The site's data and state folders are required: a real site never lets the run
    config (the coordinator) choose where its data or privacy ledger is. The CA and
    the key are checked next (dates, CA flag, 0600, OpenSSH EC key).

    Raises:
        ValueError: An invalid site name, or no data or state folder.
    """
    check_site_name(spec.site_name)
    missing = [option for option, value in (("--data-dir", spec.data_dir), ("--state-dir", spec.state_dir))
               if not str(value).strip()]
    if missing:
        raise ValueError(
            f"a hospital's SuperNode needs {' and '.join(missing)}: the site's own data folder and the folder of "
            "its privacy ledger and audit log (the coordinator's run config may not choose them)"
        )
    values: dict[str, str | int] = {"site-name": spec.site_name}
    for key, value in (("data-dir", spec.data_dir), ("state-dir", spec.state_dir), ("policy", spec.policy),
                         ("pacs", spec.pacs)):
        if value:
            values[key] = value
    values.update(spec.extra_node_config)
    cmd = [flower_executable("flower-supernode"), "--superlink", spec.superlink]
    cmd += ["--node-config", _node_config(values), "--port", str(spec.runtime_port)]
    if spec.trusted_entities:  # Flower's FAB verification: the coordinator's app code runs only if signed
        if not Path(spec.trusted_entities).is_file():
            raise FileNotFoundError(f"--trusted-entities {spec.trusted_entities}: no such file")
        cmd += ["--trusted-entities", str(spec.trusted_entities)]
    if spec.insecure:
        logger.warning(INSECURE_WARNING)
        return [*cmd, "--insecure"]
    if spec.ca_cert is None or spec.private_key is None:
        raise CertificateError("a SuperNode needs the consortium ca.pem (--ca) and its site.key (--key)")
    check_ca(load_certificate(spec.ca_cert), source=spec.ca_cert)
    verify_site_keys(private_key=spec.private_key)
    return [*cmd, "--root-certificates", str(spec.ca_cert), "--auth-supernode-private-key", str(spec.private_key)]


def connection_entry(*, name: str, address: str, ca_cert: Path | None, insecure: bool = False) -> dict[str, object]:
    """The ``[superlink.NAME]`` table of ``$FLWR_HOME/config.toml`` for the coordinator's ``flwr``."""
    if insecure:
        logger.warning(INSECURE_WARNING)
        return {"address": address, "insecure": True}
    if ca_cert is None:
        raise CertificateError("the connection needs the consortium ca.pem (root-certificates)")
    check_ca(load_certificate(ca_cert), source=ca_cert)
    return {"address": address, "root-certificates": str(ca_cert.resolve())}


def shell(cmd: list[str]) -> str:
    """A command as one copy-pasteable shell line."""
    return shlex.join(cmd)
