"""Every use of a Flower or Ray internal outside the strategies, in one guarded place.

medfed relies on a few parts of Flower (and one of Ray) that are not public API:
the simulation engine's entry point, its instruction-dispatch loop and its Ray
backend's site actors, kept between the runs of a sweep (the harness,
:mod:`simulations.engine`), the class of the simulation's in-memory Grid
(:mod:`server.polling`), the Ray actor class that runs a simulated site
(:mod:`client.simulated`), the logger set-up, the error codes and the SecAgg+
crypto primitives, and the SuperNode's polling module (:mod:`deploy.fast_supernode`).
They are all reached through this module, and the strategies' internals through
:mod:`strategies.flower_internals`; tests/test_flower_internals.py fails if one
appears anywhere else. Both call :func:`check_flower_version` before touching an
internal, so an unsupported Flower fails with one clear message instead of an
``AttributeError`` deep inside a run.

This module imports only the standard library at the top (``medfed --help`` stays
fast); Flower and Ray are imported inside the functions, and the re-exported
names (:data:`LAZY_NAMES`) on first use.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

logger = logging.getLogger(__name__)

#: The Flower releases whose internals this module and strategies/flower_internals.py match
#: (the ``flwr`` requirement in pyproject.toml).
SUPPORTED_FLWR = ">=1.42,<1.43"
_SUPPORTED_MINOR = (1, 42)
#: Set to 1 to go on (with a warning) under an unsupported Flower: scripts/flwr_nightly_check.sh.
ALLOW_UNSUPPORTED_ENV = "MEDFED_ALLOW_UNSUPPORTED_FLWR"


class UnsupportedFlowerError(RuntimeError):
    """The installed Flower is outside :data:`SUPPORTED_FLWR`."""


def installed_flower_version() -> str:
    """The version of the Flower that ``import flwr`` loads (the ``flwr`` or ``flwr-nightly`` distribution).

    Read from the distribution installed beside the package that would be imported
    (without importing it), so a ``flwr-nightly`` in a venv layered over another
    venv's ``flwr`` reports the nightly.
    """
    import importlib.util  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    spec = importlib.util.find_spec("flwr")
    if spec is None or spec.origin is None:
        raise UnsupportedFlowerError(f"Flower is not installed: pip install 'flwr[simulation]{SUPPORTED_FLWR}'")
    site = str(Path(spec.origin).resolve().parent.parent)
    for distribution in importlib.metadata.distributions(path=[site]):
        if (distribution.metadata["Name"] or "").lower() in ("flwr", "flwr-nightly"):
            return distribution.version
    return importlib.metadata.version("flwr")


def _minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


@functools.cache
def check_flower_version() -> str:
    """Fail with a clear message unless the installed Flower is in :data:`SUPPORTED_FLWR`.

    Returns:
        The installed version.

    Raises:
        UnsupportedFlowerError: Naming the installed version, the supported range and
            what to do (unless ``MEDFED_ALLOW_UNSUPPORTED_FLWR=1``, which only warns).
    """
    version = installed_flower_version()
    if _minor(version) == _SUPPORTED_MINOR:
        return version
    message = (
        f"medfed supports flwr {SUPPORTED_FLWR}, but flwr {version} is installed. medfed uses Flower "
        "internals (federation/flower_internals.py, strategies/flower_internals.py) that change between "
        f"minor releases: pip install 'flwr[simulation]{SUPPORTED_FLWR}'"
    )
    if os.environ.get(ALLOW_UNSUPPORTED_ENV) == "1":
        logger.warning("%s (%s=1: going on anyway)", message, ALLOW_UNSUPPORTED_ENV)
        return version
    raise UnsupportedFlowerError(message)


#: Flower names medfed uses that are not public API, imported on first use:
#: ``from federation.flower_internals import ErrorCode``.
LAZY_NAMES: Mapping[str, tuple[str, str]] = {
    "ErrorCode": ("flwr.common.constant", "ErrorCode"),
    "create_shares": ("flwr.common.secure_aggregation.crypto.shamir", "create_shares"),
    "combine_shares": ("flwr.common.secure_aggregation.crypto.shamir", "combine_shares"),
    "encrypt": ("flwr.common.secure_aggregation.crypto.symmetric_encryption", "encrypt"),
    "decrypt": ("flwr.common.secure_aggregation.crypto.symmetric_encryption", "decrypt"),
    "share_keys_plaintext_concat": ("flwr.common.secure_aggregation.secaggplus_utils", "share_keys_plaintext_concat"),
    "share_keys_plaintext_separate": (
        "flwr.common.secure_aggregation.secaggplus_utils", "share_keys_plaintext_separate"
    ),
    "DEFAULT_FLOWER_CONFIG_TOML": ("flwr.cli.constant", "DEFAULT_FLOWER_CONFIG_TOML"),
}


def __getattr__(name: str) -> Any:  # noqa: ANN401 - whatever Flower defines under that name
    if name not in LAZY_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    check_flower_version()
    module, attribute = LAZY_NAMES[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def flower_logger() -> logging.Logger:
    """Flower's ``flwr`` logger, set up as Flower sets it up (so medfed can quiet it afterwards)."""
    check_flower_version()
    importlib.import_module("flwr.supercore.logger")
    return logging.getLogger("flwr")


