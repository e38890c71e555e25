"""Run the medfed ClientApp and ServerApp on Flower's simulation engine (Ray).

Why not ``flwr run``/``run_simulation``? In flwr 1.42 the public
``run_simulation()`` is deprecated and gives both apps an *empty* run config, and
``flwr run`` on a local SuperLink starts a detached SuperLink process that
outlives the command and, unless told otherwise, installs the app's dependencies
with uv (a GB-size CUDA torch). Both need the network or leave processes behind.

So the harness drives the same engine entry point that Flower's own
``flwr-simulation`` process uses, in this process (through
:func:`federation.flower_internals.run_simulation_engine`, the one place that
touches the engine's internals, version-checked), with:

* a :class:`~flwr.supercore.run.Run` whose ``override_config`` is the complete,
  validated medfed config in run-config form, and an app directory holding a
  generated ``pyproject.toml`` whose ``[tool.flwr.app.config]`` lists the same
  keys, so every virtual SuperNode gets the full run config exactly as a real
  SuperNode would from a FAB;
* the very ``server.app:app`` a deployment runs, and ``simulations.adversary_app:app``: the deployed
  ``client.app:app`` handlers plus the simulated sites' faults and attacks.

medfed starts Ray itself, with the settings Flower's backend would use plus an
exit hook for the site workers (:func:`start_ray`), so the harness can start it
while the driver still imports. One private piece of the engine is replaced for
the run: the loop that hands the ServerApp's instructions to the site workers
looks for them as soon as they are stored instead of every 0.1 s
(:func:`federation.flower_internals.enqueue_on_push`).

Ray is shut down when the run ends, so nothing is left running, unless the run is
one of a warm session (:func:`warm_session`: a sweep's runs), which keeps Ray and the
site workers, their imports done, from one run to the next. The private
entry points are pinned by the ``flwr`` version range in pyproject.toml, checked
by :func:`federation.flower_internals.check_flower_version`, and exercised by
tests/test_engine.py and the integration tests.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from federation.config import ExperimentConfig, to_flat
from federation.flower_internals import KeptActors, keep_site_actors, run_simulation_engine

logger = logging.getLogger(__name__)


def write_app_dir(directory: Path, config: ExperimentConfig) -> Path:
    """Write the minimal Flower App config Flower needs to fuse the run config."""
    project = {
        "project": {"name": "medfed-simulation", "version": "0.1.0"},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "medfed",
                    "components": {"serverapp": "server.app:app", "clientapp": "simulations.adversary_app:app"},
                    "config": config.model_dump(),
                }
            }
        },
    }
    (directory / "pyproject.toml").write_bytes(tomli_w.dumps(project).encode())
    return directory


#: Ray keeps task arguments and results up to this size inline in its RPCs; larger
#: ones go through its shared-memory object store, a put and a fetch via the raylet
#: each way. Ray's default (100 KiB) is smaller than one model message of the default
#: CNN (~0.3 MB), so every message paid that detour: ~7 ms more between one message
#: and the next on a site worker (10 vs 17 ms, measured on the 2-core dev box).
#: 8 MiB keeps messages of models up to ~2 M fp32 parameters inline (within Ray's
#: 10 MiB per-task inline limit); larger models use the object store as before.
INLINE_OBJECT_BYTES = 8 * 1024 * 1024


def ray_environment() -> dict[str, str]:
    """Ray settings the harness sets (a variable already in the environment wins).

    Besides the inline limit above: Ray prestarts one idle Python worker per CPU
    when the driver connects, but Flower's site actors always get processes of
    their own, so the prestarted ones only took CPU during start-up (~0.5 s of
    ``ray.init`` on 2 cores) and memory for the whole run: not started.
    """
    return {
        "RAY_DEDUP_LOGS": "0",
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "RAY_max_direct_call_object_size": str(INLINE_OBJECT_BYTES),
        "RAY_prestart_worker_first_driver": "0",
    }


def _init_args(*, verbose: bool, address: str = "") -> dict[str, Any]:
    """``ray.init`` arguments: a local Ray on every core, or (``address``) joining a running cluster.

    A cluster's resources are its nodes' (``ray start --num-cpus/--num-gpus``), so
    none are given when joining one.
    """
    logs = {"logging_level": "INFO" if verbose else "ERROR", "log_to_driver": verbose}
    if address:
        return {"address": address, **logs}
    return {"num_cpus": os.cpu_count() or 1, "include_dashboard": False, **logs}


def _backend_config(config: ExperimentConfig, *, verbose: bool) -> dict[str, Any]:
    """Flower's backend config: the site workers' resources, and Ray's settings should Flower start it.

    medfed's runs start Ray themselves (:func:`start_ray`, same ``init_args``);
    bench/_vanilla_flower.py lets Flower start it with this config.
    """
    address = config.simulation.ray_address
    cpus = config.simulation.cpus_per_site  # on a cluster a node may have more cores than this machine
    return {
        "client_resources": {  # each site actor's Ray resources: Ray's scheduler places them on the nodes
            "num_cpus": cpus if address else min(cpus, os.cpu_count() or 1),
            "num_gpus": config.simulation.gpus_per_site,
        },
        "init_args": _init_args(verbose=verbose, address=address),
    }


def _set_environment() -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    for name, value in ray_environment().items():  # read by Ray's processes when they start
        os.environ.setdefault(name, value)


def _preload(modules: Sequence[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the run's own import raises it where it is needed
            logger.debug("preloading %s failed; left to the run's own import", name, exc_info=True)


#: Ray's ``worker_process_setup_hook`` for the site workers (see simulations/worker_exit.py).
WORKER_SETUP_HOOK = "simulations.worker_exit.exit_without_teardown"


def _runtime_env() -> dict[str, Any]:
    """The runtime env Flower's ``RayBackend.init_ray`` gives Ray, plus the workers' exit hook.

    As in Flower: Ray's processes inherit the environment but not the driver's
    ``sys.path``, so it goes to them as ``PYTHONPATH``.
    """
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    return {"env_vars": {"PYTHONPATH": pythonpath}, "worker_process_setup_hook": WORKER_SETUP_HOOK}


def start_ray(*, verbose: bool = False, preload: Sequence[str] = (), address: str = "") -> None:
    """Start Ray for a simulation (as Flower's Ray backend would), importing ``preload`` meanwhile.

    Flower's backend starts Ray only if it is not running yet, so the run uses
    this Ray: the settings of Flower's own start (:func:`_runtime_env`, the
    ``init_args`` of the backend config) plus the workers' exit hook. Starting it
    before the run lets Ray's own processes (GCS, raylet, agents: ~6 CPU-s on the
    2-core dev box) come up on the second core while another thread imports
    ``preload`` (torch, MONAI, Opacus: ~6.5 s on the first), instead of after it
    (docs/BENCHMARKS.md, P1). Call it from the main thread: Ray's processes end with
    the thread that started them. ``preload`` must not import Ray or Flower, which
    this thread imports meanwhile (two threads importing one package can deadlock).
    Does nothing if Ray is already running.

    ``address`` (``simulation.ray_address``): connect this process to that running
    Ray cluster instead of starting a local Ray; the site actors then run on its
    nodes, and :func:`stop_ray` only disconnects (the cluster keeps running). The
    workers get this process's ``sys.path`` (:func:`_runtime_env`) and read their
    data from the run config's ``data.data_dir``: both must exist on every node.
    """
    _set_environment()
    import ray  # noqa: PLC0415 - before the loader starts: the two threads import disjoint packages

    if ray.is_initialized():
        return
    loader = threading.Thread(target=_preload, args=(tuple(preload),), name="medfed-preload", daemon=True)
    loader.start()
    try:
        ray.init(runtime_env=_runtime_env(), **_init_args(verbose=verbose, address=address))
    finally:
        loader.join()


def stop_ray() -> None:
    """Shut Ray down if it runs (after a run, or a config that failed its checks after :func:`start_ray`).

    Connected to a cluster (``simulation.ray_address``), this only disconnects: the
    cluster and its other jobs keep running. Within a :func:`warm_session` it does
    nothing: the session stops Ray when it ends.
    """
    if _session is not None:
        return
    import ray  # noqa: PLC0415

    if ray.is_initialized():
        ray.shutdown()


def reset_site_worker() -> None:
    """What a kept site worker forgets before its next run: every site's cached data and models.

    Runs in each worker of a warm session (:func:`warm_session`) before a run reuses
    it, so that run finds the worker as a new one would: no site's data, model or
    DP-checked model from the run before (client/cache.py), nor the pooled datasets
    (``federation.data.clear_dataset_cache``). Everything else a site keeps is per run
    on its disk (accountant, ledger, audit log, under the run's own folder); the
    imports (torch, MONAI, Opacus, Flower's actor) are what stays warm.
    """
    from client import cache  # noqa: PLC0415 - a site worker's modules, not the driver's
    from federation.data import clear_dataset_cache  # noqa: PLC0415

    cache.clear()
    clear_dataset_cache()


#: The warm session running in this process (None: every run starts and stops its own Ray).
_session: KeptActors | None = None


@contextlib.contextmanager
def warm_session(*, verbose: bool = False, address: str = "") -> Iterator[KeptActors]:
    """Keep one Ray and its site workers for the runs made within (a sweep, or a run and its baselines).

    Ray starts once (importing the federation core meanwhile); each run's site actors
    are the previous run's, reset by :func:`reset_site_worker`, with torch, MONAI,
    Opacus and the ClientApp already imported. Every run is otherwise as isolated as
    a cold one: a new Flower run (link state, node contexts, run id), a fresh model
    and strategy in the ServerApp, and each site's accountant, ledger and replay state
    in that run's folder. On leaving, the workers end and Ray stops (a cluster,
    ``address``, is only disconnected from).

    Yields:
        How often the session built new workers and reused kept ones.
    """
    global _session  # noqa: PLW0603 - one session per process, read by run_engine
    if _session is not None:
        yield _session  # already inside one: the outer session keeps Ray
        return
    from simulations.harness import CORE_MODULES  # noqa: PLC0415 - harness imports this module

    start_ray(verbose=verbose, preload=CORE_MODULES, address=address)
    try:
        with keep_site_actors(on_reuse=reset_site_worker) as kept:
            _session = kept
            try:
                yield kept
            finally:
                _session = None
    finally:
        stop_ray()  # the session is closed: this stops Ray


def run_engine(config: ExperimentConfig, *, verbose: bool = False) -> None:
    """Run one simulated federation to completion; returns when Ray has stopped.

    Args:
        config: A resolved config (absolute paths, fixed run name).
        verbose: Show Flower's and Ray's logs.
    """
    start_ray(verbose=verbose, address=config.simulation.ray_address)  # unless the harness started it already
    from simulations.adversary_app import app as client_app  # client.app's handlers + faults/attacks
    from server.app import app as server_app

    with tempfile.TemporaryDirectory(prefix="medfed-app-") as tmp:
        app_dir = write_app_dir(Path(tmp), config)
        try:
            run_simulation_engine(
                client_app=client_app,
                server_app=server_app,
                num_supernodes=config.data.num_sites,
                run_config=to_flat(config),
                backend_config=_backend_config(config, verbose=verbose),
                app_dir=str(app_dir),
                verbose=verbose,
            )
        finally:
            stop_ray()  # not within a warm session, which keeps Ray for its next run
