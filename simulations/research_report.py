"""A run's research report: Markdown with its PNG plots beside it, ready for a paper supplement.

``report.md`` in the run directory states the scenario (partition, feature shift,
faults, attack), the sites with their sizes and label mixes, the model, local
training, strategy and DP settings, which sites took part in which round, epsilon
per site, per-site and overall test metrics and, when ``medfed simulate
--baselines`` ran, the pooled / local-only / federated comparison.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from federation.config import ExperimentConfig, load_config
from federation.data import describe_sites
from federation.data.scenario import site_profile
from federation.faults import fault_schedule
from federation.tasks import headline_metric
from server.fairness import NO_SITE_VALUE, NOT_REPORTED, na_reason
from server.run_dir import CONFIG_FILE, PRIVACY_FILE, ROUNDS_FILE, SUMMARY_FILE, read_jsonl
from simulations.baselines import baselines_markdown, compared, final_site_metrics, read_baselines
from simulations.report import PLOTS_DIR, write_plots
from simulations.scenario import describe_scenario

logger = logging.getLogger(__name__)

REPORT_FILE = "report.md"


def _f(value: Any, digits: int = 3, *, reason: str | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"n/a ({reason})" if reason else "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _mean(values: list[float]) -> float:
    known = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return float(np.mean(known)) if known else math.nan


def _mix(counts: dict[Any, int]) -> str:
    total = sum(counts.values()) or 1
    return ", ".join(f"{k}: {v} ({100 * v / total:.0f}%)" for k, v in counts.items())


def sites_table(config: ExperimentConfig) -> list[str]:
    """Markdown rows describing every site's data (and its acquisition profile, if any)."""
    sites = describe_sites(config.data, seed=config.seed)
    natural = any("origin" in s for s in sites)
    profiles = [site_profile(config.data, site_index=k, seed=config.seed) for k in range(len(sites))]
    head = ["site"] + (["hospital"] if natural else []) + ["train", "test", "train labels", "test labels"]
    if any(profiles):
        head.append("acquisition profile")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for site, profile in zip(sites, profiles):
        row = [site["name"]] + ([site.get("origin", "")] if natural else [])
        row += [str(site["n_train"]), str(site["n_test"]), _mix(site["label_counts"]), _mix(site["test_label_counts"])]
        if any(profiles):
            row.append(", ".join(f"{k} {v:.2f}" for k, v in profile.items()))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def participation_table(rounds: list[dict[str, Any]]) -> list[str]:
    """Which sites trained, failed or refused in each round, and whether it aggregated.

    A failed site sent an error reply, which carries no site name: it is listed by
    node id (the planned faults line of the report names the simulated dropouts).
    """
    lines = ["| round | trained | failed (error replies) | refused | aggregated |", "|---:|---|---|---|---|"]
    for row in rounds:
        if not row.get("round"):
            continue
        trained = sorted(name for name, site in (row.get("sites") or {}).items() if "train" in site)
        failed = ", ".join(sorted(row.get("failed") or {})) or "–"
        refused = ", ".join(sorted(row.get("refused") or {})) or "–"
        lines.append(f"| {row['round']} | {', '.join(trained) or '–'} | {failed} | {refused} | "
                     f"{'yes' if row.get('aggregated') else 'no'} |")
    return lines


def _settings(config: ExperimentConfig) -> list[str]:
    train, privacy, strategy = config.train, config.privacy, config.strategy
    schedule = f"{train.local_steps} steps" if train.local_steps else f"{train.local_epochs:g} epoch(s)"
    dp = (f"DP-SGD (Opacus), target epsilon {privacy.target_epsilon:g} at delta {privacy.target_delta:g} per site "
          f"for the whole run, clipping {privacy.max_grad_norm:g}, accountant {privacy.accountant}"
          + (f", noise multiplier {privacy.noise_multiplier:g}" if privacy.noise_multiplier else "")
          if privacy.enabled else "off")
    return [
        f"- **Dataset**: {config.data.dataset}, {config.data.num_sites} sites, seed {config.seed}",
        f"- **Model**: {config.model.name}" + ("" if config.model.name == "logreg" else
                                                f" (norm {config.model.norm}, width {config.model.width})"),
        f"- **Local training**: {train.optimizer} lr {train.lr:g} (momentum {train.momentum:g}), batch "
        f"{train.batch_size}, {schedule} per round",
        f"- **Strategy**: {strategy.name}, quorum {min(strategy.min_sites, config.data.num_sites)}, "
        f"{config.server.rounds} rounds",
        f"- **Differential privacy**: {dp}",
    ]


#: How the results table names a metric.
_LABELS = {"auc": "AUC", "accuracy": "accuracy", "loss": "loss", "dice": "Dice"}
#: The rate whose counts explain a missing headline value (:func:`server.fairness.na_reason`).
_NA_RATES = {"auc": "roc-auc"}


