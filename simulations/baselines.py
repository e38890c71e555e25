"""Centralised baselines beside a federated run: pooled and local-only training.

``medfed simulate --baselines`` answers "did federating help?" on identical data,
model and amount of training:

* **pooled**: one model trained on the union of every site's training split (the
  sites' data exactly as they hold it, feature shifts included);
* **local-only**: one model per site, trained on that site's data alone;
* **federated**: the run's final global model.

Every model is evaluated on every site's own test split, on all sites' test data
pooled (``overall``), and summarised as the unweighted mean over sites (FLamby's
"average"). By default each baseline makes as many passes as the federated run:
``rounds x local_epochs`` epochs (with ``train.local_steps``: a local model takes
the same ``rounds x local_steps`` steps as its site did, the pooled model all
sites' steps together). ``baseline.epochs``/``optimizer``/``lr`` override this,
e.g. for FLamby's pooled protocol (Adam, lr 0.001, 50 epochs). With
``privacy.enabled`` every baseline is trained with DP-SGD at the same target
epsilon over its whole training.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from federation.config import ExperimentConfig
from federation.config.schema import TrainConfig
from federation.data import SiteData, load_site_data
from federation.models import build_model
from federation.privacy import SitePrivacy
from federation.tasks import get_task
from federation.training import TrainResult, evaluate, select_device, train_local

logger = logging.getLogger(__name__)

BASELINES_JSON = "baselines.json"
BASELINES_MD = "baselines.md"
METRICS = ("accuracy", "auc", "loss")
SEGMENTATION_METRICS = ("dice", "loss")
"""What a segmentation row compares (and each class's ``dice-<c>``): Dice ranks, as AUC does for classifiers."""


@dataclass(frozen=True)
class Compared:
    """What the baselines compare for one task.

    Attributes:
        metrics: The compared metrics; every site of a finished run reports the first.
        per_class: A regular expression of per-class metrics compared as well (``""``: none).
    """

    metrics: tuple[str, ...]
    per_class: str = ""

    def keeps(self, metric: str) -> bool:
        """Whether ``metric`` is compared."""
        return metric in self.metrics or bool(self.per_class and re.fullmatch(self.per_class, metric))


#: What the baselines compare for each task (``data.task``); a new task adds its own here.
COMPARED: dict[str, Compared] = {
    "classification": Compared(METRICS),
    "segmentation": Compared(SEGMENTATION_METRICS, per_class=r"dice-\d+"),
}


def compared(task: str) -> Compared:
    """What the baselines compare for ``data.task`` (raises ValueError naming the tasks they know)."""
    try:
        return COMPARED[task]
    except KeyError:
        raise ValueError(f"baselines compare no metrics for data.task={task!r}; they know {sorted(COMPARED)}") from None


def task_metrics(task: str) -> tuple[str, ...]:
    """The metrics the baselines compare for ``data.task`` (segmentation adds each class's ``dice-<c>``)."""
    return compared(task).metrics


@dataclass
class MethodResult:
    """One trained model evaluated everywhere.

    Attributes:
        method: ``pooled``, ``local:site-k`` or ``federated``.
        per_site: Site name -> ``{"accuracy", "auc", "loss", "n"}`` on that site's test split.
        overall: The same metrics on all sites' test data pooled.
        epochs: Passes over its training data (``None`` for the federated model).
    """

    method: str
    per_site: dict[str, dict[str, float]]
    overall: dict[str, float]
    epochs: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def mean_over_sites(self, metric: str) -> float:
        """Unweighted mean of ``metric`` over the sites (NaN-safe)."""
        values = [m[metric] for m in self.per_site.values() if not math.isnan(m.get(metric, math.nan))]
        return float(np.mean(values)) if values else math.nan

    def metric_names(self) -> list[str]:
        """The metrics its sites hold (``n`` left out), in their order."""
        return list(dict.fromkeys(m for values in self.per_site.values() for m in values if m != "n"))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "method": self.method,
            "epochs": self.epochs,
            "per_site": self.per_site,
            "overall": self.overall,
            "mean_over_sites": {m: self.mean_over_sites(m) for m in self.metric_names()},
            **self.extra,
        }


def load_all_sites(config: ExperimentConfig) -> list[SiteData]:
    """Every site's data exactly as the simulated sites hold it."""
    return [load_site_data(config.data, seed=config.seed, site_index=k) for k in range(config.data.num_sites)]


def _fresh_model(config: ExperimentConfig, site: SiteData) -> torch.nn.Module:
    """The federated run's initial model (same seed, same architecture)."""
    torch.manual_seed(config.seed)
    return build_model(config.model, in_channels=site.in_channels, num_classes=site.num_classes,
                       spatial_dims=site.spatial_dims, dp=config.privacy.enabled, task=config.data.task)