def is_in_memory_grid(grid: object) -> bool:
    """Is ``grid`` the simulation's in-memory Grid (Flower polls it every 0.1 s, not 3 s)?"""
    check_flower_version()
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid  # noqa: PLC0415

    return isinstance(grid, InMemoryGrid)


#: ``(module, class)`` of the Ray actor that runs the ClientApp in Flower's simulation engine.
FLOWER_SIMULATION_ACTOR = ("flwr.simulation.ray_transport.ray_actor", "ClientAppActor")


def current_ray_actor_class() -> tuple[str, str] | None:
    """``(module, class)`` of the Ray actor this process runs, or None (no Ray, a driver, a task).

    Never imports Ray (a Ray worker has imported it before it runs anything); any
    surprise from Ray's internals gives None, the safe answer (a real site).
    """
    import sys  # noqa: PLC0415

    ray = sys.modules.get("ray")
    if ray is None:
        return None
    try:
        if not ray.is_initialized():
            return None
        context = ray.get_runtime_context()
        if context.get_actor_id() is None:
            return None
        descriptor = context.current_actor._ray_actor_creation_function_descriptor  # noqa: SLF001
        return (descriptor.module_name, descriptor.class_name)
    except Exception:  # noqa: BLE001
        logger.debug("cannot tell the Ray actor of this process", exc_info=True)
        return None


def supernode_polling_module() -> Any:  # noqa: ANN401 - a Flower module
    """The module of Flower's SuperNode loop whose ``time.sleep`` polls (patched by deploy.fast_supernode)."""
    check_flower_version()
    return importlib.import_module("flwr.supernode.start_client_internal")


def flower_supernode_main() -> Callable[[], None]:
    """Flower's ``flower-supernode`` entry point."""
    check_flower_version()
    return importlib.import_module("flwr.supernode.cli").flower_supernode


#: Longest wait between two looks for new instructions (Flower's own tick).
PUSH_WAIT_S = 0.1


def enqueue_on_push(state: Any, queue: Any, nodes_mapping: Any, f_stop: threading.Event) -> None:  # noqa: ANN401
    """Flower's ``vce_api.add_messages_to_queue``, woken by the ServerApp's push instead of a tick.

    Flower's engine looks for new instructions every 0.1 s, so each phase of a round
    (train, evaluate) started 0.05 s late on average: ~0.1 s of a 2.4 s round of the
    default preset on the dev box. This loop does what Flower's does (one instruction
    per node per look, marked delivered by the link state) but also looks as soon as
    the ServerApp stores an instruction (it wraps the link state's
    ``store_message_ins`` for the run); without one it waits :data:`PUSH_WAIT_S` as
    before, and it ends on ``f_stop`` as before.
    """
    pushed = threading.Event()
    store = state.store_message_ins

    def store_and_wake(message: Any) -> Any:  # noqa: ANN401
        message_id = store(message)
        pushed.set()
        return message_id

    state.store_message_ins = store_and_wake  # the grid stores through this same state object
    try:
        while not f_stop.is_set():
            pushed.clear()  # a push from here on wakes the next wait
            for node_id in nodes_mapping.keys():
                for message in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(message)
            pushed.wait(PUSH_WAIT_S)
    finally:
        del state.store_message_ins


@contextlib.contextmanager
def prompt_dispatch() -> Iterator[None]:
    """Use :func:`enqueue_on_push` in Flower's engine for one run (pinned by tests/test_engine.py)."""
    check_flower_version()
    from flwr.server.superlink.fleet.vce import vce_api  # noqa: PLC0415

    original = vce_api.add_messages_to_queue
    vce_api.add_messages_to_queue = enqueue_on_push
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = original


def run_simulation_engine(
    *,
    client_app: Any,  # noqa: ANN401 - flwr.clientapp.ClientApp
    server_app: Any,  # noqa: ANN401 - flwr.serverapp.ServerApp
    num_supernodes: int,
    run_config: Mapping[str, Any],
    backend_config: Mapping[str, Any],
    app_dir: str,
    verbose: bool,
) -> None:
    """Run both apps on Flower's simulation engine (Ray), in this process, as ``flwr-simulation`` does.

    The engine's entry point (``_run_simulation``) with a ``Run`` whose
    ``override_config`` is ``run_config`` and ``app_dir`` holding a ``pyproject.toml``
    that lists the same keys, so every virtual SuperNode fuses the full run config
    exactly as a real SuperNode would from a FAB; the ServerApp's task identity is
    set as Flower's runtime sets it before ``main``. Instructions are dispatched by
    :func:`enqueue_on_push`.
    """
    check_flower_version()
    from flwr.app import Context, RecordDict  # noqa: PLC0415
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES  # noqa: PLC0415
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes  # noqa: PLC0415
    from flwr.simulation.run_simulation import _run_simulation  # noqa: PLC0415
    from flwr.supercore.constant import NOOP_FEDERATION_ID  # noqa: PLC0415
    from flwr.supercore.run import Run  # noqa: PLC0415
    from flwr.supercore.task_identity import TaskIdentity  # noqa: PLC0415
    from flwr.supercore.telemetry import EventType  # noqa: PLC0415

    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    run = Run.create_empty(run_id=run_id)
    run.override_config = dict(run_config)
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    with prompt_dispatch():
        _run_simulation(
            num_supernodes=num_supernodes,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=server_app,
            backend_name="ray",
            backend_config=dict(backend_config),
            server_app_context=context,
            app_dir=app_dir,
            run=run,
            is_app=True,  # makes every SuperNode fuse its run config from app_dir
            verbose_logging=verbose,
        )