def _results(run_dir: Path, summary: dict[str, Any], config: ExperimentConfig) -> list[str]:
    """Each site's and the pooled test metrics of the final global model: the task's headline first."""
    headline = headline_metric(config.data.task)
    metrics = [headline, *(m for m in compared(config.data.task).metrics if m != headline)]
    label = {m: _LABELS.get(m, m) for m in metrics}
    lines = ["The final global model on each site's own test split:", "",
             "| site | " + " | ".join(f"test {label[m]}" for m in metrics) + " | epsilon spent |",
             "|---|" + "---:|" * (len(metrics) + 1)]
    site_eval = final_site_metrics(run_dir, config) if summary else {}
    eps = (summary.get("privacy") or {}).get("epsilon_per_site") or {}
    reported = summary.get("final_site_evaluate") or {}
    for site in sorted(set(site_eval) | set(eps), key=lambda name: (len(name), name)):
        m = site_eval.get(site, {})
        why = "no evaluation of this site" if site not in reported else (
            na_reason(reported[site], _NA_RATES[headline]) if headline in _NA_RATES else NOT_REPORTED)
        spent = _f(eps.get(site), 2, reason="no ledger entry") if config.privacy.enabled else "no DP"
        cells = [_f(m.get(headline), reason=why), *(_f(m.get(k), reason=NOT_REPORTED) for k in metrics[1:])]
        lines.append(f"| {site} | {' | '.join(cells)} | {spent} |")
    if site_eval:
        means = [_f(_mean([m.get(k, math.nan) for m in site_eval.values()]), reason=NO_SITE_VALUE)
                 for k in metrics if k != "loss"]
        lines.append("| mean over sites | " + " | ".join(means) + " |" + " |" * (len(metrics) - len(means) + 1))
    final = summary.get("final_global") or {}
    central = None if final else "no central evaluation"
    shown = ", ".join(f"{label[k]} {_f(final.get(k), reason=central)}" for k in metrics)
    best = _f(summary.get(f"best_global_{headline}"), reason=central or "undefined in every round")
    lines += ["", f"Global model on the pooled test split (no site shift) after round "
              f"{summary.get('rounds_completed')}: {shown}; best {label[headline]} {best} "
              f"(round {_f(summary.get('best_round'))})."]
    return lines


def write_run_report(run_dir: Path, *, plots: list[Path] | None = None) -> Path:
    """Write ``report.md`` (and the plots) for a finished run directory.

    Args:
        run_dir: A run directory with ``config.yaml``, ``rounds.jsonl`` and ``summary.json``.
        plots: The run's plots when the caller has just written them with
            :func:`simulations.report.write_plots` (they are not drawn twice); ``None``
            writes them.

    Returns:
        The report's path.
    """
    run_dir = Path(run_dir)
    config = load_config(run_dir / CONFIG_FILE)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text()) if (run_dir / SUMMARY_FILE).is_file() else {}
    rounds = read_jsonl(run_dir / ROUNDS_FILE)
    plots = write_plots(run_dir) if plots is None else plots
    lines = [f"# medfed run `{run_dir.name}`", "", "## Scenario", ""]
    lines += [f"- **{k}**: {v}" for k, v in describe_scenario(config).items()]
    schedule = fault_schedule(config.faults, num_sites=config.data.num_sites, rounds=config.server.rounds,
                              seed=config.seed)
    if schedule:
        lines.append("- **planned faults**: " + "; ".join(
            f"round {r}: " + ", ".join(f"site-{k + 1} {f}" for k, f in sorted(faults.items()))
            for r, faults in schedule.items()))
    lines += ["", "## Sites", "", *sites_table(config), "", "## Settings", "", *_settings(config), ""]
    lines += ["## Participation", "", *participation_table(rounds), "", "## Results", "",
              *_results(run_dir, summary, config)]
    if config.privacy.enabled and read_jsonl(run_dir / PRIVACY_FILE):
        lines += ["", "Epsilon is each site's own accountant (RDP/PRV/GDP as configured) over all its rounds."]
    baselines = read_baselines(run_dir)
    if baselines:
        sites = [f"site-{k + 1}" for k in range(config.data.num_sites)]
        lines += ["", "## Pooled vs local-only vs federated", "", baselines_markdown(baselines, sites=sites)]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({PLOTS_DIR}/{p.name})" for p in plots]
    lines += ["", f"Full config: `{CONFIG_FILE}`; per-round records: `{ROUNDS_FILE}`.", ""]
    path = run_dir / REPORT_FILE
    path.write_text("\n".join(lines))
    logger.info("wrote %s", path)
    return path
