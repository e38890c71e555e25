"""A real SuperLink and a real hospital SuperNode whose node config names its PACS (Orthanc on 127.0.0.1).

One round of a DICOM run through ``flwr run``: the site retrieves its cohort from the PACS
into its state folder and trains on it. Plain gRPC on loopback (TLS and node
authentication are tested in tests/test_deployment.py); processes are stopped by PID.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from deploy.commands import SuperLinkSpec, SuperNodeSpec, connection_entry, flower_executable, superlink_command
from deploy.commands import supernode_command
from deploy.fast_supernode import POLL_ENV
from deploy.flwr_config import write_connection
from deploy.local import free_port, stop_processes
from tests.orthanc_fixture import OrthancServer, orthanc  # noqa: F401 - the fixture
from tests.test_pacs import _demo_yaml, pacs  # noqa: F401 - the demo cohort in Orthanc

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _wait(condition: Callable[[], bool], *, timeout: float, what: str, procs: dict[str, subprocess.Popen],
          logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        dead = [name for name, proc in procs.items() if proc.poll() is not None]
        if dead or time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs.glob("*.log"))
            raise TimeoutError(f"waiting for {what}: {'exited: ' + ', '.join(dead) if dead else 'timed out'}\n{tails}")
        time.sleep(0.5)


def test_a_supernode_trains_from_its_pacs_in_a_real_deployment(tmp_path: Path, orthanc: OrthancServer,
                                                               pacs: dict) -> None:  # noqa: F811
    site = "hospital-pacs"
    logs = tmp_path / "logs"
    logs.mkdir()
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", POLL_ENV: "0.5"}
    port = free_port()
    link = superlink_command(SuperLinkSpec(certs_dir=None, port=port, insecure=True))
    node = supernode_command(SuperNodeSpec(
        superlink=f"127.0.0.1:{port}", site_name=site, ca_cert=None, private_key=None, insecure=True,
        data_dir=str(tmp_path / "data"), state_dir=str(tmp_path / "state"), runtime_port=free_port(),
        pacs=str(_demo_yaml(tmp_path / "etc", orthanc, pacs))))
    node = [sys.executable, "-m", "deploy.fast_supernode", "--poll-interval", "0.5", "--", *node[1:]]
    write_connection(name="pacs", entry=connection_entry(name="pacs", address=f"127.0.0.1:{port}", ca_cert=None,
                                                         insecure=True), home=tmp_path / "flwr-home")
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, cmd, home in (("superlink", link, tmp_path / "flwr-home"), ("supernode", node, tmp_path / "node")):
            with open(logs / f"{name}.log", "wb") as handle:
                procs[name] = subprocess.Popen(cmd, env={**env, "FLWR_HOME": str(home)}, cwd=tmp_path,
                                               stdout=handle, stderr=subprocess.STDOUT)
        _wait(lambda: "SuperNode ID:" in (logs / "supernode.log").read_text(errors="replace"), timeout=120,
              what="the SuperNode to connect", procs=procs, logs=logs)
        run_config = (
            "data.dataset='dicom' data.dicom_label_names='normal,pneumonia' data.dicom_channels=1 "
            "data.image_size=16 data.dicom_test_fraction=0.5 model.width=4 train.batch_size=8 server.rounds=1 "
            "strategy.min_sites=1 strategy.fraction_evaluate=0.0 "  # no evaluation round: one ClientApp start fewer
            "privacy.noise_multiplier=1.0 privacy.target_epsilon=1000.0 "
            f"server.out_dir='{tmp_path / 'runs'}' server.run_name='pacs-deploy'"
        )
        started = subprocess.run([flower_executable("flwr"), "run", ".", "pacs", "--format", "json",
                                  "--run-config", run_config], cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        run_dir = tmp_path / "runs" / "pacs-deploy"
        _wait(lambda: (run_dir / "summary.json").exists(), timeout=600, what="the run to finish", procs=procs,
              logs=logs)
    finally:
        stop_processes(list(procs.values()))
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert rounds[1]["aggregated"] is True and list(rounds[1]["sites"]) == [site]
    assert rounds[1]["sites"][site]["train"]["num-examples"] == 12  # its whole cohort of 24, half to train
    cache = tmp_path / "state" / site / "pacs-cache"
    assert len(json.loads((cache / "manifest.json").read_text())) == 24
    assert not (tmp_path / "data").exists()  # the site's data is its PACS cohort, not its data-dir
    assert orthanc.password not in (logs / "supernode.log").read_text(errors="replace")