def matched_epochs(config: ExperimentConfig, *, site_sizes: list[int], site: int | None) -> float:
    """Passes over the training data that match the federated run's work.

    Args:
        config: The run's config.
        site_sizes: Training samples per site.
        site: A site index for its local-only model, ``None`` for the pooled model.
    """
    if config.baseline.epochs > 0:
        return float(config.baseline.epochs)
    rounds, train = config.server.rounds, config.train
    if train.local_steps == 0:
        return float(rounds * train.local_epochs)
    if site is not None:
        n = site_sizes[site]
        return rounds * train.local_steps * min(train.batch_size, n) / n
    samples = sum(rounds * train.local_steps * min(train.batch_size, n) for n in site_sizes)
    return samples / sum(site_sizes)


def _train_config(config: ExperimentConfig, *, epochs: float) -> TrainConfig:
    update: dict[str, Any] = {"local_epochs": epochs, "local_steps": 0}
    if config.baseline.optimizer != "same":
        update["optimizer"] = config.baseline.optimizer
    if config.baseline.lr > 0:
        update["lr"] = config.baseline.lr
    return config.train.model_copy(update=update)


def train_centralised(
    config: ExperimentConfig, *, dataset: Dataset, template: SiteData, epochs: float, seed: int
) -> tuple[torch.nn.Module, TrainResult]:
    """Train the run's initial model on ``dataset`` for ``epochs`` passes (one call, DP if enabled).

    Returns:
        The trained model and its :class:`TrainResult` (``epsilon`` spent under DP).
    """
    train = _train_config(config, epochs=epochs)
    model = _fresh_model(config, template)
    privacy = None
    if config.privacy.enabled:
        privacy = SitePrivacy(config=config.privacy, num_examples=len(dataset),  # type: ignore[arg-type]
                              batch_size=train.batch_size, local_epochs=epochs, planned_rounds=1)
    result = train_local(model=model, dataset=dataset, config=train, privacy=privacy, seed=seed,
                         device=select_device(train.device), task=config.data.task)
    logger.info("baseline: %d steps over %d samples, loss %.4f, epsilon %.3f", result.steps,
                len(dataset), result.loss, result.epsilon)  # type: ignore[arg-type]
    return model, result


def _evaluate(model: torch.nn.Module, dataset: Dataset, task: str) -> dict[str, float]:
    """The task's test metrics of ``model`` on ``dataset`` and its size ``n``."""
    if task == "classification":
        result = evaluate(model=model, dataset=dataset)
        return {**result.metrics(), "n": float(result.num_examples)}
    return {**get_task(task).evaluate(model=model, dataset=dataset), "n": float(len(dataset))}  # type: ignore[arg-type]


def evaluate_everywhere(model: torch.nn.Module, sites: list[SiteData], *, method: str,
                        epochs: float | None = None, task: str = "classification") -> MethodResult:
    """Evaluate ``model`` on each site's test split and on all of them pooled (``task``: ``data.task``)."""
    per_site = {site.name: _evaluate(model, site.test, task) for site in sites}
    overall = _evaluate(model, ConcatDataset([s.test for s in sites]), task)
    return MethodResult(method=method, per_site=per_site, overall=overall, epochs=epochs)


def federated_result(run_dir: Path, config: ExperimentConfig, sites: list[SiteData]) -> MethodResult | None:
    """The run's last checkpoint evaluated like the baselines (``None`` without a checkpoint)."""
    checkpoints = sorted((run_dir / "checkpoints").glob("round-*.pt"))
    if not checkpoints:
        return None
    state = torch.load(checkpoints[-1], map_location="cpu", weights_only=False)
    model = _fresh_model(config, sites[0])
    model.load_state_dict(state["weights"])
    result = evaluate_everywhere(model, sites, method="federated", task=config.data.task)
    result.extra["round"] = int(state["round"])
    return result


SITE_EVAL_JSON = "site_eval.json"


def final_site_metrics(run_dir: Path, config: ExperimentConfig | None = None) -> dict[str, dict[str, float]]:
    """Each site's test metrics of the run's final global model.

    Taken from the sites' own evaluation replies of the last round when every site
    sent one; otherwise (``strategy.fraction_evaluate=0``, a site that failed) the
    harness evaluates the final checkpoint on every site's test split itself (same
    function, same data: the same numbers) and caches them in ``site_eval.json``.
    """
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    reported = summary.get("final_site_evaluate") or {}
    if config is None:
        from federation.config import load_config

        config = load_config(run_dir / "config.yaml")
    names = [f"site-{k + 1}" for k in range(config.data.num_sites)]
    kept = compared(config.data.task)
    if all(name in reported and kept.metrics[0] in reported[name] for name in names):
        return {name: {m: _float(v) for m, v in reported[name].items() if kept.keeps(m)} for name in names}
    cache = run_dir / SITE_EVAL_JSON
    if cache.is_file():
        cached = json.loads(cache.read_text())
        return {site: {m: _float(v) for m, v in metrics.items()} for site, metrics in cached.items()}
    result = federated_result(run_dir, config, load_all_sites(config))
    per_site = result.per_site if result is not None else {}
    cache.write_text(json.dumps(_clean(per_site), indent=2))
    return per_site


