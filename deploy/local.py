"""A whole consortium on one machine (127.0.0.1): SuperLink, nginx Fleet proxy, SuperNodes.

Used by ``tests/test_deployment.py``, ``examples/consortium_local.sh`` and
``bench/deploy_latency.py``. Every process is started by this object, tracked
by PID, and stopped (with everything it spawned) by :meth:`LocalConsortium.close`.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from certs import CA_CERT, SERVER_CERT, SERVER_KEY, SITE_KEY, SITE_PUB
from deploy.commands import (
    SuperLinkSpec,
    SuperNodeSpec,
    connection_entry,
    flower_executable,
    superlink_command,
    supernode_command,
)
from deploy.fast_supernode import POLL_ENV
from deploy.flwr_config import write_connection
from deploy.nginx import FleetProxy, write_standalone
from federation.data.paths import resolve_data_dir

logger = logging.getLogger(__name__)
CONNECTION = "consortium"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _process_table() -> dict[int, tuple[int, str]]:
    table: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        table[int(entry.name)] = (ppid, cmdline)
    return table


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process it spawned, including Flower's detached SuperExec
    (started in its own session with ``--parent-pid <pid>``). Linux only."""
    table = _process_table()
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        if current in found:
            continue
        found.append(current)
        for child, (ppid, cmdline) in table.items():
            if ppid == current or f"--parent-pid {current} " in f"{cmdline} ":
                todo.append(child)
    return found


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_processes(procs: list[subprocess.Popen], *, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    """Stop ``procs`` and their whole trees by PID: ``sig`` to all, SIGKILL what is left after ``grace`` s."""
    trees = {proc.pid: process_tree(proc.pid) for proc in procs}
    for pids in trees.values():
        _kill(pids, sig)
    deadline = time.monotonic() + grace
    while any(proc.poll() is None for proc in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    for proc in procs:
        _kill([*trees[proc.pid], *process_tree(proc.pid)], signal.SIGKILL)
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            logger.error("process %d did not exit after SIGKILL", proc.pid)


@dataclass
class LocalConsortium:
    """Processes of a one-machine consortium, all on 127.0.0.1 and free ports.

    ``certs`` holds ``server/`` (``medfed certs server``) and ``sites/<name>/``
    (``medfed certs site``) as the medfed commands write them.
    """

    workdir: Path
    certs: Path
    app_dir: Path
    poll_interval: float = 0.5
    superlink_port: int = field(default_factory=free_port)
    proxy_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # flower-superexec, flwr-clientapp
            "FLWR_HOME": str(self.workdir / "flwr-home"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }
        if self.poll_interval > 0:
            self.env[POLL_ENV] = str(self.poll_interval)

    @property
    def proxy_address(self) -> str:
        """Where hospitals connect (the nginx Fleet proxy)."""
        return f"127.0.0.1:{self.proxy_port}"

    def log(self, name: str) -> Path:
        """Log file of process ``name``."""
        return self.workdir / "logs" / f"{name}.log"

    def _start(self, name: str, cmd: list[str], *, env: dict[str, str] | None = None) -> subprocess.Popen:
        handle = self.log(name).open("ab")
        proc = subprocess.Popen(
            cmd, env={**self.env, **(env or {})}, stdout=handle, stderr=subprocess.STDOUT, cwd=self.workdir
        )
        handle.close()
        self.procs[name] = proc
        logger.info("started %s (pid %d)", name, proc.pid)
        return proc

    def start_superlink(self) -> subprocess.Popen:
        """SuperLink on 127.0.0.1 with TLS, node authentication, no runtime installs."""
        spec = SuperLinkSpec(certs_dir=self.certs / "server", port=self.superlink_port, database=":flwr-in-memory:")
        return self._start("superlink", superlink_command(spec))

    def start_proxy(self) -> subprocess.Popen:
        """nginx exposing only the Fleet API on :attr:`proxy_address`."""
        server = self.certs / "server"
        proxy = FleetProxy(
            listen=self.proxy_address, server_name="localhost", ssl_cert=server / SERVER_CERT,
            ssl_key=server / SERVER_KEY, ca_cert=server / CA_CERT, superlink_port=self.superlink_port,
        )
        return self._start("nginx", write_standalone(proxy, prefix=self.workdir / "nginx"))

    def wait_listening(self, port: int, *, timeout: float = 60.0) -> None:
        """Block until something accepts TCP connections on 127.0.0.1:``port``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc_name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc_name} exited ({proc.returncode}); see {self.log(proc_name)}")
            with socket.socket() as sock:
                sock.settimeout(1.0)
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")

    def write_connection(self) -> Path:
        """``[superlink.consortium]`` in this consortium's ``$FLWR_HOME/config.toml``."""
        entry = connection_entry(
            name=CONNECTION, address=f"127.0.0.1:{self.superlink_port}", ca_cert=self.certs / "server" / CA_CERT
        )
        return write_connection(name=CONNECTION, entry=entry, home=Path(self.env["FLWR_HOME"]))

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run the coordinator's ``flwr`` CLI (from ``app_dir``) against this consortium."""
        return subprocess.run(
            [flower_executable("flwr"), *args], cwd=self.app_dir, env=self.env,
            capture_output=True, text=True, timeout=timeout,
        )

    def register(self, *sites: str, timeout: float = 120.0) -> None:
        """``flwr supernode register certs/sites/<site>/site.pub consortium --name <site>`` (concurrently)."""
        running = {
            site: subprocess.Popen(
                [flower_executable("flwr"), "supernode", "register", str(self.certs / "sites" / site / SITE_PUB),
                 CONNECTION, "--name", site],
                cwd=self.app_dir, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for site in sites
        }
        for site, proc in running.items():
            out, _ = proc.communicate(timeout=timeout)
            if proc.returncode != 0 or "registered successfully" not in out:
                raise RuntimeError(f"registering {site} failed:\n{out}")

    def supernode_command(self, site: str, *, index: int, num_sites: int, ca: Path | None = None,
                          key: Path | None = None) -> list[str]:
        """The checked SuperNode command for ``site`` (``ca``/``key`` override the site's own)."""
        spec = SuperNodeSpec(
            superlink=self.proxy_address, site_name=site, ca_cert=ca or self.certs / "server" / CA_CERT,
            private_key=key or self.certs / "sites" / site / SITE_KEY, state_dir=str(self.workdir / "state" / site),
            data_dir=str(resolve_data_dir()),  # the demo's sites slice one shared data set (partition-id)
            runtime_port=free_port(), extra_node_config={"partition-id": index, "num-partitions": num_sites},
        )
        cmd = supernode_command(spec)
        if self.poll_interval > 0:
            cmd = [sys.executable, "-m", "deploy.fast_supernode", "--poll-interval", str(self.poll_interval),
                   "--", *cmd[1:]]
        return cmd

    def start_supernode(self, site: str, *, index: int, num_sites: int, name: str | None = None,
                        ca: Path | None = None, key: Path | None = None) -> subprocess.Popen:
        """Start ``site``'s SuperNode through the proxy."""
        cmd = self.supernode_command(site, index=index, num_sites=num_sites, ca=ca, key=key)
        name = name or f"supernode-{site}"
        # Each hospital has its own machine: its own Flower home (installed FABs).
        return self._start(name, cmd, env={"FLWR_HOME": str(self.workdir / "hospitals" / name / "flwr-home")})

    def wait_log(self, name: str, text: str, *, timeout: float = 90.0) -> str:
        """Block until process ``name``'s log contains ``text`` (or it exits); return the log."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log(name).read_text(errors="replace") if self.log(name).exists() else ""
            proc = self.procs.get(name)
            if text in log or (proc is not None and proc.poll() is not None):
                return log
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: {text!r} not in its log after {timeout} s ({self.log(name)})")
            time.sleep(0.2)

    def wait_exit(self, name: str, *, timeout: float = 90.0) -> int:
        """Block until process ``name`` exits; return its exit code."""
        try:
            return self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise TimeoutError(f"{name} still running after {timeout} s ({self.log(name)})") from err

    def stop(self, name: str, *, sig: int = signal.SIGTERM) -> None:
        """Stop process ``name`` and its tree (``SIGKILL`` simulates a crash)."""
        proc = self.procs.pop(name)
        stop_processes([proc], sig=sig, grace=0.0 if sig == signal.SIGKILL else 10.0)

    def close(self) -> None:
        """Stop every process this consortium started, and what they spawned, by PID."""
        procs, self.procs = list(self.procs.values()), {}
        stop_processes(procs)

    def __enter__(self) -> LocalConsortium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
