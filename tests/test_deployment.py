"""A real consortium on 127.0.0.1: SuperLink behind nginx, three SuperNodes, TLS and node authentication.

Certificates come from the `medfed certs` commands; processes are real Flower
processes started and stopped (by PID, with everything they spawn) by
:class:`deploy.local.LocalConsortium`, even when a test fails.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from certs import CertificateError, probe_tls
from deploy.local import CONNECTION, LocalConsortium

ROOT = Path(__file__).resolve().parents[1]
SITES = ("hospital-a", "hospital-b", "hospital-c")
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs it: apt-get install nginx)"),
]


def _medfed(*args: str) -> None:
    from simulations.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> LocalConsortium:
    root = tmp_path_factory.mktemp("consortium")
    certs = root / "certs"
    _medfed("certs", "init", "--out", str(certs / "ca"))
    _medfed("certs", "server", "--host", "127.0.0.1", "--ca", str(certs / "ca"), "--out", str(certs / "server"))
    for site in (*SITES, "rogue"):
        _medfed("certs", "site", site, "--out", str(certs / "sites" / site))
    _medfed("certs", "init", "--out", str(root / "other-ca"))  # a CA nobody in the consortium trusts
    lc = LocalConsortium(workdir=root / "work", certs=certs, app_dir=ROOT, poll_interval=0.5)
    request.addfinalizer(lc.close)  # every process, by PID, whatever happens below
    lc.start_superlink()
    lc.start_proxy()
    lc.wait_listening(lc.superlink_port)
    lc.wait_listening(lc.proxy_port)
    lc.write_connection()
    lc.register(*SITES)
    return lc


def test_hospitals_reach_only_the_fleet_api(consortium: LocalConsortium) -> None:
    ca = str(consortium.certs / "server" / "ca.pem")
    proxy = f"https://{consortium.proxy_address}"
    with httpx.Client(verify=ca, timeout=30) as client:
        headers = {"content-type": "application/protobuf"}
        for path in ("/v1/control/list-runs", "/v1/control/register-node", "/v1/runtime/get-nodes",
                     "/v1/fleet/../control/list-runs"):
            assert client.post(proxy + path, headers=headers).status_code == 403, path
        assert client.get(proxy + "/docs").status_code == 403
        # the Fleet API is forwarded, and the SuperLink itself demands a signed node request
        fleet = client.post(proxy + "/v1/fleet/pull-messages", headers=headers)
        assert fleet.status_code == 401 and "Invalid SuperNode authentication" in fleet.text
        # the coordinator, on the loopback, still reaches the Control API
        direct = client.post(f"https://127.0.0.1:{consortium.superlink_port}/v1/control/list-runs", headers=headers)
        assert direct.status_code == 200
    # Flower's own CLI pointed at the proxy cannot register a key
    from deploy.commands import connection_entry
    from deploy.flwr_config import write_connection

    write_connection(name="via-proxy", home=Path(consortium.env["FLWR_HOME"]),
                     entry=connection_entry(name="via-proxy", address=consortium.proxy_address,
                                            ca_cert=consortium.certs / "server" / "ca.pem"))
    rogue_pub = consortium.certs / "sites" / "rogue" / "site.pub"
    result = consortium.flwr("supernode", "register", str(rogue_pub), "via-proxy")
    assert result.returncode != 0 and "registered successfully" not in result.stdout
    assert "403" in result.stdout + result.stderr


def test_unregistered_key_and_untrusting_supernode_are_refused(consortium: LocalConsortium) -> None:
    other_ca = consortium.workdir.parent / "other-ca" / "ca.pem"
    consortium.start_supernode("rogue", index=0, num_sites=3, name="rogue")
    consortium.start_supernode(SITES[0], index=0, num_sites=3, name="untrusting", ca=other_ca)
    # medfed's pre-flight check names the problem before Flower even tries
    with pytest.raises(CertificateError, match="is not trusted with .*other-ca/ca.pem"):
        probe_tls(address=consortium.proxy_address, ca_path=other_ca)
    assert consortium.wait_exit("rogue", timeout=120) != 0
    assert "Failed to activate SuperNode" in consortium.log("rogue").read_text()
    assert consortium.wait_exit("untrusting", timeout=120) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in consortium.log("untrusting").read_text()


def _rounds(run_dir: Path) -> list[dict]:
    path = run_dir / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait(condition, *, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.5)


def test_two_secure_rounds_with_tls_and_auth_survive_a_killed_site(consortium: LocalConsortium, tmp_path: Path) -> None:
    for index, site in enumerate(SITES):
        consortium.start_supernode(site, index=index, num_sites=len(SITES))
    for site in SITES:
        assert "SuperNode ID:" in consortium.wait_log(f"supernode-{site}", "SuperNode ID:", timeout=120)
    run_config = (
        # secure aggregation on (secagg.*): the coordinator sees masked updates only, and round 2 must still
        # aggregate the two survivors after a hospital dies mid-training (threshold 2 of 3)
        f'secagg.enabled=true secagg.threshold=0.6 '
        f'data.num_samples=120 model.width=4 server.rounds=2 strategy.min_sites=2 strategy.fraction_evaluate=0.0 '
        f'server.round_timeout=600.0 server.out_dir="{tmp_path}" server.run_name="consortium"'
    )
    started = consortium.flwr("run", ".", CONNECTION, "--format", "json", "--run-config", run_config)
    assert started.returncode == 0, started.stdout + started.stderr
    assert json.loads(started.stdout[started.stdout.index("{"):])["success"] is True
    run_dir = tmp_path / "consortium"
    # Generous waits: on an idle machine a round takes seconds; a crowded one needs minutes.
    _wait(lambda: len(_rounds(run_dir)) >= 2, timeout=600, what="round 1 of the run")
    # kill -9 one hospital while it holds round 2's training message: no goodbye, no reply. The
    # SuperLink declares it unavailable once its heartbeat lapses (2 x 30 s), well before the timeout.
    victim = f"supernode-{SITES[2]}"
    _wait(lambda: consortium.log(victim).read_text().count("Receiving: train message") >= 2, timeout=300,
          what="round 2 reaching hospital-c")
    consortium.stop(victim, sig=signal.SIGKILL)
    _wait(lambda: (run_dir / "summary.json").exists(), timeout=600, what="the run to finish")

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["rounds_aggregated"] == 2
    assert set(summary["privacy"]["epsilon_per_site"]) == set(SITES)
    first, second = _rounds(run_dir)[1:3]
    assert set(first["sites"]) == set(SITES) and first["aggregated"] is True
    assert set(second["sites"]) == set(SITES[:2]) and second["aggregated"] is True  # quorum of two
    assert [reason.split(" — ")[0] for reason in second["failed"].values()] == ["Error: Node Unavailable"]
    for record in (first, second):
        assert set(record["global"]) >= {"auc", "accuracy", "loss"}
        assert 0.0 <= record["global"]["auc"] <= 1.0
        for site in record["sites"].values():  # under secure aggregation a site's count is not sent
            assert "num-examples" not in site["train"] and site["train"]["epsilon"] > 0
    audit = consortium.workdir / "state" / SITES[0] / SITES[0] / "audit.jsonl"  # a survivor's own record
    stages = [(e["round"], e.get("stage") or e["event"]) for e in map(json.loads, audit.read_text().splitlines())
              if e["event"] in ("secagg", "train")]
    assert stages == [(1, "advertise"), (1, "share"), (1, "train"), (1, "unmask"),  # round 2's keys and shares
                      (2, "train"), (2, "unmask")]  # rode on round 1's unmask exchange: one extra exchange a round
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-0001.pt", "round-0002.pt"]
    assert (run_dir / "config.yaml").read_text().count("round_timeout: 600.0") == 1


def test_a_revoked_site_is_cut_off(consortium: LocalConsortium) -> None:
    """certs/README.md "Revoke a site": unregister its key; its SuperNode is refused and stops."""
    log = consortium.log(f"supernode-{SITES[0]}").read_text()
    node_id = re.search(r"SuperNode ID: (\d+)", log).group(1)  # type: ignore[union-attr]
    result = consortium.flwr("supernode", "unregister", node_id, CONNECTION)
    assert result.returncode == 0, result.stdout + result.stderr
    consortium.wait_exit(f"supernode-{SITES[0]}", timeout=180)  # refused (HTTP 401) at its next request
    listed = consortium.flwr("supernode", "list", CONNECTION, "--format", "json")
    nodes = json.loads(listed.stdout[listed.stdout.index("{"):])["nodes"]
    assert [n["status"] for n in nodes if n["node-id"] == node_id] in ([], ["unregistered"], ["deleted"])