def personalized_result(run_dir: Path, config: ExperimentConfig) -> MethodResult | None:
    """The sites' personalized models on their own test splits, as each site reported them (issue 21).

    ``FedBN`` (``train.local_norm``), ``federated + fine-tuned`` (``train.finetune_rounds``) or
    ``Ditto`` (``train.ditto_lambda``):
    these models never leave their site, so only their own-site ``personal-*`` metrics
    exist (no overall value). ``None`` unless every site reported them.
    """
    summary_path = Path(run_dir) / "summary.json"
    reported = (json.loads(summary_path.read_text()) if summary_path.is_file() else {}).get("final_site_evaluate") or {}
    names = [f"site-{k + 1}" for k in range(config.data.num_sites)]
    metrics = compared(config.data.task).metrics
    if not all(f"personal-{metrics[0]}" in (reported.get(n) or {}) for n in names):
        return None
    method = "federated + fine-tuned" if config.train.finetune_rounds else "FedBN"
    method = "Ditto" if config.train.ditto_lambda > 0 else method
    per_site = {n: {m: _float(reported[n].get(f"personal-{m}")) for m in metrics} for n in names}
    return MethodResult(method=method, per_site=per_site, overall={m: math.nan for m in metrics})


PERSONALIZED_METHODS = ("FedBN", "federated + fine-tuned", "Ditto")
"""Rows of :func:`personalized_result`."""


def _float(value: Any) -> float:
    """A metric as a float: NaN where a site sent none (None: undefined, e.g. AUC of a one-class test split)."""
    return float(value) if isinstance(value, (int, float)) else math.nan


def run_baselines(config: ExperimentConfig, *, run_dir: Path | None = None) -> list[MethodResult]:
    """Train and evaluate pooled and local-only baselines (and read the federated model).

    Args:
        config: The run's resolved config.
        run_dir: A finished run directory: its final checkpoint becomes the
            ``federated`` row, and ``baselines.json``/``baselines.md`` are written there.

    Returns:
        pooled, local:site-1..K, then federated (when ``run_dir`` has a checkpoint).
    """
    sites = load_all_sites(config)
    sizes = [len(s.train) for s in sites]
    results = []
    pooled_epochs = matched_epochs(config, site_sizes=sizes, site=None)
    pooled, trained = train_centralised(config, dataset=ConcatDataset([s.train for s in sites]),
                                        template=sites[0], epochs=pooled_epochs, seed=config.seed * 100_003 + 7)
    results.append(evaluate_everywhere(pooled, sites, method="pooled", epochs=pooled_epochs,
                                       task=config.data.task))
    results[-1].extra["epsilon"] = float(trained.epsilon)
    for k, site in enumerate(sites):
        epochs = matched_epochs(config, site_sizes=sizes, site=k)
        local, trained = train_centralised(config, dataset=site.train, template=site, epochs=epochs,
                                           seed=config.seed * 100_003 + 11 + k)
        results.append(evaluate_everywhere(local, sites, method=f"local:{site.name}", epochs=epochs,
                                           task=config.data.task))
        results[-1].extra["epsilon"] = float(trained.epsilon)
    if run_dir is not None:
        federated = federated_result(run_dir, config, sites)
        if federated is not None:
            results.append(federated)
        personalized = personalized_result(run_dir, config)
        if personalized is not None:
            results.append(personalized)
        write_baselines(run_dir, results, sites=[s.name for s in sites])
    return results


def local_own_site(results: list[MethodResult]) -> MethodResult | None:
    """The ``local-only`` summary: each site's own model on its own test split."""
    local = {r.method.split(":", 1)[1]: r for r in results if r.method.startswith("local:")}
    if not local:
        return None
    per_site = {name: r.per_site[name] for name, r in local.items()}
    return MethodResult(method="local-only (own site)", per_site=per_site, overall={})


