"""Deployment helpers: checked Flower commands, nginx config, flwr connection, faster polling."""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from certs import CertificateError, create_ca, create_server_certificate, create_site_keys
from deploy.commands import SuperLinkSpec, SuperNodeSpec, connection_entry, superlink_command, supernode_command
from deploy.flwr_config import write_connection
from deploy.nginx import FleetProxy, render_fleet_proxy, render_template, write_standalone, FLEET_TEMPLATE


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    create_ca(out_dir=root / "ca")
    create_server_certificate(ca_dir=root / "ca", hosts=["fl.example.org"], out_dir=root / "server")
    create_site_keys(name="hospital-a", out_dir=root / "sites" / "hospital-a")
    return root


def _proxy(pki: Path, **changes: object) -> FleetProxy:
    values = dict(listen="127.0.0.1:9092", server_name="fl.example.org", ssl_cert=pki / "server" / "server.pem",
                  ssl_key=pki / "server" / "server.key", ca_cert=pki / "server" / "ca.pem", superlink_port=9093)
    values.update(changes)
    return FleetProxy(**values)  # type: ignore[arg-type]


def test_superlink_command_is_secure_and_loopback_only(pki: Path, caplog: pytest.LogCaptureFixture) -> None:
    cmd = superlink_command(SuperLinkSpec(certs_dir=pki / "server", port=9093, public_hosts=("fl.example.org",)))
    assert cmd[0].endswith("flower-superlink")
    assert cmd[1:] == [
        "--host", "127.0.0.1", "--port", "9093", "--database", ":flwr-in-memory:",
        "--disable-runtime-dependency-installation",
        "--ssl-ca-certfile", str(pki / "server" / "ca.pem"),
        "--ssl-certfile", str(pki / "server" / "server.pem"),
        "--ssl-keyfile", str(pki / "server" / "server.key"),
        "--enable-supernode-auth",
    ]
    with pytest.raises(CertificateError, match="not valid for host 'other.example.org'"):
        superlink_command(SuperLinkSpec(certs_dir=pki / "server", public_hosts=("other.example.org",)))
    with caplog.at_level(logging.WARNING):
        insecure = superlink_command(SuperLinkSpec(certs_dir=None, insecure=True))
    assert insecure[-1] == "--insecure" and "--enable-supernode-auth" not in insecure
    assert "INSECURE: TLS and SuperNode authentication are OFF" in caplog.text


