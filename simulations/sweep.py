"""Sweeps: strategies x privacy budgets x seeds (x scenarios), run, resumed and compared.

A sweep preset (YAML, see ``simulations/configs/sweeps/``)::

    # medfed sweep simulations/configs/sweeps/NAME.yaml
    name: heart-flamby            # the sweep's folder under out_dir
    base: heart_natural           # preset every run starts from (name or path)
    set: [server.rounds=15]       # overrides for every run
    strategies:                   # a list of names, or name -> overrides
      fedavg: [train.lr=0.001]
      fedadam: [train.lr=0.01, strategy.eta=0.01]
    privacy: [off, 1, 8]          # off = no DP; a number = DP-SGD at that target epsilon
    seeds: [0, 1, 2, 3, 4]
    scenarios:                    # optional, name -> overrides
      clean: []
      scaled-x10: [attack.kind=scale, attack.sites=5]
    baselines: false              # also train pooled / local-only baselines per run
    metric: auc                   # comparison metric of the plots (auc or accuracy)

Every combination is one run directory ``<out_dir>/<name>/runs/<run id>``. A run
whose ``summary.json`` exists is not redone; a run that stopped half way is
resumed from its last checkpoint. A run in which no round aggregated (every site
failed or refused every round: a broken site environment, not a result) is
*failed*: it is left out of the comparison, named in ``report.md``, and run again
by the next ``medfed sweep`` after its directory is moved aside to
``<run id>.failed-<n>`` (nothing is deleted). Then the sweep writes ``comparison.md`` and
``comparison.csv`` (mean +- std over seeds), ``runs.csv`` (one row per run) and
``plots/`` (the metric per round per strategy, and AUC against epsilon).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from pathlib import Path

from federation.config import ConfigError, ExperimentConfig
from server.run_dir import CONFIG_FILE, SUMMARY_FILE
from simulations.engine import warm_session
from simulations.harness import resolve_config, simulate
from simulations.sweep_spec import (  # noqa: F401  (the spec and collection, re-exported for callers)
    NO_DP,
    SWEEP_KEYS,
    SWEEPS_DIR,
    SweepRun,
    SweepSpec,
    collect,
    expand,
    failed_runs,
    failure_reason,
    load_sweep,
    sweep_dir,
)

logger = logging.getLogger(__name__)


def run_config(spec: SweepSpec, run: SweepRun, *, root: Path) -> ExperimentConfig:
    """The resolved config of one run (resuming it when it stopped half way)."""
    run_path = root / "runs" / run.run_id
    if (run_path / CONFIG_FILE).is_file() and not (run_path / SUMMARY_FILE).is_file():
        return resolve_config(resume=str(run_path))
    return resolve_config(config_path=str(spec.base), overrides=[
        *run.overrides, f"server.out_dir={root / 'runs'}", f"server.run_name={run.run_id}"])


def validate_sweep(spec: SweepSpec) -> list[ExperimentConfig]:
    """Resolve every run's config (nothing runs); all problems raised together."""
    configs, problems = [], []
    for run in expand(spec):
        try:
            configs.append(resolve_config(config_path=str(spec.base), overrides=list(run.overrides)))
        except ConfigError as err:
            problems += [f"{run.run_id}: {p}" for p in err.problems]
    if problems:
        raise ConfigError(problems, source=str(spec.path))
    return configs


def run_sweep(
    spec: SweepSpec,
    *,
    out_dir: str | None = None,
    on_run: Callable[[SweepRun, str], None] | None = None,
    verbose: bool = False,
    warm: bool = True,
) -> Path:
    """Run every missing run of the sweep, then write its comparison.

    The runs share one warm session (:func:`simulations.engine.warm_session`): one
    Ray, and site workers kept from run to run with their imports done, each run
    as isolated as a cold one (tests/test_warm_sweep.py). Runs whose configs name
    different Ray clusters (``simulation.ray_address``) each start their own.

    Args:
        spec: The sweep.
        out_dir: Override of the preset's ``out_dir``.
        on_run: Called with each run and ``"skipped"``, ``"running"``, ``"resuming"`` or ``"done"``.
        verbose: Show Flower's and Ray's logs.
        warm: Share one warm session between the runs (False: each run starts and stops Ray and its workers).

    Returns:
        The sweep directory.
    """
    from simulations.sweep_report import write_sweep_report

    configs = validate_sweep(spec)
    root = sweep_dir(spec, out_dir)
    (root / "runs").mkdir(parents=True, exist_ok=True)
    (root / "sweep.yaml").write_text(spec.path.read_text())
    addresses = {config.simulation.ray_address for config in configs}
    pending = any(not (root / "runs" / run.run_id / SUMMARY_FILE).is_file() for run in expand(spec))
    if warm and pending and len(addresses) == 1:
        with warm_session(verbose=verbose, address=addresses.pop()):
            _run_all(spec, root, on_run or (lambda run, status: None), verbose=verbose)
    else:  # nothing to run, runs on different Ray clusters, or warm=False: each run starts its own Ray
        _run_all(spec, root, on_run or (lambda run, status: None), verbose=verbose)
    write_sweep_report(spec, root)
    return root


def _run_all(spec: SweepSpec, root: Path, notify: Callable[[SweepRun, str], None], *, verbose: bool) -> None:
    """Run (or resume) each missing run of the sweep and its baselines, in order."""
    for run in expand(spec):
        run_path = root / "runs" / run.run_id
        earlier = failure_reason(run_path)
        if earlier is not None:
            aside = _move_aside(run_path)
            logger.warning("sweep run %s had failed (%s); moved to %s and running it again",
                           run.run_id, earlier, aside.name)
        if (run_path / SUMMARY_FILE).is_file():
            notify(run, "skipped")
        else:
            notify(run, "resuming" if (run_path / CONFIG_FILE).is_file() else "running")
            simulate(run_config(spec, run, root=root), verbose=verbose)
        reason = failure_reason(run_path)
        if reason is not None:
            logger.warning("sweep run %s failed: %s", run.run_id, reason)
            notify(run, "failed")
            continue
        if spec.baselines and not (run_path / "baselines.json").is_file():
            from simulations.baselines import run_baselines

            run_baselines(resolve_config(resume=str(run_path)), run_dir=run_path)
        notify(run, "done")


def _move_aside(run_path: Path) -> Path:
    for n in itertools.count(1):
        aside = run_path.with_name(f"{run_path.name}.failed-{n}")
        if not aside.exists():
            run_path.rename(aside)
            return aside
    raise AssertionError("unreachable")


