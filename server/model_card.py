"""End-of-run outputs: the exported global model, the clinical report and the model card.

:func:`finish_run` is called by :func:`server.app.run_federation` when a run ends
(``medfed simulate`` and ``flwr run`` alike). It writes:

* ``export/`` - ``model_state.pt``, ``model.pt2`` (torch.export, softmax out), ``model.json``;
* ``clinical/`` - ``report.md``, ``fairness.json`` and plots (:mod:`server.clinical_report`);
* ``model_card.md`` and ``model_card.json``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federation.config import ExperimentConfig, load_config, to_yaml
from federation.data import dataset_info, load_dataset
from federation.inference.export import EXPORT_DIR, ExportedModel, export_model
from federation.inference.preprocess import Preprocessing
from federation.metrics.clinical import ClinicalSettings
from federation.models import build_model, count_parameters
from server.clinical_report import (
    CLINICAL_DIR,
    FAIRNESS_FILE,
    REPORT_FILE,
    fmt_interval,
    group_labels,
    na,
    write_clinical_report,
)
from server.fairness import NOT_REPORTED, latest_site_rows
from server.run_dir import CONFIG_FILE, PRIVACY_FILE, SUMMARY_FILE, RunDirectory, _clean, read_jsonl
from server.run_outputs import RunOutputs

logger = logging.getLogger(__name__)

CARD_MD = "model_card.md"
CARD_JSON = "model_card.json"
PACKAGES = ("medfed", "torch", "monai", "opacus", "flwr", "numpy", "scikit-learn", "scipy", "pydicom", "pydantic")
INTENDED_USE = (
    "Research on federated learning for medical image classification: comparing strategies, privacy "
    "settings and per-site/subgroup behaviour on the data named below."
)
INTENDED_USE_SEGMENTATION = (
    "Research on federated learning for medical image segmentation: comparing strategies, privacy settings "
    "and per-site/per-structure behaviour (Dice, HD95, volume error) on the data named below."
)
NOT_FOR_CLINICAL_USE = (
    "NOT FOR CLINICAL USE. This model is not a medical device, has not been clinically validated and must "
    "not be used to diagnose, treat or triage patients."
)


def _dataset_facts(config: ExperimentConfig) -> dict[str, Any]:
    """Class names and checksum of the dataset, when this machine can load it (the coordinator may not)."""
    try:
        splits = load_dataset(config.data, seed=config.seed)
    except Exception as err:  # noqa: BLE001 - a coordinator without the data still writes its card
        logger.info("dataset %s not readable here (%s); the card lists generic class names", config.data.dataset, err)
        return {"label_names": None, "md5": None, "available": False}
    return {"label_names": list(splits.label_names), "md5": splits.md5, "available": True,
            "pooled_train": int(len(splits.train_labels)), "pooled_test": int(len(splits.test_labels))}


def _volume_shape(config: ExperimentConfig, spatial_dims: int) -> tuple[int, ...]:
    """The NIfTI volume shape a 3-D segmentation model takes (``data.volume_shape``), else ``()``."""
    if config.data.task != "segmentation" or spatial_dims != 3:
        return ()
    from federation.data.nifti import volume_shape  # noqa: PLC0415

    return tuple(volume_shape(config.data))


def export_global_model(run_dir: Path, config: ExperimentConfig) -> ExportedModel | None:
    """Export the newest checkpoint's weights to ``<run>/export`` (None when no round finished)."""
    checkpoint = RunDirectory(run_dir).load_checkpoint()
    if checkpoint is None:
        logger.warning("run %s has no checkpoint; nothing to export", run_dir)
        return None
    info = dataset_info(config.data, seed=config.seed)
    spatial_dims = getattr(info, "spatial_dims", 2)
    model = build_model(config.model, in_channels=info.in_channels, num_classes=info.num_classes,
                        spatial_dims=spatial_dims, dp=config.privacy.enabled)
    model.load_state_dict(checkpoint.weights)
    facts = _dataset_facts(config)
    names = facts["label_names"] or [f"class-{k}" for k in range(info.num_classes)]
    prep = Preprocessing(image_size=config.data.image_size, in_channels=info.in_channels,
                         dicom_frames=config.data.dicom_frames, dicom_normalize=config.data.dicom_normalize,
                         spatial_dims=spatial_dims, volume_shape=_volume_shape(config, spatial_dims))
    meta = {"run": run_dir.name, "round": checkpoint.round, "task": config.data.task, "dataset": config.data.dataset,
            "num_classes": info.num_classes, "label_names": names,
            "positive_class": config.clinical.positive_class, "threshold": config.clinical.threshold,
            "model": {**config.model.model_dump(), "parameters": count_parameters(model)}}
    return export_model(model=model, preprocessing=prep, out_dir=run_dir / EXPORT_DIR, metadata=meta)


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=40"],
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _preprocessing_text(config: ExperimentConfig, spatial_dims: int) -> str:
    d = config.data
    if spatial_dims == 0:
        return f"{d.dataset}: tabular feature vectors, as the dataset loader prepares them (see its module)."
    if spatial_dims == 3:
        return f"{d.dataset}: volumes scaled to [0, 1] at {d.image_size} voxels per side."
    if d.dataset == "dicom":
        return (f"DICOM: Modality LUT (rescale), VOI LUT/window, MONOCHROME1 inverted, scaled to [0, 1] "
                f"(dicom_normalize={d.dicom_normalize}), frames={d.dicom_frames}, channels matched, resized to "
                f"{d.image_size}x{d.image_size} (bilinear, antialiased).")
    return (f"{d.dataset}: pixel values scaled to [0, 1] (uint8 / 255), resized to {d.image_size}x{d.image_size} "
            "(bilinear, antialiased).")


