"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """Folder holding the real MedMNIST ``.npz`` files.

    ``$MEDFED_DATA_DIR`` if set, else ``<repo>/../shared/data``; skips the test when
    the folder does not exist.
    """
    env = os.environ.get("MEDFED_DATA_DIR", "")
    path = Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"real-data folder {path} not found (set MEDFED_DATA_DIR to the folder with the .npz files)")
    return path


@pytest.fixture
def flower_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give this process the identity a ServerApp gets at start-up.

    Flower 1.42 reads ``TaskIdentity.run_id/node_id/task_id`` when an instruction
    Message is created (``Message(content, dst_node_id=..., message_type=...)``),
    which the runtime sets before ``main``; in-process tests must set it themselves.
    """
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


#: The tiny synthetic federation a ``real_site`` trains on: 128 training images at one
#: real site (a real site holds its whole data set: site index 0 of 1), DP on.
REAL_SITE_CONFIG = (
    "data.num_samples=160", "model.width=4", "train.batch_size=16",
    "privacy.noise_multiplier=1.0", "privacy.target_epsilon=1000", "server.rounds=1",
)


class RealSite:
    """A real hospital site on ``tmp_path``, driven through the real ClientApp handlers.

    Attributes:
        name: Its ``site-name``.
        data_dir, state_dir: Its ``data-dir`` and ``state-dir`` (both exist).
        policy_path: Its policy YAML (``lifetime_epsilon: 10``, ``lifetime_delta: 1e-4``
            unless :meth:`write_policy` changed it).
        node_config: The node config a hospital's SuperNode sets (site-name, data-dir,
            state-dir, policy); edit it to build broken sites.
    """

    def __init__(self, root: Path) -> None:
        self.name = "hospital-a"
        self.data_dir = root / "site-data"
        self.state_dir = root / "site-state"
        self.policy_path = root / "site-policy.yaml"
        for folder in (self.data_dir, self.state_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.write_policy(lifetime_epsilon=10.0, lifetime_delta=1e-4)
        self.node_config: dict[str, str] = {
            "site-name": self.name, "data-dir": str(self.data_dir), "state-dir": str(self.state_dir),
            "policy": str(self.policy_path),
        }
        self.coordinator_dir = root / "coordinator"  # where hostile run configs point (server.out_dir, ...)

    def write_policy(self, **values: object) -> None:
        """Replace the site's policy file with these keys."""
        import yaml

        self.policy_path.write_text(yaml.safe_dump(dict(values)))

    def run_config(self, *overrides: str) -> dict:
        """The flat run config a coordinator sends: :data:`REAL_SITE_CONFIG` plus ``key=value`` overrides."""
        from federation.config import load_config, to_flat

        return dict(to_flat(load_config(None, [*REAL_SITE_CONFIG, f"server.out_dir={self.coordinator_dir}",
                                              *overrides])))

    def context(self, run_config: dict, *, node_config: dict | None = None, run_id: int = 11):
        """A ClientApp Context of this site (its node config unless ``node_config`` is given)."""
        from flwr.app import Context, RecordDict

        return Context(run_id=run_id, node_id=1, node_config=dict(self.node_config if node_config is None
                                                                   else node_config),
                       state=RecordDict(), run_config=dict(run_config))

    @staticmethod
    def weights(run_config: dict) -> dict:
        """The global model a coordinator would send for ``run_config`` (seeded, DP-compatible)."""
        import torch

        from federation.config import from_flat
        from federation.models import build_model

        config = from_flat(run_config, source="test")
        torch.manual_seed(0)
        return build_model(config.model, in_channels=1, num_classes=2, dp=config.privacy.enabled).state_dict()

    @staticmethod
    def message(kind: str, weights: dict, *, server_round: int = 1, run_name: str = "r", run_id: int = 11,
                extra: dict | None = None):
        """A coordinator's ``train``/``evaluate`` Message (``extra``: more message-config entries)."""
        import time

        from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, RecordDict

        config = ConfigRecord({"server-round": server_round, "run-name": run_name, **(extra or {})})
        metadata = Metadata(run_id=run_id, message_id=f"{kind}-{server_round}", src_node_id=0, dst_node_id=1,
                            reply_to_message_id="", group_id=str(server_round), created_at=time.time(),
                            ttl=600.0, message_type=kind)
        return Message(content=RecordDict({"arrays": ArrayRecord(weights), "config": config}), metadata=metadata)

    def send(self, kind: str, *overrides: str, node_config: dict | None = None, weights: dict | None = None,
             **message_args: object):
        """Build the run config from ``overrides``, send one ``kind`` message to the ClientApp, return the reply."""
        from client.app import evaluate, train

        run_config = self.run_config(*overrides)
        msg = self.message(kind, self.weights(run_config) if weights is None else weights, **message_args)
        handler = {"train": train, "evaluate": evaluate}[kind]
        return handler(msg, self.context(run_config, node_config=node_config))

    def train(self, *overrides: str, **kwargs: object):
        """:meth:`send` a ``train`` message."""
        return self.send("train", *overrides, **kwargs)

    def evaluate(self, *overrides: str, **kwargs: object):
        """:meth:`send` an ``evaluate`` message."""
        return self.send("evaluate", *overrides, **kwargs)


@pytest.fixture
def real_site(tmp_path: Path) -> RealSite:
    """A real hospital site (site-name, data-dir, state-dir, policy file, all under ``tmp_path``).

    Yields a :class:`RealSite`: ``real_site.train(*overrides)`` / ``.evaluate(*overrides)``
    send one message built from a hostile run config (``key=value`` overrides of
    :data:`REAL_SITE_CONFIG`) to the real ClientApp handlers (``client.app.train`` /
    ``evaluate``) and return the reply Message; ``.context()``, ``.message()``,
    ``.weights()`` and ``.run_config()`` build the pieces by hand; ``.node_config`` and
    ``.write_policy()`` change the site itself. The site's ledger and audit log are under
    ``real_site.state_dir / real_site.name``.
    """
    yield RealSite(tmp_path)


@pytest.fixture
def simulated_site_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make this test process count as a simulation engine's site worker (:mod:`client.simulated`).

    In a real run only a worker of Flower's Ray actor pool is; tests that call the
    ClientApp or ``site_settings`` in-process with a simulation's node config
    (``partition-id``, no ``state-dir``) need this to get a simulated site.
    """
    import client.simulated as simulated

    monkeypatch.setattr(simulated, "_in_flower_simulation_actor", lambda: True)
