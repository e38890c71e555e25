"""The run directory: everything a federated run leaves behind, written as it goes.

Layout (``<server.out_dir>/<run name>/``)::

    config.yaml            the resolved experiment config
    rounds.jsonl           one line per round: global (central) metrics, aggregated
                           site metrics, participating/refusing/failing sites
    sites.jsonl            one line per site per round and phase (train/evaluate)
    privacy.jsonl          one line per site per round: epsilon spent so far, delta
    checkpoints/round-NNNN.pt   global model (+ strategy state) after round NNNN
    summary.json           written at the end: final metrics, epsilon per site, timing

Each round's lines are appended before its checkpoint is written atomically, so
the newest checkpoint always marks the last *completed* round; resuming drops any
line of a later, unfinished round and continues from there.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from federation.config import ExperimentConfig, to_yaml

if TYPE_CHECKING:  # torch loads when a checkpoint is written or read, not for reading records
    import torch

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
ROUNDS_FILE = "rounds.jsonl"
SITES_FILE = "sites.jsonl"
PRIVACY_FILE = "privacy.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
JSONL_FILES = (ROUNDS_FILE, SITES_FILE, PRIVACY_FILE)

#: Config keys that may differ between a run and its resumption.
RESUMABLE_CHANGES = frozenset(
    {
        "server.rounds",
        "server.resume",
        "server.round_timeout",
        "server.keep_checkpoints",
        "server.out_dir",
        "server.run_name",
        "data.data_dir",
        "privacy.target_epsilon",  # raised explicitly to extend a DP run (the sites calibrate the added rounds)
    }
)


def _clean(value: Any) -> Any:
    """Make a value JSON-safe: NaN/inf become null, numpy scalars become Python ones."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file; a missing file is an empty list."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def default_run_name(config: ExperimentConfig) -> str:
    """``<name>-<UTC timestamp>``, unless ``server.run_name`` is set."""
    if config.server.run_name:
        return config.server.run_name
    return f"{config.name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


@dataclass(frozen=True)
class Checkpoint:
    """The state saved after a completed round."""

    round: int
    weights: dict[str, torch.Tensor]
    strategy_state: dict[str, Any]


class RunDirectory:
    """Writes (and on resume, reads back) one run's directory."""

    def __init__(self, path: Path, *, keep_checkpoints: int = 0) -> None:
        self.path = Path(path)
        self.keep_checkpoints = keep_checkpoints
        self.started = time.time()

    @property
    def name(self) -> str:
        """The run's name (its folder name)."""
        return self.path.name

    # -- opening ---------------------------------------------------------------
    @classmethod
    def create(cls, config: ExperimentConfig) -> RunDirectory:
        """Create a new run directory; refuse to overwrite an existing run."""
        path = Path(config.server.out_dir).expanduser() / default_run_name(config)
        if (path / CONFIG_FILE).exists():
            raise FileExistsError(
                f"run directory {path} already holds a run; choose another server.run_name, "
                f"or continue it with server.resume={path}"
            )
        (path / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        run = cls(path, keep_checkpoints=config.server.keep_checkpoints)
        run._write_atomic(path / CONFIG_FILE, to_yaml(config).encode())
        logger.info("run directory: %s", path.resolve())
        return run

    @classmethod
    def resume(cls, config: ExperimentConfig) -> RunDirectory:
        """Open ``config.server.resume`` for continuation, checking the config matches."""
        path = Path(config.server.resume).expanduser()
        stored_file = path / CONFIG_FILE
        if not stored_file.is_file():
            raise FileNotFoundError(f"server.resume={path}: no {CONFIG_FILE} there; is it a medfed run directory?")
        stored = yaml.safe_load(stored_file.read_text())
        changed = _changed_keys(stored, config.model_dump())
        forbidden = sorted(k for k in changed if k not in RESUMABLE_CHANGES)
        if forbidden:
            raise ValueError(
                f"server.resume={path}: the config differs from the run's {CONFIG_FILE} in "
                f"{', '.join(forbidden)}; only {', '.join(sorted(RESUMABLE_CHANGES))} may change on resume"
            )
        run = cls(path, keep_checkpoints=config.server.keep_checkpoints)
        completed = run.last_completed_round()
        run._truncate_after(completed)
        run._write_atomic(path / CONFIG_FILE, to_yaml(config.model_copy(
            update={"server": config.server.model_copy(update={"resume": ""})})).encode())
        logger.info("resuming run %s after round %d", path.resolve(), completed)
        return run

    # -- writing ---------------------------------------------------------------
    def append(self, filename: str, record: dict[str, Any]) -> None:
        """Append one JSON line to ``filename`` and flush it to disk."""
        with open(self.path / filename, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(_clean(record), allow_nan=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def save_checkpoint(self, checkpoint: Checkpoint) -> Path:
        """Write the round's checkpoint atomically and prune old ones if configured."""
        target = self.path / CHECKPOINT_DIR / f"round-{checkpoint.round:04d}.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        os.close(fd)
        import torch  # noqa: PLC0415

        torch.save(
            {"round": checkpoint.round, "weights": checkpoint.weights, "strategy_state": checkpoint.strategy_state},
            tmp,
        )
        os.replace(tmp, target)
        self._prune()
        return target

    def write_summary(self, summary: dict[str, Any]) -> Path:
        """Write ``summary.json`` (atomically)."""
        target = self.path / SUMMARY_FILE
        self._write_atomic(target, json.dumps(_clean(summary), indent=2, allow_nan=False).encode())
        return target

    # -- reading ---------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Round checkpoints, oldest first."""
        return sorted((self.path / CHECKPOINT_DIR).glob("round-*.pt"))

    def last_completed_round(self) -> int:
        """The newest checkpointed round (0 when none)."""
        found = self.checkpoints()
        return int(found[-1].stem.split("-")[1]) if found else 0

    def load_checkpoint(self, round_number: int | None = None) -> Checkpoint | None:
        """Load a round's checkpoint (default: the newest); None when there is none."""
        found = self.checkpoints()
        if not found:
            return None
        path = found[-1] if round_number is None else self.path / CHECKPOINT_DIR / f"round-{round_number:04d}.pt"
        import torch  # noqa: PLC0415

        data = torch.load(path, map_location="cpu", weights_only=False)
        return Checkpoint(round=int(data["round"]), weights=data["weights"], strategy_state=data["strategy_state"])

    def rounds(self) -> list[dict[str, Any]]:
        """All round records written so far."""
        return read_jsonl(self.path / ROUNDS_FILE)

    # -- internals -------------------------------------------------------------
    def _truncate_after(self, completed: int) -> None:
        for filename in JSONL_FILES:
            rows = read_jsonl(self.path / filename)
            kept = [r for r in rows if int(r.get("round", 0)) <= completed]
            if len(kept) != len(rows):
                logger.info("%s: dropping %d line(s) of unfinished rounds", filename, len(rows) - len(kept))
                text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept)
                self._write_atomic(self.path / filename, text.encode())

    def _prune(self) -> None:
        if self.keep_checkpoints <= 0:
            return
        for old in self.checkpoints()[: -self.keep_checkpoints]:
            old.unlink()

    @staticmethod
    def _write_atomic(target: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, target)


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in set(old) | set(new):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys.extend(_changed_keys(a, b, f"{prefix}{key}."))
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys
