"""Sweep presets and their results: what a sweep runs, and the rows of what it ran.

The spec side (:func:`load_sweep`, :func:`expand`, :func:`sweep_dir`) and the
collection side (:func:`collect`, :func:`failed_runs`, :func:`failure_reason`) are
what both the runner (:mod:`simulations.sweep`) and the report
(:mod:`simulations.sweep_report`) need; keeping them here lets each of those import
this module without importing the other. The preset format is described in
:mod:`simulations.sweep`.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from federation.config import ConfigError, load_config
from server.run_dir import ROUNDS_FILE, SUMMARY_FILE, read_jsonl
from simulations.harness import PRESETS_DIR, preset_path

logger = logging.getLogger(__name__)

SWEEPS_DIR = PRESETS_DIR / "sweeps"
SWEEP_KEYS = frozenset({"name", "base", "set", "strategies", "privacy", "seeds", "scenarios", "grid", "baselines",
                        "metric", "out_dir"})
NO_DP = "off"


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its id, labels and the overrides that make it."""

    run_id: str
    scenario: str
    strategy: str
    epsilon: str
    seed: int
    grid: dict[str, Any]
    overrides: tuple[str, ...]

    def group(self) -> tuple[str, ...]:
        """What the run is compared by (everything but the seed)."""
        return (self.scenario, self.strategy, self.epsilon, *(f"{k}={v}" for k, v in self.grid.items()))


@dataclass
class SweepSpec:
    """A parsed sweep preset."""

    name: str
    base: Path
    path: Path
    common: list[str] = field(default_factory=list)
    strategies: dict[str, list[str]] = field(default_factory=dict)
    privacy: list[str] = field(default_factory=lambda: [NO_DP])
    seeds: list[int] = field(default_factory=lambda: [0])
    scenarios: dict[str, list[str]] = field(default_factory=lambda: {"default": []})
    grid: dict[str, list[Any]] = field(default_factory=dict)
    baselines: bool = False
    metric: str = "auc"
    out_dir: str = "runs/sweeps"


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(value)).strip("-") or "x"


def _overrides(value: Any, where: str, problems: list[str]) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        problems.append(f"{where}: expected a list of key=value strings, got {value!r}")
        return []
    return list(value)


