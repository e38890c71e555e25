"""The researcher's harness: resolve a config, run a simulated federation, report it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from federation.config import ConfigError, ExperimentConfig, load_config
from federation.data import resolve_data_dir
from server.run_dir import CONFIG_FILE, ROUNDS_FILE, default_run_name, read_jsonl
from simulations.engine import run_engine

logger = logging.getLogger(__name__)

PRESETS_DIR = Path(__file__).parent / "configs"
#: The preset ``medfed simulate`` runs with no argument: offline, synthetic data.
DEFAULT_PRESET = "synthetic"


def preset_path(name_or_path: str) -> Path:
    """A preset file by path, or by name from ``simulations/configs/`` (``.yaml`` optional)."""
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate
    for path in (PRESETS_DIR / name_or_path, PRESETS_DIR / f"{name_or_path}.yaml"):
        if path.is_file():
            return path
    names = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"config {name_or_path!r} is neither a file nor a preset; presets: {names}")


def resolve_config(
    *, config_path: str | None = None, overrides: Iterable[str] = (), resume: str | None = None
) -> ExperimentConfig:
    """Build the run's config with absolute paths and a fixed run name.

    With ``resume``, the config stored in that run directory is the base and the
    overrides apply on top (e.g. ``server.rounds=10`` to extend a run).
    """
    overrides = list(overrides)
    if resume:
        run_dir = Path(resume).expanduser().resolve()
        if not (run_dir / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"--resume {run_dir}: no {CONFIG_FILE}; is it a medfed run directory?")
        config = load_config(run_dir / CONFIG_FILE, overrides)
        server = config.server.model_copy(
            update={"resume": str(run_dir), "out_dir": str(run_dir.parent), "run_name": run_dir.name}
        )
        return config.model_copy(update={"server": server})
    source = preset_path(config_path or DEFAULT_PRESET)
    config = load_config(source, overrides)
    from simulations.scenario import scenario_problems  # noqa: PLC0415 - registries (torch): not for `medfed --help`

    problems = scenario_problems(config)  # faults/attack/quantity/shift settings that span sections
    if problems:
        raise ConfigError(problems, source=f"{source}{' with --set overrides' if overrides else ''}")
    data = config.data.model_copy(update={"data_dir": str(resolve_data_dir(config.data.data_dir))})
    server = config.server.model_copy(
        update={
            "out_dir": str(Path(config.server.out_dir).expanduser().resolve()),
            "run_name": default_run_name(config),
        }
    )
    return config.model_copy(update={"data": data, "server": server})


def run_dir_of(config: ExperimentConfig) -> Path:
    """The run directory a resolved config writes to."""
    return Path(config.server.out_dir) / config.server.run_name


@dataclass
class RoundWatcher:
    """Follows ``rounds.jsonl`` while a run goes on and reports each new round."""

    path: Path
    on_round: Callable[[dict], None]
    interval: float = 0.5

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._seen = 0
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RoundWatcher:
        self._seen = len(read_jsonl(self.path))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll()

    def _poll(self) -> None:
        try:
            rows = read_jsonl(self.path)
        except ValueError:
            return  # a line being written; next poll reads it whole
        for row in rows[self._seen :]:
            self.on_round(row)
        self._seen = max(self._seen, len(rows))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()


def simulate(
    config: ExperimentConfig,
    *,
    on_round: Callable[[dict], None] | None = None,
    verbose: bool = False,
) -> Path:
    """Run a whole simulated federation; returns its run directory.

    Args:
        config: A config from :func:`resolve_config`.
        on_round: Called with each round's record as soon as it is written.
        verbose: Show Flower's and Ray's own logs.
    """
    run_dir = run_dir_of(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    watcher = RoundWatcher(run_dir / ROUNDS_FILE, on_round or (lambda row: None))
    with watcher:
        run_engine(config, verbose=verbose)
    if not (run_dir / "summary.json").is_file():
        raise RuntimeError(f"the simulation ended without finishing run {run_dir}; see the log above")
    return run_dir
