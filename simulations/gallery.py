"""Simulation-only galleries: explanations of every simulated site's TP/FP/TN/FN, or its contours.

A classification run gets explanation overlays of each site's most confident true/false
positives/negatives; a segmentation run predicted (red, dashed) vs true (green) contours
of a few test cases per site (:func:`write_contour_gallery`; volumes: the slice with
the most true foreground).

SIMULATION ONLY. The harness runs every simulated hospital on this machine, so it
can read each site's test images and draw explanation overlays of them into the run
directory. Nothing here travels in a Flower Message, and a real deployment has
no equivalent: there, images never leave a site, and a site that wants overlays
runs ``medfed explain`` on its own machine.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from federation.config import ExperimentConfig, load_config
from federation.data import load_site_data
from federation.inference import Overlay, load_run_model, save_overlays
from federation.inference.attribution import DEFAULT_ATTRIBUTION, make_attributor
from federation.metrics.clinical import ClinicalSettings, binary_task
from federation.training import evaluate
from server.clinical_report import CLINICAL_DIR, GALLERY_DIR, GALLERY_INDEX, write_clinical_report
from server.run_dir import CONFIG_FILE

logger = logging.getLogger(__name__)

KINDS = ("TP", "FP", "TN", "FN")


def pick_examples(labels01: np.ndarray, p_positive: np.ndarray, *, threshold: float) -> dict[str, int]:
    """Index of the most confident example of each kind (TP/FP: highest P, TN/FN: lowest P); absent kinds omitted."""
    y = np.asarray(labels01).astype(bool)
    p = np.asarray(p_positive, dtype=np.float64)
    pred = p >= threshold
    masks = {"TP": y & pred, "FP": ~y & pred, "TN": ~y & ~pred, "FN": y & ~pred}
    chosen: dict[str, int] = {}
    for kind in KINDS:
        idx = np.flatnonzero(masks[kind])
        if idx.size:
            order = p[idx] if kind in ("TN", "FN") else -p[idx]
            chosen[kind] = int(idx[np.argsort(order, kind="stable")[0]])
    return chosen


def write_gallery(run_dir: str | os.PathLike[str], *, config: ExperimentConfig | None = None) -> list[Path]:
    """Draw the run's task's gallery (:data:`GALLERIES`) into ``clinical/gallery/`` and refresh the report.

    Returns:
        The PNGs written (none for a task without a gallery).
    """
    run = Path(run_dir)
    config = config or load_config(run / CONFIG_FILE)
    gallery = gallery_for(config.data.task)
    return [] if gallery is None else gallery.write(run, config=config)


def gallery_for(task: str) -> Gallery | None:
    """The simulation gallery of ``data.task`` (:data:`GALLERIES`), or None (logged) for a task without one."""
    gallery = GALLERIES.get(task)
    if gallery is None:
        logger.info("no simulation gallery for data.task=%s (galleries: %s)", task, sorted(GALLERIES))
    return gallery


def write_attribution_gallery(
    run_dir: str | os.PathLike[str], *, config: ExperimentConfig | None = None, method: str = DEFAULT_ATTRIBUTION
) -> list[Path]:
    """A classifier's gallery: one explanation figure per simulated site, then the report is refreshed.

    Needs the run's ``export/`` (written when the run finished). The map shows the
    evidence for the positive class (``clinical.positive_class``) by the attribution
    ``method`` (:func:`federation.inference.attribution.available_attributions`);
    each example is drawn as the image beside its overlay, with a colour bar.

    Returns:
        The PNGs written (one per site that has test images).
    """
    run = Path(run_dir)
    config = config or load_config(run / CONFIG_FILE)
    settings = ClinicalSettings.from_config(config.clinical)
    model, meta = load_run_model(run)
    if int(meta["preprocessing"].get("spatial_dims", 2)) != 2:
        logger.info("no Grad-CAM gallery: the model does not take 2-D images")
        return []
    explainer = make_attributor(method, model)
    positive = (meta.get("label_names") or [])[settings.positive_class:settings.positive_class + 1] or ["positive"]
    out = run / CLINICAL_DIR / GALLERY_DIR
    entries: list[dict[str, Any]] = []
    written: list[Path] = []
    for index in range(config.data.num_sites):
        data = load_site_data(config.data, seed=config.seed, site_index=index, num_sites=config.data.num_sites)
        images, labels = data.test.tensors
        result = evaluate(model=model, dataset=data.test)
        y, p = binary_task(result.labels, result.probs, positive_class=settings.positive_class)
        chosen = pick_examples(y, p, threshold=settings.threshold)
        if not chosen:
            continue
        batch = images[list(chosen.values())].numpy()
        cams = explainer(batch, class_index=settings.positive_class)
        panels = [Overlay(image=img, cam=cam, title=f"{kind}: P({positive[0]}) = {p[i]:.3f}")
                  for (kind, i), img, cam in zip(chosen.items(), batch, cams)]
        path = save_overlays(panels, out / f"{data.name}.png", suptitle=f"{data.name} (simulation only)",
                             label=f"{method} for '{positive[0]}'")
        written.append(path)
        entries.append({"site": data.name, "file": path.name, "kinds": list(chosen),
                        "caption": f"most confident {', '.join(chosen)} of the site's test split; {method} map for "
                                   f"'{positive[0]}' at threshold {settings.threshold}"})
    if entries:
        (out / GALLERY_INDEX).write_text(json.dumps(entries, indent=2))
        write_clinical_report(run, config=config, redraw_plots=False)  # same records: plots as drawn
    logger.info("%s gallery: %d site(s) in %s", method, len(written), out)
    return written


CONTOUR_CASES = 3
"""Test cases drawn per site in a segmentation run's gallery."""


