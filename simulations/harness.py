"""The researcher's harness: resolve a config, run a simulated federation, report it."""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from federation.config import ConfigError, ExperimentConfig, dataset_problems, load_config
from federation.data import resolve_data_dir
from server.run_dir import CONFIG_FILE, PRIVACY_FILE, ROUNDS_FILE, default_run_name, read_jsonl
from simulations.engine import run_engine, start_ray, stop_ray

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
    config, source = _read_config(config_path=config_path, overrides=overrides, resume=resume)
    return config if source is None else _complete_config(config, source)


#: The federation core a run imports before its sites start (no Ray, no Flower: see :func:`start_ray`).
CORE_MODULES = (
    "federation.models",
    "federation.data",
    "federation.training",
    "federation.privacy",
    "federation.metrics",
)


def start_simulation(
    *,
    config_path: str | None = None,
    overrides: Iterable[str] = (),
    resume: str | None = None,
    verbose: bool = False,
) -> ExperimentConfig:
    """:func:`resolve_config` for a run that starts right away; Ray starts meanwhile.

    The config file, keys and types are checked first, so a typo fails before
    anything starts. Then Ray's processes start while another thread imports the
    federation core (torch, MONAI, Opacus), which the scenario checks and the run
    need anyway: on two cores the two overlap instead of adding up (~4 s of a
    run's start-up on the dev box, docs/BENCHMARKS.md P1). A config that fails the
    scenario checks stops Ray again before the error is raised.
    """
    config, source = _read_config(config_path=config_path, overrides=overrides, resume=resume)
    start_ray(verbose=verbose, preload=CORE_MODULES, address=config.simulation.ray_address)
    try:
        return config if source is None else _complete_config(config, source)
    except BaseException:
        stop_ray()
        raise


def _read_config(
    *, config_path: str | None, overrides: Iterable[str], resume: str | None
) -> tuple[ExperimentConfig, str | None]:
    """The config as read and validated by type; the source to name in scenario errors (None: resumed)."""
    overrides = list(overrides)
    if resume:
        run_dir = Path(resume).expanduser().resolve()
        if not (run_dir / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"--resume {run_dir}: no {CONFIG_FILE}; is it a medfed run directory?")
        config = load_config(run_dir / CONFIG_FILE, overrides)
        problems = extension_budget_problems(run_dir, config)
        if problems:
            raise ConfigError(problems, source=f"--resume {run_dir}")
        server = config.server.model_copy(
            update={"resume": str(run_dir), "out_dir": str(run_dir.parent), "run_name": run_dir.name}
        )
        return config.model_copy(update={"server": server}), None
    source = preset_path(config_path or DEFAULT_PRESET)
    return load_config(source, overrides), f"{source}{' with --set overrides' if overrides else ''}"


def extension_budget_problems(run_dir: Path, config: ExperimentConfig) -> list[str]:
    """Problems of extending a DP run beyond the rounds its noise was calibrated for, without a raised budget.

    In target-epsilon mode every site calibrated its noise so that the run's planned
    rounds spend ``privacy.target_epsilon``: more rounds at the same budget would be
    refused by every site. Raising the budget explicitly lets each site calibrate the
    added rounds' noise from its own accountant history (see
    :meth:`federation.privacy.SitePrivacy.load_state_dict`).

    Args:
        run_dir: The run directory being resumed.
        config: Its config with the resume overrides applied.
    """
    stored = load_config(run_dir / CONFIG_FILE)
    privacy = config.privacy
    if not privacy.enabled or privacy.noise_multiplier > 0 or config.server.rounds <= stored.server.rounds:
        return []
    if privacy.target_epsilon > stored.privacy.target_epsilon:
        return []
    spent = max((float(row["epsilon"]) for row in read_jsonl(run_dir / PRIVACY_FILE)
                 if row.get("epsilon") is not None), default=0.0)
    suggested = math.ceil(stored.privacy.target_epsilon * config.server.rounds / stored.server.rounds)
    return [
        f"privacy.target_epsilon: the budget is spent: the run's noise was calibrated to spend "
        f"privacy.target_epsilon={stored.privacy.target_epsilon:g} over its {stored.server.rounds} planned rounds "
        f"(its sites have spent up to epsilon {spent:.2f}, {PRIVACY_FILE}), so every site would refuse rounds "
        f"beyond them. Raise it explicitly to extend the run to server.rounds={config.server.rounds}, e.g. "
        f"--set privacy.target_epsilon={suggested}: each site then calibrates the added rounds' noise from its "
        f"own accountant so that its whole-run epsilon stays within it (its policy and lifetime ledger still decide)"
    ]


def _complete_config(config: ExperimentConfig, source: str) -> ExperimentConfig:
    """A new run's config after the scenario checks, with absolute paths and its run name."""
    from simulations.scenario import scenario_problems  # noqa: PLC0415 - registries (torch): not for `medfed --help`

    problems = scenario_problems(config)  # faults/attack/quantity/shift settings that span sections
    problems += dataset_problems(config)  # site-only data: the model's shape declared in the config
    if problems:
        raise ConfigError(problems, source=source)
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
    """Follows ``rounds.jsonl`` while a run goes on and reports each new round.

    Each poll reads only the bytes appended since the last one (a round's record
    is ~20 KB with ten sites' clinical metrics, so re-reading the whole file every
    poll made a long run's watcher cost grow with the square of its rounds), and
    only whole lines: a line still being written waits for the next poll. A file
    that is replaced or shrinks (a resumed run drops its unfinished rounds) is read
    again from the start; of its rows, only rounds not seen before are reported.
    """

    path: Path
    on_round: Callable[[dict], None]
    interval: float = 0.5

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._file: tuple[int, int] | None = None  # (device, inode) of the file followed
        self._offset = 0  # bytes of it already consumed (whole lines only)
        self._last_round = -1  # highest round reported, or present when watching began
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RoundWatcher:
        self._catch_up(report=False)  # a resumed run's earlier rounds are history
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()

    def poll(self) -> None:
        """Report the rounds written since the last poll (the watcher's thread calls this)."""
        self._catch_up(report=True)

    def _catch_up(self, *, report: bool) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return
        identity = (stat.st_dev, stat.st_ino)
        restarted = identity != self._file or stat.st_size < self._offset
        if restarted:
            self._file, self._offset = identity, 0
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        rows = [row for row in map(self._parse, complete.splitlines()) if row is not None]
        seen = self._last_round
        if restarted and rows:  # the rewritten file's rows set where the run stands now
            self._last_round = max(int(row.get("round", -1)) for row in rows)
        for row in rows:
            if restarted and int(row.get("round", -1)) <= seen:
                continue
            self._last_round = max(self._last_round, int(row.get("round", -1)))
            if report:
                self.on_round(row)

    def _parse(self, line: bytes) -> dict | None:
        if not line.strip():
            return None
        try:
            return json.loads(line)
        except ValueError:
            logger.warning("%s: skipping a line that is not JSON: %.80r", self.path, line)
            return None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()


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