def _headline_of(base: Path) -> str:
    """The metric that ranks runs of the base preset's task (``auc``, segmentation ``dice``)."""
    from federation.tasks import headline_metric  # noqa: PLC0415

    try:
        return headline_metric(load_config(base).data.task)
    except (FileNotFoundError, ValueError):
        return "auc"  # the base's own problem is reported where it is loaded


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep preset (every problem reported at once).

    Raises:
        FileNotFoundError: The file or its base preset does not exist.
        ConfigError: Unknown keys or malformed entries.
    """
    path = Path(path)
    if not path.is_file() and (SWEEPS_DIR / path).is_file():
        path = SWEEPS_DIR / path
    if not path.is_file():
        raise FileNotFoundError(f"sweep preset {path} does not exist (shipped ones: {SWEEPS_DIR})")
    raw = yaml.safe_load(path.read_text()) or {}
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError(["the top level must be a mapping"], source=str(path))
    allowed = ", ".join(sorted(SWEEP_KEYS))
    problems += [f"{k}: unknown sweep key; allowed: {allowed}" for k in raw if k not in SWEEP_KEYS]
    name = str(raw.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        problems.append(f"name: {name!r} must be letters, digits, _ . -")
    base = preset_path(str(raw.get("base", "synthetic")))
    strategies_raw = raw.get("strategies") or ["fedavg"]
    if isinstance(strategies_raw, list):
        strategies = {str(s): [f"strategy.name={s}"] for s in strategies_raw}
    elif isinstance(strategies_raw, dict):
        strategies = {}
        for label, extra in strategies_raw.items():
            extra = _overrides(extra, f"strategies.{label}", problems)
            named = any(o.split("=", 1)[0].strip() == "strategy.name" for o in extra)
            strategies[str(label)] = extra if named else [f"strategy.name={label}", *extra]
    else:
        problems.append(f"strategies: expected a list or a mapping, got {strategies_raw!r}")
        strategies = {}
    privacy = [NO_DP if v in (None, False, NO_DP, "none") else str(v) for v in (raw.get("privacy") or [NO_DP])]
    for value in privacy:
        if value != NO_DP:
            try:
                if float(value) <= 0:
                    raise ValueError
            except ValueError:
                problems.append(f"privacy: {value!r} is neither 'off' nor a positive epsilon")
    seeds = raw.get("seeds") or [0]
    if not all(isinstance(s, int) and s >= 0 for s in seeds):
        problems.append(f"seeds: expected non-negative integers, got {seeds!r}")
    scenarios_raw = raw.get("scenarios") or {"default": []}
    scenarios = {str(k): _overrides(v, f"scenarios.{k}", problems) for k, v in dict(scenarios_raw).items()}
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        problems.append(f"grid: expected dotted key -> non-empty list of values, got {grid!r}")
        grid = {}
    metric = str(raw.get("metric", _headline_of(base)))
    if metric not in ("auc", "accuracy", "dice"):
        problems.append(f"metric: {metric!r}; allowed: 'auc', 'accuracy', 'dice' (segmentation)")
    if problems:
        raise ConfigError(problems, source=str(path))
    return SweepSpec(
        name=name, base=base, path=path, common=_overrides(raw.get("set"), "set", problems),
        strategies=strategies, privacy=privacy, seeds=list(seeds), scenarios=scenarios, grid=dict(grid),
        baselines=bool(raw.get("baselines", False)), metric=metric, out_dir=str(raw.get("out_dir", "runs/sweeps")),
    )


def expand(spec: SweepSpec) -> list[SweepRun]:
    """Every run of the sweep, in a fixed order."""
    runs = []
    grid_keys = list(spec.grid)
    for scenario, strategy, epsilon, seed, *values in itertools.product(
        spec.scenarios, spec.strategies, spec.privacy, spec.seeds, *(spec.grid[k] for k in grid_keys)
    ):
        dp = ["privacy.enabled=false"] if epsilon == NO_DP else ["privacy.enabled=true",
                                                                 f"privacy.target_epsilon={epsilon}"]
        grid = dict(zip(grid_keys, values))
        parts = [scenario, strategy, f"eps-{epsilon}", *(f"{k.split('.')[-1]}-{v}" for k, v in grid.items()),
                 f"seed-{seed}"]
        runs.append(SweepRun(
            run_id="__".join(_slug(p) for p in parts), scenario=scenario, strategy=strategy, epsilon=epsilon,
            seed=int(seed), grid=grid,
            overrides=(*spec.common, *spec.scenarios[scenario], *spec.strategies[strategy], *dp,
                       *(f"{k}={v}" for k, v in grid.items()), f"seed={seed}"),
        ))
    return runs


def sweep_dir(spec: SweepSpec, out_dir: str | None = None) -> Path:
    """``<out_dir>/<name>``, absolute."""
    return (Path(out_dir or spec.out_dir).expanduser() / spec.name).resolve()



def failure_reason(run_path: Path) -> str | None:
    """Why a finished run is not a result (no round aggregated), or None if it is one.

    Args:
        run_path: A run directory with ``summary.json``.

    Returns:
        ``"no round aggregated; first failure: <site>: <reason>"``, or None for a run
        with at least one aggregated round (or one that has not finished).
    """
    summary_path = run_path / SUMMARY_FILE
    if not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    if summary.get("rounds_aggregated", 1) or not summary.get("rounds_completed", 1):
        return None
    for record in read_jsonl(run_path / ROUNDS_FILE):
        problems = {**(record.get("failed") or {}), **(record.get("refused") or {})}
        if problems:
            site, why = sorted(problems.items())[0]
            return f"no round aggregated; first failure: {site}: {why}"
    return "no round aggregated"


def failed_runs(spec: SweepSpec, root: Path) -> list[tuple[str, str]]:
    """``(run id, reason)`` of every finished run of the sweep that failed."""
    found = []
    for run in expand(spec):
        reason = failure_reason(root / "runs" / run.run_id)
        if reason is not None:
            found.append((run.run_id, reason))
    return found


def collect(spec: SweepSpec, root: Path) -> list[dict[str, Any]]:
    """One row per finished run that is a result (see :func:`failure_reason`): its labels and final metrics."""
    rows = []
    from simulations.baselines import final_site_metrics

    for run in expand(spec):
        path = root / "runs" / run.run_id
        if not (path / SUMMARY_FILE).is_file() or failure_reason(path) is not None:
            continue
        summary = json.loads((path / SUMMARY_FILE).read_text())
        final = summary.get("final_global") or {}
        sites = final_site_metrics(path)
        row: dict[str, Any] = {"run": run.run_id, "scenario": run.scenario, "strategy": run.strategy,
                               "epsilon": run.epsilon, "seed": run.seed, **run.grid}
        for metric in ("dice", "loss") if spec.metric == "dice" else ("auc", "accuracy", "loss"):
            row[f"global_{metric}"] = _num(final.get(metric))
            values = [_num(m.get(metric)) for m in sites.values()]
            values = [v for v in values if not math.isnan(v)]
            row[f"site_mean_{metric}"] = sum(values) / len(values) if values else math.nan
        row["max_epsilon"] = (math.nan if run.epsilon == NO_DP
                              else _num((summary.get("privacy") or {}).get("max_epsilon")))
        row["rounds_aggregated"] = summary.get("rounds_aggregated")
        row["curve"] = [(r["round"], _num(r["global"][spec.metric]))  # evaluated rounds only (server.eval_every)
                        for r in read_jsonl(path / ROUNDS_FILE)
                        if r.get("round") and (r.get("global") or {}).get(spec.metric) is not None]
        rows.append(row)
    return rows


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan
