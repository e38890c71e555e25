"""A real Orthanc PACS for tests: started on 127.0.0.1 with free ports, a throw-away storage dir,
DICOMweb enabled and HTTP basic authentication on; stopped after.

Used by ``tests/test_pacs.py`` through the ``orthanc`` fixture below (imported there). The
Debian packages ``orthanc`` and ``orthanc-dicomweb`` provide the server and the plugin
(``.ci/run`` installs them); without the binary the fixture skips, naming what to install.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ORTHANC_BINARIES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
DICOMWEB_PLUGINS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
)
USER, PASSWORD = "medfed-site", "s3cret-pacs-pw"
PACS_AET, SITE_AET = "MEDFEDPACS", "MEDFEDSITE"  # DIMSE: the PACS's AE title and the one site it admits


@dataclass(frozen=True)
class OrthancServer:
    """A running Orthanc: its REST and DICOMweb URLs, credentials and storage folder."""

    url: str
    dicomweb_url: str
    dicom_port: int
    site_port: int  # where Orthanc sends C-MOVEs for the site's AE title (the site's storage SCP)
    user: str
    password: str
    storage: Path
    log: Path

    def rest(self, path: str, *, method: str = "GET", body: bytes | None = None) -> object:
        """Call Orthanc's REST API (authenticated) and decode the JSON answer."""
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        request = urllib.request.Request(self.url + path, data=body, method=method,
                                         headers={"Authorization": f"Basic {token}"})
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback test server
            data = response.read()
        return json.loads(data) if data else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_orthanc() -> tuple[str, str] | None:
    """The Orthanc binary and the DICOMweb plugin, or ``None`` when either is missing."""
    binary = shutil.which("Orthanc") or next((b for b in ORTHANC_BINARIES if Path(b).is_file()), None)
    plugin = next((p for p in DICOMWEB_PLUGINS if Path(p).is_file()), None)
    if plugin is None:  # the versioned library the package ships (dpkg -L orthanc-dicomweb)
        plugin = next((str(p) for p in sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*"))), None)
    return (binary, plugin) if binary and plugin else None


def _wait_until_up(server: OrthancServer, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {proc.returncode}: {server.log.read_text()[-2000:]}")
        try:
            server.rest("/system")
            server.rest("/dicom-web/studies")  # the plugin answers too
            return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    raise RuntimeError(f"Orthanc did not answer within {timeout:.0f} s: {server.log.read_text()[-2000:]}")


def start_orthanc(root: Path, *, extra: dict | None = None) -> tuple[OrthancServer, subprocess.Popen]:
    """Write a config under ``root`` (``extra`` settings merged in) and start Orthanc with it; return once it
    answers."""
    found = find_orthanc()
    if found is None:
        raise FileNotFoundError("Orthanc or its DICOMweb plugin is not installed")
    binary, plugin = found
    http_port, dicom_port, site_port = _free_port(), _free_port(), _free_port()
    storage = root / "storage"
    storage.mkdir(parents=True)
    config = {
        "Name": "medfed-test-pacs",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": PACS_AET,
        # DIMSE has no password: Orthanc admits only the registered site AE title from 127.0.0.1 and checks
        # that it is called by its own AE title; the site may query (C-FIND), retrieve (C-GET, or C-MOVE to its
    # storage SCP on site_port) and store
        "DicomCheckCalledAet": True,
        "DicomCheckModalityHost": True,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,
        "DicomModalities": {"medfed-site": {"AET": SITE_AET, "Host": "127.0.0.1", "Port": site_port,
                                            "AllowEcho": True, "AllowFind": True, "AllowGet": True,
                                            "AllowMove": True, "AllowStore": True}},
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "StudiesMetadata": "Full"},
        "StableAge": 1,
        "ConcurrentJobs": 1,
        "HttpThreadsCount": 8,
        **(extra or {}),
    }
    config_path = root / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    log = root / "orthanc.log"
    url = f"http://127.0.0.1:{http_port}"
    server = OrthancServer(url=url, dicomweb_url=f"{url}/dicom-web", dicom_port=dicom_port, site_port=site_port,
                           user=USER, password=PASSWORD, storage=storage, log=log)
    with open(log, "wb") as handle:
        proc = subprocess.Popen([binary, str(config_path)], stdout=handle, stderr=subprocess.STDOUT, cwd=root)
    try:
        _wait_until_up(server, proc)
    except Exception:
        stop_orthanc(proc)
        raise
    return server, proc


def stop_orthanc(proc: subprocess.Popen) -> None:
    """Stop the Orthanc this helper started (terminate, then kill after 10 s)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """A fresh Orthanc for one test module (skips, naming the packages, when Orthanc is absent)."""
    if find_orthanc() is None:
        pytest.skip("Orthanc is not installed: apt-get install orthanc orthanc-dicomweb (.ci/run does)")
    server, proc = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server
    finally:
        stop_orthanc(proc)


def write_tls_files(folder: Path) -> dict[str, Path]:
    """A throw-away CA, a PACS certificate for 127.0.0.1 and a site client certificate (RSA, PEM, one day).

    Returns ``{ca,pacs,site}_{cert,key}`` paths."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    keys = {name: rsa.generate_private_key(public_exponent=65537, key_size=2048) for name in ("ca", "pacs", "site")}
    subjects = {"ca": "medfed test PACS CA", "pacs": "127.0.0.1", "site": SITE_AET}
    paths: dict[str, Path] = {}
    for name, key in keys.items():
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subjects[name])]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subjects["ca"])]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=name == "ca", path_length=None), critical=True))
        if name == "pacs":
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            builder = builder.add_extension(san, critical=False)
        cert = builder.sign(keys["ca"], hashes.SHA256())
        paths[f"{name}_cert"], paths[f"{name}_key"] = folder / f"{name}.pem", folder / f"{name}.key"
        paths[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{name}_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                                           serialization.NoEncryption()))
        paths[f"{name}_key"].chmod(0o600)
    return paths
