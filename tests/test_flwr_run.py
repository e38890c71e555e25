"""`flwr run .` runs the medfed app on Flower's own local SuperLink (deployment path)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_local_superlink(flwr_home: Path) -> None:
    """Stop the detached SuperLink that `flwr run` started for this FLWR_HOME (by PID)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flower-super" in cmdline and str(flwr_home) in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.mark.skipif(shutil.which("flwr") is None and not (Path(sys.executable).parent / "flwr").exists(),
                    reason="the flwr CLI is not installed next to this Python")
def test_flwr_run_uses_the_app_config(tmp_path: Path) -> None:
    flwr = shutil.which("flwr") or str(Path(sys.executable).parent / "flwr")
    flwr_home = tmp_path / "flwr-home"
    env = {
        **os.environ,
        # flwr starts `flower-superlink` by name: it lives beside this Python
        "PATH": f"{Path(flwr).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
    }
    run_config = f'server.rounds=1 data.num_samples=120 model.width=4 server.out_dir="{tmp_path}" server.run_name="flwr"'
    try:
        result = subprocess.run(
            [flwr, "run", ".", "--stream", "--run-config", run_config],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
        )
    finally:
        _kill_local_superlink(flwr_home)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "flwr" / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and summary["rounds_aggregated"] == 1
    # Flower's default local federation has 2 SuperNodes: both trained, with DP
    assert len(summary["privacy"]["epsilon_per_site"]) == 2
    # the end-of-run clinical outputs are written on this path too
    for name in ("export/model.pt2", "clinical/report.md", "model_card.json"):
        assert (tmp_path / "flwr" / name).is_file(), name