def build_model_card(run_dir: Path, config: ExperimentConfig) -> dict[str, Any]:
    """Collect the model card's facts from the run directory (see the module docstring)."""
    meta_file = run_dir / EXPORT_DIR / "model.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    summary = json.loads((run_dir / SUMMARY_FILE).read_text()) if (run_dir / SUMMARY_FILE).is_file() else {}
    fairness_file = run_dir / CLINICAL_DIR / FAIRNESS_FILE
    fairness = json.loads(fairness_file.read_text()) if fairness_file.is_file() else {}
    train, evaluate = latest_site_rows(run_dir, "train"), latest_site_rows(run_dir, "evaluate")
    privacy: dict[str, dict[str, Any]] = {}
    for row in read_jsonl(run_dir / PRIVACY_FILE):
        privacy[row["site"]] = {"epsilon": row.get("epsilon"), "delta": row.get("delta"), "round": row.get("round")}
    names = sorted(set(train) | set(evaluate))
    facts = _dataset_facts(config)
    labels = meta.get("label_names") or facts["label_names"] or []
    config_text = to_yaml(config)
    card_task = task_card(config.data.task)
    segmentation = card_task.summary(evaluate, list(labels))
    return {
        "model_card_version": 1,
        "run": run_dir.name,
        "intended_use": card_task.intended_use,
        "notice": NOT_FOR_CLINICAL_USE,
        "task": {"dataset": config.data.dataset, "kind": config.data.task, "labels": labels,
                 "num_classes": meta.get("num_classes"),
                 "positive_class": config.clinical.positive_class, "threshold": config.clinical.threshold},
        "architecture": {**config.model.model_dump(), "parameters": (meta.get("model") or {}).get("parameters"),
                         "input": (meta.get("input") or {}).get("shape"), "output": meta.get("output")},
        "preprocessing": {
            "description": _preprocessing_text(config, int((meta.get("preprocessing") or {}).get("spatial_dims", 2))),
            **(meta.get("preprocessing") or {}),
        },
        "export": {k: meta.get(k) for k in ("program", "state_dict", "load", "sha256", "round")},
        "sites": [{"name": s, "train_examples": (train.get(s) or {}).get("metrics", {}).get("num-examples"),
                   "test_examples": (evaluate.get(s) or {}).get("metrics", {}).get("num-examples")} for s in names],
        "rounds": {"planned": config.server.rounds, "completed": summary.get("rounds_completed"),
                   "aggregated": summary.get("rounds_aggregated")},
        "strategy": config.strategy.model_dump(),
        "privacy": {**config.privacy.model_dump(), "final_per_site": privacy},
        "metrics": {"global_final": summary.get("final_global"), "per_site": fairness.get("sites", {}),
                    "across_sites": fairness.get("across_sites"), "pooled": fairness.get("pooled"),
                    "subgroups": fairness.get("subgroups"), "subgroup_gaps": fairness.get("subgroup_gaps"),
                    "clinical_settings": fairness.get("settings"), "segmentation": segmentation},
        "dataset_checksums": {"md5": facts["md5"], "note": "MD5 of the dataset file (MedMNIST); none for generated "
                              "(synthetic, seeded) or hospital (DICOM) data, or when the coordinator holds no data"},
        "software": {"versions": _versions(), "git_commit": _git_commit()},
        "config": config.model_dump(),
        "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
        "init": _init_facts(run_dir),
    }