def test_supernode_command_checks_key_and_ca(pki: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    site = pki / "sites" / "hospital-a"
    spec = SuperNodeSpec(superlink="fl.example.org:9092", site_name="hospital-a", ca_cert=pki / "ca" / "ca.pem",
                         private_key=site / "site.key", data_dir="/data/a", state_dir="/var/lib/medfed",
                         policy="/etc/medfed/policy.yaml")
    cmd = supernode_command(spec)
    assert cmd[1:] == [
        "--superlink", "fl.example.org:9092",
        "--node-config",
        'site-name="hospital-a" data-dir="/data/a" state-dir="/var/lib/medfed" policy="/etc/medfed/policy.yaml"',
        "--port", "9094",
        "--root-certificates", str(pki / "ca" / "ca.pem"),
        "--auth-supernode-private-key", str(site / "site.key"),
    ]
    with pytest.raises(CertificateError, match="is not a CA certificate"):
        supernode_command(SuperNodeSpec(superlink="x:1", site_name="a", ca_cert=pki / "server" / "server.pem",
                                        private_key=site / "site.key", data_dir="/d", state_dir="/s"))
    exposed = create_site_keys(name="b", out_dir=tmp_path / "b")
    exposed.private_key.chmod(0o640)
    with pytest.raises(CertificateError, match="readable by others"):
        supernode_command(SuperNodeSpec(superlink="x:1", site_name="b", ca_cert=pki / "ca" / "ca.pem",
                                        private_key=exposed.private_key, data_dir="/d", state_dir="/s"))
    with caplog.at_level(logging.WARNING):
        insecure = supernode_command(SuperNodeSpec(superlink="x:1", site_name="b", ca_cert=None, private_key=None,
                                                   data_dir="/d", state_dir="/s", insecure=True))
    assert insecure[-1] == "--insecure" and "INSECURE" in caplog.text


def test_connection_is_written_where_flwr_reads_it(pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    entry = connection_entry(name="consortium", address="127.0.0.1:9093", ca_cert=pki / "server" / "ca.pem")
    path = write_connection(name="consortium", entry=entry)
    write_connection(name="second", entry={"address": "127.0.0.1:1", "insecure": True})
    assert path == tmp_path / "flwr" / "config.toml"
    conn = read_superlink_connection("consortium")
    assert conn.address == "127.0.0.1:9093" and conn.root_certificates == str((pki / "server" / "ca.pem").resolve())
    assert read_superlink_connection("second").address == "127.0.0.1:1"
    assert read_superlink_connection(None).name == "local"  # Flower's own default survives


def test_nginx_config_exposes_only_the_fleet_api(pki: Path) -> None:
    text = render_fleet_proxy(_proxy(pki))
    assert "location /v1/fleet/ {" in text and "proxy_pass https://medfed_superlink/v1/fleet/;" in text
    assert "server 127.0.0.1:9093;" in text and "listen 127.0.0.1:9092 ssl;" in text
    directives = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert [d for d in directives if d.startswith("proxy_pass")] == ["proxy_pass https://medfed_superlink/v1/fleet/;"]
    assert [d for d in directives if d.startswith("location")] == ["location /v1/fleet/ {", "location / {"]
    assert "return 403;" in directives
    assert "${MEDFED_" not in text and "$proxy_add_x_forwarded_for" in text  # nginx's own variables stay
    with pytest.raises(CertificateError, match="not valid for host 'wrong.example.org'"):
        render_fleet_proxy(_proxy(pki, server_name="wrong.example.org"))
    with pytest.raises(ValueError, match="nginx syntax characters"):
        render_fleet_proxy(_proxy(pki, listen="9092; include /etc/passwd"))
    with pytest.raises(ValueError, match=r"missing values \['MEDFED_CA_CERT'"):
        render_template(FLEET_TEMPLATE, {"MEDFED_LISTEN": "1"})


@pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
                    reason="nginx is not installed (.ci/run installs it)")
def test_nginx_accepts_the_rendered_config(pki: Path, tmp_path: Path) -> None:
    cmd = write_standalone(_proxy(pki, listen="127.0.0.1:19999"), prefix=tmp_path / "nginx")
    result = subprocess.run([*cmd, "-t"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr


class _FakeGrid:
    """Replies to each pushed message after ``delay`` seconds; counts pulls."""

    def __init__(self, delay: float, never: Iterable[str] = ()) -> None:
        self.delay, self.never, self.pulls, self.pushed_at = delay, set(never), 0, 0.0

    def push_messages(self, messages: Iterable[str]) -> list[str]:
        self.pushed_at = time.monotonic()
        return list(messages)

    def pull_messages(self, ids: Iterable[str]) -> list[object]:
        self.pulls += 1
        if time.monotonic() - self.pushed_at < self.delay:
            return []
        return [_Reply(i) for i in ids if i not in self.never]


class _Reply:
    def __init__(self, reply_to: str) -> None:
        self.metadata = type("M", (), {"reply_to_message_id": reply_to})()


def test_polling_grid_collects_replies_soon_and_honours_the_timeout() -> None:
    from server.polling import PollingGrid

    fake = _FakeGrid(delay=0.5)
    grid = PollingGrid(fake, interval=0.05)  # type: ignore[arg-type]
    start = time.monotonic()
    replies = grid.send_and_receive(["m1", "m2"], timeout=10)
    elapsed = time.monotonic() - start
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m1", "m2"]
    assert 0.5 <= elapsed < 1.5  # Flower's HttpGrid would answer after 3 s
    assert fake.pulls >= 5
    slow = PollingGrid(_FakeGrid(delay=0.0, never=["m2"]), interval=0.05)  # type: ignore[arg-type]
    start = time.monotonic()
    partial = slow.send_and_receive(["m1", "m2"], timeout=0.4)
    assert [r.metadata.reply_to_message_id for r in partial] == ["m1"]
    assert 0.4 <= time.monotonic() - start < 1.0
    with pytest.raises(ValueError, match="poll_interval must be > 0"):
        PollingGrid(fake, interval=0)  # type: ignore[arg-type]


def test_each_grid_gets_its_own_interval() -> None:
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from server.polling import PollingGrid, with_poll_interval

    sim = InMemoryGrid.__new__(InMemoryGrid)  # Flower's simulation grid (0.1 s polls)
    wrapped = with_poll_interval(sim, interval=0.5, simulation_interval=0.01)
    assert isinstance(wrapped, PollingGrid) and wrapped.inner is sim and wrapped.interval == 0.01
    assert with_poll_interval(sim, interval=0.5, simulation_interval=0) is sim
    assert with_poll_interval(wrapped, interval=0.5, simulation_interval=0.01) is wrapped
    other = _FakeGrid(0.0)  # a deployment grid
    assert with_poll_interval(other, interval=0, simulation_interval=0.01) is other  # type: ignore[arg-type]
    deployed = with_poll_interval(other, interval=0.5, simulation_interval=0.01)  # type: ignore[arg-type]
    assert isinstance(deployed, PollingGrid) and deployed.interval == 0.5


def test_fast_supernode_caps_only_the_supernode_sleeps() -> None:
    import time as real_time

    from flwr.supernode import start_client_internal as module

    from deploy.fast_supernode import CappedSleepTime, patch_supernode_polling

    original = module.time
    try:
        patch_supernode_polling(0.05)
        assert isinstance(module.time, CappedSleepTime)
        start = real_time.monotonic()
        module.time.sleep(3)  # Flower's idle poll
        assert real_time.monotonic() - start < 0.5
        assert module.time.time is real_time.time and real_time.sleep is not module.time.sleep
        with pytest.raises(ValueError, match="--poll-interval must be in"):
            patch_supernode_polling(0)
    finally:
        module.time = original
