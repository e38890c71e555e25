"""A coordinator killed mid-run resumes (issue 19, item 5): no round lost or repeated, no epsilon counted twice."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from client.ledger import PrivacyLedger
from client.replay import REPLY_FILE
from client.site import site_settings, train_round
from federation.config import load_config
from deploy.local import CONNECTION, LocalConsortium, process_tree
from federation.models import build_model

ROOT = Path(__file__).resolve().parents[1]

TINY = ["data.num_samples=160", "data.num_sites=2", "model.width=4", "train.batch_size=16", "server.rounds=3",
        "strategy.min_sites=1"]


def test_a_redone_round_gets_the_reply_already_sent_and_spends_nothing(tmp_path: Path) -> None:
    config = load_config(None, TINY)
    node = {"site-name": "north", "data-dir": str(tmp_path / "data"), "state-dir": str(tmp_path / "disk"), "partition-id": 0,
            "num-partitions": 2}
    settings = site_settings(node_config=node, config=config, run_name="r")
    torch.manual_seed(0)
    start = build_model(config.model, in_channels=1, num_classes=2, dp=True).state_dict()

    first = train_round(config=config, settings=settings, global_weights=start, server_round=1)
    ledger = PrivacyLedger.open(settings.state_dir).runs["r"]
    accountant = json.loads((settings.run_state_dir / "privacy.json").read_text())
    assert first.refusal is None and not first.replayed and (settings.run_state_dir / REPLY_FILE).is_file()

    # the coordinator died before its checkpoint and asks for round 1 again, from the same model
    again = train_round(config=config, settings=settings, global_weights=dict(start), server_round=1)
    assert again.replayed and again.metrics == first.metrics
    assert all(torch.equal(again.weights[k], first.weights[k]) for k in first.weights)
    assert PrivacyLedger.open(settings.state_dir).runs["r"] == ledger  # nothing reserved or committed
    assert json.loads((settings.run_state_dir / "privacy.json").read_text()) == accountant

    # round 2 (or round 1 from another model) is a new release: trained and counted
    second = train_round(config=config, settings=settings, global_weights=first.weights, server_round=2)
    assert not second.replayed and second.metrics["epsilon"] > first.metrics["epsilon"]
    assert PrivacyLedger.open(settings.state_dir).runs["r"].rounds == 2
    other = {k: v + 0.01 for k, v in start.items()}
    assert not train_round(config=config, settings=settings, global_weights=other, server_round=2).replayed


# -- a real deployment: SuperLink behind nginx, two SuperNodes, the ServerApp process killed ---------------------
SITES = ("hospital-a", "hospital-b")
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def _medfed(*args: str) -> None:
    from simulations.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output


def _wait(condition, *, timeout: float, what: str, interval: float = 0.1) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _ledger(consortium: LocalConsortium, site: str) -> dict:
    path = consortium.workdir / "state" / site / site / "ledger.json"
    return json.loads(path.read_text())["runs"].get("restart", {}) if path.exists() else {}


def _serverapps(consortium: LocalConsortium) -> list[int]:
    superlink = consortium.procs["superlink"].pid
    return [pid for pid in process_tree(superlink) if "flwr-serverapp" in _cmdline(pid)]


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.integration
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs it: apt-get install nginx)")
def test_a_killed_coordinator_resumes_without_losing_or_repeating_a_round(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> None:
    root = tmp_path_factory.mktemp("restart")
    certs = root / "certs"
    _medfed("certs", "init", "--out", str(certs / "ca"))
    _medfed("certs", "server", "--host", "127.0.0.1", "--ca", str(certs / "ca"), "--out", str(certs / "server"))
    for site in SITES:
        _medfed("certs", "site", site, "--out", str(certs / "sites" / site))
    consortium = LocalConsortium(workdir=root / "work", certs=certs, app_dir=ROOT, poll_interval=0.5)
    request.addfinalizer(consortium.close)  # every process, by PID, whatever happens below
    consortium.start_superlink()
    consortium.start_proxy()
    consortium.wait_listening(consortium.superlink_port)
    consortium.wait_listening(consortium.proxy_port)
    consortium.write_connection()
    consortium.register(*SITES)
    for index, site in enumerate(SITES):
        consortium.start_supernode(site, index=index, num_sites=len(SITES))
    for site in SITES:
        assert "SuperNode ID:" in consortium.wait_log(f"supernode-{site}", "SuperNode ID:", timeout=120)
    runs = root / "runs"
    run_config = (f'data.num_samples=120 model.width=4 server.rounds=1 strategy.min_sites=2 server.round_timeout=600.0 '
                  f'server.out_dir="{runs}" server.run_name="restart"')
    started = consortium.flwr("run", ".", CONNECTION, "--format", "json", "--run-config", run_config)
    assert started.returncode == 0, started.stdout + started.stderr
    run_dir = runs / "restart"
    # kill -9 the ServerApp once both hospitals have trained round 1 (their ledgers committed it), before the
    # coordinator checkpointed it: it evaluates first, and each evaluation starts a fresh ClientApp (seconds)
    _wait(lambda: all(_ledger(consortium, s).get("rounds") == 1 for s in SITES), timeout=900, what="round 1 trained")
    serverapps = _serverapps(consortium)
    assert serverapps, "no flwr-serverapp process under the SuperLink"
    for pid in serverapps:
        os.kill(pid, signal.SIGKILL)
    assert not (run_dir / "checkpoints" / "round-0001.pt").exists() and not (run_dir / "summary.json").exists()
    spent = {site: _ledger(consortium, site)["epsilon"] for site in SITES}

    resumed = consortium.flwr("run", ".", CONNECTION, "--format", "json",
                              "--run-config", f'{run_config} server.resume="{run_dir}"')
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    _wait(lambda: (run_dir / "summary.json").exists(), timeout=900, what="the resumed run to finish", interval=0.5)

    assert [r["round"] for r in _jsonl(run_dir / "rounds.jsonl")] == [0, 1]  # none lost, none repeated
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-0001.pt"]
    privacy = _jsonl(run_dir / "privacy.jsonl")
    assert sorted((row["round"], row["site"]) for row in privacy) == [(1, s) for s in SITES]
    for site in SITES:
        ledger = _ledger(consortium, site)
        assert ledger["rounds"] == 1 and ledger["epsilon"] == spent[site]  # round 1 counted once
        assert [row["epsilon"] for row in privacy if row["site"] == site] == [spent[site]]
        audit = _jsonl(consortium.workdir / "state" / site / site / "audit.jsonl")
        assert [e["round"] for e in audit if e["event"] == "train" and e.get("replayed")] == [1]