class _RunInWorker:
    """A ``ClientAppActor.run`` "app loader" that runs ``fn`` in the actor's process, then a no-op app.

    Flower's actor has no method but ``run`` (load an app, call it) and ``terminate``;
    its loader is any picklable callable, so this runs a function in a kept site
    worker without a class of medfed's own (the actor's class is what marks a
    simulated site: :mod:`client.simulated`).
    """

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def __call__(self) -> Callable[..., None]:
        self.fn()
        return _no_reply


def _no_reply(**_: Any) -> None:  # noqa: ANN401 - Flower calls the app with message= and context=
    return None


#: Seconds a kept site worker may take to answer before the pool is built afresh.
WORKER_PING_S = 30.0


class KeptActors:
    """The site actors kept between the runs of a warm session (:func:`keep_site_actors`).

    Attributes:
        builds: Pools built from new actors during the session.
        reuses: Runs that reused the kept actors.
    """

    def __init__(self, on_reuse: Callable[[], None]) -> None:
        self.on_reuse = on_reuse
        self.pool: Any = None  # Flower's BasicActorPool, idle between runs
        self.builds = 0
        self.reuses = 0

    def take(self, client_resources: Mapping[str, Any]) -> Any:  # noqa: ANN401 - a BasicActorPool or None
        """The kept pool, its workers alive, idle and reset for a new run; None if there is none to reuse."""
        import ray  # noqa: PLC0415

        pool, self.pool = self.pool, None
        if pool is None:
            return None
        if pool.client_resources != dict(client_resources) or len(pool.pool) != pool.num_actors:
            self._discard(pool, "other resources per site, or a worker still busy or lost")
            return None
        try:  # one call per worker: alive, idle, and its per-run state reset
            calls = [actor.run.remote(_RunInWorker(self.on_reuse), None, "", None) for actor in pool.pool]
            ray.get(calls, timeout=WORKER_PING_S)
        except Exception as error:  # noqa: BLE001 - a dead or stuck worker: start afresh
            self._discard(pool, f"a worker did not answer ({type(error).__name__})")
            return None
        self.reuses += 1
        return pool

    def keep(self, pool: Any) -> None:  # noqa: ANN401 - a BasicActorPool
        """Keep ``pool``'s actors for the next run (instead of Flower's end-of-run termination)."""
        self.pool = pool

    def release(self) -> None:
        """End the kept actors (the session ends)."""
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.terminate_all_actors()

    @staticmethod
    def _discard(pool: Any, why: str) -> None:  # noqa: ANN401
        import ray  # noqa: PLC0415

        logger.info("not reusing the kept site workers: %s; starting new ones", why)
        for actor in [*pool.pool, *pool._future_to_actor.values()]:  # noqa: SLF001 - busy ones too
            with contextlib.suppress(Exception):
                ray.kill(actor)


@contextlib.contextmanager
def keep_site_actors(*, on_reuse: Callable[[], None]) -> Iterator[KeptActors]:
    """Within: Flower's Ray backend keeps its site actors and Ray up between runs (a warm session).

    Flower's ``RayBackend`` builds a pool of new ``ClientAppActor`` processes for every
    run and, at its end, terminates them and shuts Ray down. Within this context its
    class (looked up by name when the engine starts a run) is one that reuses the
    actors kept by the previous run, after running ``on_reuse`` in each of them (a
    function importable in the workers: it resets their per-run state), and at the
    run's end keeps them, idle, with Ray running. Actors that are busy, dead or made
    for other per-site resources are replaced by new ones. On leaving, the kept actors
    are ended; Ray keeps running (the caller stops it).
    """
    check_flower_version()
    from flwr.server.superlink.fleet.vce.backend import raybackend  # noqa: PLC0415

    kept = KeptActors(on_reuse)
    flower_backend = raybackend.RayBackend

    class WarmRayBackend(flower_backend):  # type: ignore[misc, valid-type]
        def build(self, app_fn: Callable[[], Any]) -> None:
            pool = kept.take(self.client_resources)
            if pool is None:
                super().build(app_fn)
                kept.builds += 1
                return
            self.pool, self.app_fn = pool, app_fn

        def terminate(self) -> None:
            if self.pool is not None:
                kept.keep(self.pool)

    raybackend.RayBackend = WarmRayBackend
    try:
        yield kept
    finally:
        raybackend.RayBackend = flower_backend
        kept.release()