def _init_facts(run_dir: Path) -> dict[str, Any] | None:
    """Where round 0's weights came from (``init.json``, written when ``model.init`` loaded them), or None."""
    path = run_dir / "init.json"  # server.app.INIT_FILE (server.app imports this module)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    keys = ("source", "path", "origin", "sha256", "counts", "mismatched")
    return {k: data.get(k) for k in keys}


_ci = fmt_interval  # "n/a (<reason>)" where a metric cannot exist, as in the clinical report


def _num(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _count(x: Any) -> str:
    return na(NOT_REPORTED) if x is None or (isinstance(x, float) and not math.isfinite(x)) else str(int(x))


def _dp_line(p: dict[str, Any]) -> str:
    if not p["enabled"]:
        return "Differential privacy: off."
    return (f"Differential privacy: DP-SGD (Opacus), accountant {p['accountant']}, target ε = {p['target_epsilon']}, "
            f"δ = {p['target_delta']}, clipping norm {p['max_grad_norm']}, noise multiplier "
            f"{p['noise_multiplier'] or 'set from the target'}.")


def render_model_card(card: dict[str, Any], *, config_yaml: str, group_names: dict[str, str]) -> str:
    """The Markdown model card."""
    t, a, p, r = card["task"], card["architecture"], card["privacy"], card["rounds"]
    card_task = task_card(t.get("kind") or "classification")
    classes = ", ".join(f"{i} = {n}" for i, n in enumerate(t["labels"])) or "–"
    sites = ", ".join(f"{s['name']} ({_count(s['train_examples'])} train / {_count(s['test_examples'])} test)"
                      for s in card["sites"])
    params = ", ".join(f"{k}={v}" for k, v in card["strategy"].items() if k != "name")
    lines = [
        f"# Model card — medfed run `{card['run']}`", "", f"> **{card['notice']}**", "",
        "## Intended use", "", card["intended_use"], "",
        "## Task and labels", "",
        f"Dataset `{t['dataset']}`; classes: {classes}. " + card_task.task_line(t), "",
        "## Model and preprocessing", "",
        f"`{a['name']}` (width {a['width']}, {a['norm']} norm, dropout {a['dropout']}), {a['parameters']} "
        f"parameters; input {a['input']}; output: {a['output']}.", "",
        card["preprocessing"]["description"], "",
        f"Load without medfed: `{card['export'].get('load')}` (files in `export/`, SHA-256 in model_card.json).", "",
        "## Training", "",
        f"Sites (names and sample counts only): {sites or '–'}.", "",
        f"Rounds: {r['completed']} completed of {r['planned']} planned ({r['aggregated']} aggregated). "
        f"Strategy `{card['strategy']['name']}` ({params}).", "",
        _dp_line(p),
    ]
    init = card.get("init")
    if init:
        counts = init.get("counts") or {}
        lines += ["", f"Initial weights (`model.init`): {init['origin']} `{init['source']}`, SHA-256 {init['sha256']}; "
                  f"{counts.get('loaded', 0)} tensors loaded, {counts.get('mismatched', 0)} re-initialised "
                  f"(shape differs), {counts.get('missing', 0)} not in the file."]
    if p["final_per_site"]:
        lines += ["", "| site | final ε | δ | after round |", "|---|---|---|---|"]
        lines += [f"| {s} | {_num(v['epsilon'])} | {v['delta']} | {v['round']} |"
                  for s, v in sorted(p["final_per_site"].items())]
    return "\n".join(lines + card_task.evaluation(card, config_yaml, group_names))


def _classification_evaluation(card: dict[str, Any], config_yaml: str, group_names: dict[str, str]) -> list[str]:
    """The card's evaluation and provenance sections of a classifier: per-site rates with intervals, subgroups."""
    m = card["metrics"]
    versions = ", ".join(f"{k} {v}" for k, v in card["software"]["versions"].items() if k != "medfed")
    lines = ["", "## Evaluation (site test splits; aggregates only)", "",
             "| site | n | AUC | sensitivity | specificity | accuracy | ECE | Brier |",
             "|---|---|---|---|---|---|---|---|"]
    if not m["per_site"]:
        lines.append("| n/a (no site sent an evaluation) | | | | | | | |")
    for site, v in (m["per_site"] or {}).items():
        rates = v["rates"]
        lines.append(f"| {site} | {_count(v['n'])} | {_ci(rates['roc-auc'])} | {_ci(rates['sensitivity'])} | "
                     f"{_ci(rates['specificity'])} | {_ci(rates['op-accuracy'])} | {_num(v['ece'])} | "
                     f"{_num(v['brier'])} |")
    if m.get("subgroups"):
        lines += ["", "| subgroup (pooled) | sites | n | sensitivity | specificity | accuracy |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {group_names.get(g, g)} | {s['sites']} | {s['n']} | {_ci(s['sensitivity'])} | "
                  f"{_ci(s['specificity'])} | {_ci(s['op-accuracy'])} |" for g, s in m["subgroups"].items()]
    lines += [
        "", f"Full report with intervals, calibration and plots: `{CLINICAL_DIR}/{REPORT_FILE}`. Final global "
        f"metrics (central evaluation on the pooled test split): "
        f"{', '.join(f'{k} {_num(v)}' for k, v in (m['global_final'] or {}).items()) or na('no central evaluation')}.",
        "",
        "## Provenance", "",
        f"Dataset MD5: {card['dataset_checksums']['md5'] or '–'}. medfed "
        f"{card['software']['versions'].get('medfed')}, git {card['software']['git_commit'] or 'unknown'}; {versions}.",
        "", f"Exact config (SHA-256 {card['config_sha256']}):", "", "```yaml", config_yaml.rstrip(), "```", "",
    ]
    return lines


def _segmentation_evaluation(card: dict[str, Any], config_yaml: str, group_names: dict[str, str]) -> list[str]:
    """The card's evaluation and provenance sections of a segmentation run."""
    del group_names  # segmentation reports no subgroups
    from server.segmentation_report import card_lines  # noqa: PLC0415

    final = card["metrics"]["global_final"] or {}
    shown = ", ".join(f"{k} {_num(v)}" for k, v in final.items() if k == "loss" or k.startswith("dice"))
    return ["", "## Evaluation (site test cases; aggregates only)", "", *card_lines(card["metrics"]["segmentation"]),
            "", f"Full report with HD95 and volume error per structure: `{CLINICAL_DIR}/{REPORT_FILE}`. Final global "
            f"metrics (central evaluation on the pooled test split): {shown or na('no central evaluation')}.", "",
            "## Provenance", "", f"medfed {card['software']['versions'].get('medfed')}, git "
            f"{card['software']['git_commit'] or 'unknown'}.", "",
            f"Exact config (SHA-256 {card['config_sha256']}):", "", "```yaml", config_yaml.rstrip(), "```", ""]



def _segmentation_summary(evaluate: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    """Per-structure aggregates as the sites sent them (:func:`server.segmentation_report.segmentation_summary`)."""
    from server.segmentation_report import segmentation_summary  # noqa: PLC0415

    return segmentation_summary(evaluate, label_names=labels)


@dataclass(frozen=True)
class TaskCard:
    """What a model card says that depends on the run's task (``data.task``).

    Attributes:
        intended_use: The card's intended-use paragraph.
        task_line: The "Task and labels" sentence after the class names, from the card's ``task`` facts.
        summary: The task's own aggregates from the sites' latest evaluate rows and the label names,
            kept under ``metrics.segmentation`` (None: the classifier's, from the clinical report's fairness.json).
        evaluation: The evaluation and provenance sections, from the card, the config's YAML and the subgroup names.
    """

    intended_use: str
    task_line: Callable[[dict[str, Any]], str]
    summary: Callable[[dict[str, Any], list[str]], dict[str, Any] | None]
    evaluation: Callable[[dict[str, Any], str, dict[str, str]], list[str]]


#: Each task's model card (``data.task`` -> :class:`TaskCard`); a new task adds its own here.
TASK_CARDS: dict[str, TaskCard] = {
    "classification": TaskCard(
        intended_use=INTENDED_USE,
        task_line=lambda t: f"Positive class {t['positive_class']}, operating point P(positive) ≥ {t['threshold']}.",
        summary=lambda evaluate, labels: None,
        evaluation=_classification_evaluation,
    ),
    "segmentation": TaskCard(
        intended_use=INTENDED_USE_SEGMENTATION,
        task_line=lambda t: "Segmentation: one class per pixel/voxel (arg-max of the probabilities).",
        summary=_segmentation_summary,
        evaluation=_segmentation_evaluation,
    ),
}


def task_card(task: str) -> TaskCard:
    """The model card of ``data.task`` (raises ValueError naming the tasks that have one)."""
    try:
        return TASK_CARDS[task]
    except KeyError:
        raise ValueError(f"no model card for data.task={task!r}; the tasks with one are {sorted(TASK_CARDS)}") from None

def write_model_card(run_dir: Path, config: ExperimentConfig) -> tuple[Path, Path]:
    """Write ``model_card.json`` and ``model_card.md`` into the run directory."""
    card = build_model_card(run_dir, config)
    json_path, md_path = run_dir / CARD_JSON, run_dir / CARD_MD
    for path, text in ((json_path, json.dumps(_clean(card), indent=2, allow_nan=False)),
                       (md_path, render_model_card(_clean(card), config_yaml=to_yaml(config),
                                                   group_names=group_labels(ClinicalSettings.from_config(config.clinical))))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return md_path, json_path


#: Names under which :func:`finish_run` records its outputs in ``outputs.json``.
EXPORT_OUTPUT, REPORT_OUTPUT, CARD_OUTPUT = "exported model", "clinical report", "model card"


def finish_run(run_dir: str | os.PathLike[str], config: ExperimentConfig | None = None) -> RunOutputs:
    """Export the global model, write the clinical report and the model card of a finished run.

    Each output is written on its own (one that fails does not stop the others) and
    recorded in the run's ``outputs.json`` with the files written or the reason it
    failed (:class:`server.run_outputs.RunOutputs`).

    Args:
        run_dir: The run directory.
        config: The run's config (default: its ``config.yaml``).

    Returns:
        The run's output record, with these three entries updated.
    """
    run = Path(run_dir)
    config = config or load_config(run / CONFIG_FILE)
    outputs = RunOutputs.load(run)

    def export() -> Path | None:
        exported = export_global_model(run, config)
        return None if exported is None else exported.directory

    outputs.produce(EXPORT_OUTPUT, export)  # segmentation too: `medfed predict` writes its masks
    outputs.produce(REPORT_OUTPUT, lambda: write_clinical_report(run, config=config))
    outputs.produce(CARD_OUTPUT, lambda: list(write_model_card(run, config)))
    return outputs