def _slice(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2-D views ``(H, W)``: the image itself, or a volume's slice (first axis) with the most true foreground."""
    if truth.ndim == 2:
        return image[0], truth, pred
    k = int(np.argmax((truth > 0).reshape(truth.shape[0], -1).sum(axis=1)))
    return image[0, k], truth[k], pred[k]


def _case_dice(truth: np.ndarray, pred: np.ndarray) -> float:
    """Mean Dice over the foreground classes of the case's ground truth (NaN without foreground)."""
    scores = [2 * np.sum((truth == c) & (pred == c)) / (np.sum(truth == c) + np.sum(pred == c))
              for c in np.unique(truth) if c > 0]
    return float(np.mean(scores)) if scores else float("nan")


def _draw_contours(panels: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.3), squeeze=False)
    for ax, (image, truth, pred, caption) in zip(axes[0], panels):
        ax.imshow(image, cmap="gray")
        for c in np.unique(np.concatenate([np.unique(truth), np.unique(pred)])):
            if c == 0:
                continue
            if np.any(truth == c):
                ax.contour(truth == c, levels=[0.5], colors="lime", linewidths=1.0)
            if np.any(pred == c):
                ax.contour(pred == c, levels=[0.5], colors="red", linewidths=1.0, linestyles="dashed")
        ax.set_title(caption, fontsize=8)
        ax.axis("off")
    handles = [Line2D([], [], color="lime", label="true"),
               Line2D([], [], color="red", linestyle="--", label="predicted")]
    fig.legend(handles=handles, loc="lower center", ncols=2, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_contour_gallery(run_dir: str | os.PathLike[str], *, config: ExperimentConfig | None = None) -> list[Path]:
    """Predicted vs true contours of the first :data:`CONTOUR_CASES` test cases with foreground, per simulated site.

    SIMULATION ONLY (module docstring). Needs the run's ``export/``. Writes
    ``clinical/gallery/<site>.png`` and its ``index.json``, then rewrites the clinical report.

    Returns:
        The PNGs written (one per site with a foreground test case).
    """
    import torch

    run = Path(run_dir)
    config = config or load_config(run / CONFIG_FILE)
    model, _ = load_run_model(run)
    out = run / CLINICAL_DIR / GALLERY_DIR
    entries: list[dict[str, Any]] = []
    written: list[Path] = []
    for index in range(config.data.num_sites):
        data = load_site_data(config.data, seed=config.seed, site_index=index, num_sites=config.data.num_sites)
        images, masks = data.test.tensors
        chosen = [i for i in range(len(masks)) if bool(masks[i].any())][:CONTOUR_CASES]
        if not chosen:
            continue
        with torch.no_grad():
            pred = model(images[chosen]).argmax(dim=1).numpy()
        panels = []
        for i, p in zip(chosen, pred):
            truth = masks[i].numpy()
            panels.append((*_slice(images[i].numpy(), truth, p), f"test case {i}: Dice {_case_dice(truth, p):.3f}"))
        written.append(_draw_contours(panels, out / f"{data.name}.png", f"{data.name} (simulation only)"))
        entries.append({"site": data.name, "file": written[-1].name, "cases": chosen,
                        "caption": f"first {len(chosen)} test case(s) with foreground: true (green) vs predicted "
                                   "(red, dashed) contours" + ("; the slice with the most true foreground"
                                                                if truth.ndim == 3 else "")})
    if entries:
        (out / GALLERY_INDEX).write_text(json.dumps(entries, indent=2))
        write_clinical_report(run, config=config, redraw_plots=False)
    logger.info("contour gallery: %d site(s) in %s", len(written), out)
    return written


@dataclass(frozen=True)
class Gallery:
    """A task's simulation gallery: the name ``outputs.json`` records it under, and its writer."""

    output: str
    write: Callable[..., list[Path]]


#: Each task's gallery (``data.task`` -> :class:`Gallery`); a new task adds its own here.
GALLERIES: dict[str, Gallery] = {
    "classification": Gallery("Grad-CAM gallery", write_attribution_gallery),
    "segmentation": Gallery("contour gallery", write_contour_gallery),
}
