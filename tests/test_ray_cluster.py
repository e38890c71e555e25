"""Simulations on a running Ray cluster (simulation.ray_address, --ray-address), per-site resources."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from federation.config import ConfigError
from simulations.engine import _backend_config, _init_args
from simulations.harness import resolve_config

RAY = str(Path(sys.executable).with_name("ray"))


def test_sites_get_exactly_their_resources_on_a_cluster_and_at_most_this_machine_locally() -> None:
    cluster = resolve_config(overrides=["simulation.ray_address=10.0.0.5:6379", "simulation.cpus_per_site=64",
                                        "simulation.gpus_per_site=0.5"])
    backend = _backend_config(cluster, verbose=False)
    assert backend["client_resources"] == {"num_cpus": 64.0, "num_gpus": 0.5}  # what Ray schedules each actor with
    assert backend["init_args"] == {"address": "10.0.0.5:6379", "logging_level": "ERROR", "log_to_driver": False}
    local = resolve_config(overrides=["simulation.cpus_per_site=64", "simulation.gpus_per_site=0.5"])
    assert _backend_config(local, verbose=False)["client_resources"] == {"num_cpus": float(os.cpu_count() or 1),
                                                                        "num_gpus": 0.5}
    assert _init_args(verbose=True)["num_cpus"] == (os.cpu_count() or 1) and "address" not in _init_args(verbose=True)


def test_a_ray_address_that_is_not_host_port_is_a_config_error() -> None:
    assert resolve_config(overrides=["simulation.ray_address= auto "]).simulation.ray_address == "auto"
    with pytest.raises(ConfigError, match=r"simulation.ray_address 'ray://head:10001': give the head node's"):
        resolve_config(overrides=["simulation.ray_address=ray://head:10001"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _processes() -> dict[int, tuple[int, str]]:
    """``{pid: (parent pid, command line)}`` of this machine's processes (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            found[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    return found


def _our_ray_pids(starters: list[subprocess.Popen], temp_dir: str) -> set[int]:
    """The ``ray start`` processes this test started, their descendants, and whatever names its temp dir."""
    table = _processes()
    ours = {proc.pid for proc in starters} | {pid for pid, (_, cmd) in table.items() if temp_dir in cmd}
    grew = True
    while grew:
        children = {pid for pid, (parent, _) in table.items() if parent in ours} - ours
        ours |= children
        grew = bool(children)
    ours.discard(os.getpid())
    return ours & set(table)


def _kill_our_ray(starters: list[subprocess.Popen], temp_dir: str) -> None:
    """End the processes of the cluster this test started, and only those.

    ``ray stop`` cannot be pointed at one cluster (it ends every Ray process of the
    machine: other developers' runs too), so the test ends the ``ray start --block``
    processes it started, their descendants, and any process whose command line
    names its own temporary directory: SIGTERM, then SIGKILL after 10 s.
    """
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        pids = _our_ray_pids(starters, temp_dir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + grace
        while time.monotonic() < end and _our_ray_pids(starters, temp_dir):
            for proc in starters:
                proc.poll()  # reap our own children
            time.sleep(0.2)
    for proc in starters:
        proc.wait(timeout=10)


@pytest.fixture
def two_node_cluster() -> Iterator[str]:
    """A head and a worker node (1 CPU each) on 127.0.0.1, in a temporary directory of their own."""
    temp_dir = tempfile.mkdtemp(prefix="mfray-", dir="/tmp")  # short: Ray's socket paths are length-limited
    port = _free_port()
    address = f"127.0.0.1:{port}"
    def node_args() -> list[str]:  # every node its own ports: two nodes share this machine
        return ["--block", "--num-cpus=1", "--num-gpus=0", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
                "--disable-usage-stats", f"--dashboard-agent-listen-port={_free_port()}",
                f"--dashboard-agent-grpc-port={_free_port()}", f"--metrics-export-port={_free_port()}",
                f"--runtime-env-agent-port={_free_port()}"]

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    logs = [open(Path(temp_dir) / name, "w") for name in ("head.out", "worker.out")]  # noqa: SIM115
    starters = [subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
                                  f"--ray-client-server-port={_free_port()}", *node_args()],
                                 stdout=logs[0], stderr=subprocess.STDOUT, env=env, start_new_session=True)]
    try:  # the worker node waits for the head's GCS itself: one wait for both
        starters.append(subprocess.Popen([RAY, "start", f"--address={address}", *node_args()], stdout=logs[1],
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True))
        _wait_for_nodes(address, 2, temp_dir)
        yield address
    finally:
        _kill_our_ray(starters, temp_dir)
        for log in logs:
            log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_nodes(address: str, count: int, temp_dir: str, timeout: float = 60) -> None:
    probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
             "print(sum(n['Alive'] for n in ray.nodes()))")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done = subprocess.run([sys.executable, "-c", probe, address], capture_output=True, text=True, timeout=60)
        if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(1)
    heads = "".join((Path(temp_dir) / n).read_text()[-2000:] for n in ("head.out", "worker.out"))
    raise AssertionError(f"the Ray cluster at {address} did not reach {count} nodes:\n{heads}")


@pytest.mark.integration
def test_a_federation_runs_on_a_two_node_ray_cluster_one_site_per_node(two_node_cluster: str, tmp_path) -> None:
    import ray

    from simulations.harness import simulate, start_simulation

    assert not ray.is_initialized()
    config = start_simulation(overrides=[
        "data.num_sites=2", "data.num_samples=96", "model.width=4", "train.batch_size=16", "strategy.min_sites=2",
        "server.rounds=1", "privacy.noise_multiplier=1.0", "privacy.target_epsilon=1000", f"server.out_dir={tmp_path}",
        "server.run_name=cluster", f"simulation.ray_address={two_node_cluster}", "simulation.cpus_per_site=1",
    ])
    seen = {"nodes": 0, "min_free_cpus": 2.0}
    errors: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # each node has 1 CPU and each site actor takes 1: no free CPU = a site on each node
        while not stop.is_set() and ray.is_initialized():
            try:
                seen["nodes"] = max(seen["nodes"], sum(node["Alive"] for node in ray.nodes()))
                seen["min_free_cpus"] = min(seen["min_free_cpus"], ray.available_resources().get("CPU", 0.0))
            except Exception as err:  # noqa: BLE001 - a slow RPC under load, or the disconnect at the end
                errors.append(repr(err))
            stop.wait(0.1)

    assert ray.is_initialized() and sum(node["Alive"] for node in ray.nodes()) == 2  # joined, not started
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run_dir = simulate(config)
    finally:
        stop.set()
        watcher.join(timeout=10)
    assert not ray.is_initialized()  # the run disconnected; the cluster itself is the fixture's to stop
    assert seen == {"nodes": 2, "min_free_cpus": 0.0}, (seen, errors[:3])
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rounds] == [0, 1] and sorted(rounds[1]["sites"]) == ["site-1", "site-2"]


def test_simulate_ray_address_is_checked_before_anything_starts() -> None:
    from typer.testing import CliRunner

    from medfed.cli import app

    result = CliRunner().invoke(app, ["simulate", "--ray-address", "ray://head:10001"])
    assert result.exit_code == 2
    output = " ".join(result.output.split())  # rich wraps long lines
    assert "simulation.ray_address 'ray://head:10001': give the head node's 'host:port'" in output