def comparison_rows(results: list[MethodResult], *, metric: str) -> list[tuple[str, list[float], float, float]]:
    """``(method, per-site values, mean over sites, overall)`` rows: pooled, local own-site, federated."""
    rows = []
    own = local_own_site(results)
    for result in [r for r in results if r.method == "pooled"] + ([own] if own else []) + [
        r for r in results if r.method == "federated" or r.method in PERSONALIZED_METHODS
    ]:
        sites = list(result.per_site)
        rows.append((result.method, [result.per_site[s].get(metric, math.nan) for s in sites],
                     result.mean_over_sites(metric),
                     result.overall.get(metric, math.nan)))
    return rows


def _f(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def table_metrics(results: list[MethodResult]) -> list[str]:
    """The tables' metrics: ``accuracy``, ``auc``; for segmentation ``dice`` and each class's ``dice-<c>``."""
    held = {m for r in results for m in r.metric_names()}
    if "dice" not in held:
        return ["accuracy", "auc"]
    per_class = COMPARED["segmentation"].per_class
    return ["dice", *sorted((m for m in held if re.fullmatch(per_class, m)), key=lambda m: int(m[5:]))]


def ranking(results: list[MethodResult], *, metric: str) -> list[tuple[str, float]]:
    """``(method, mean over sites)`` of the compared rows, best first (NaN last)."""
    rows = [(method, mean) for method, _, mean, _ in comparison_rows(results, metric=metric)]
    return sorted(rows, key=lambda row: (math.isnan(row[1]), -row[1] if not math.isnan(row[1]) else 0.0))


def baselines_markdown(results: list[MethodResult], *, sites: list[str]) -> str:
    """Markdown tables: pooled vs local-only vs federated per site, then the full local-model matrix.

    Classification compares accuracy and AUC, segmentation Dice (mean over foreground
    classes, then each class); the local matrix and the ranking use the first of them.
    """
    lines = []
    metrics = table_metrics(results)
    head = metrics[0] if metrics[0] == "dice" else "accuracy"
    for metric in metrics:
        lines += [f"**Test {metric}** (each site's own test split; mean = unweighted over sites; "
                  "overall = all sites' test data pooled)", "",
                  "| method | " + " | ".join(sites) + " | mean | overall |",
                  "|---|" + "---:|" * (len(sites) + 2)]
        for method, values, mean, overall in comparison_rows(results, metric=metric):
            lines.append(f"| {method} | " + " | ".join(_f(v) for v in values) + f" | {_f(mean)} | {_f(overall)} |")
        lines.append("")
    if head == "dice":
        lines += ["Ranked by mean site Dice: " + ", ".join(f"{k}. {m} ({_f(v)})" for k, (m, v) in
                                                          enumerate(ranking(results, metric="dice"), 1)), ""]
    lines += [f"**Local-only models on every site** (rows: where the model was trained; test {head})", "",
              "| trained at | " + " | ".join(sites) + " | mean | overall |", "|---|" + "---:|" * (len(sites) + 2)]
    for r in results:
        if r.method.startswith("local:"):
            lines.append(f"| {r.method[6:]} | " + " | ".join(_f(r.per_site[s].get(head, math.nan)) for s in sites)
                         + f" | {_f(r.mean_over_sites(head))} | {_f(r.overall.get(head, math.nan))} |")
    epochs = {r.method: r.epochs for r in results if r.epochs is not None}
    lines += ["", "Passes over the training data: " + ", ".join(f"{m} {e:.2f}" for m, e in epochs.items()), ""]
    return "\n".join(lines)


def write_baselines(out_dir: Path, results: list[MethodResult], *, sites: list[str]) -> tuple[Path, Path]:
    """Write ``baselines.json`` and ``baselines.md`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"sites": sites, "results": [r.as_dict() for r in results]}
    json_path = out_dir / BASELINES_JSON
    json_path.write_text(json.dumps(_clean(payload), indent=2))
    md_path = out_dir / BASELINES_MD
    md_path.write_text(baselines_markdown(results, sites=sites))
    return json_path, md_path


def read_baselines(run_dir: Path) -> list[MethodResult] | None:
    """Read ``baselines.json`` back (``None`` if the run has none)."""
    path = run_dir / BASELINES_JSON
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    out = []
    for row in payload["results"]:
        per_site = {s: {k: (math.nan if v is None else v) for k, v in m.items()} for s, m in row["per_site"].items()}
        overall = {k: (math.nan if v is None else v) for k, v in row["overall"].items()}
        out.append(MethodResult(method=row["method"], per_site=per_site, overall=overall, epochs=row.get("epochs")))
    return out


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


__all__ = [
    "BASELINES_JSON",
    "SITE_EVAL_JSON",
    "final_site_metrics",
    "BASELINES_MD",
    "MethodResult",
    "baselines_markdown",
    "comparison_rows",
    "evaluate_everywhere",
    "federated_result",
    "load_all_sites",
    "matched_epochs",
    "read_baselines",
    "run_baselines",
    "train_centralised",
    "write_baselines",
]
