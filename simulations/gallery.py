"""Simulation-only explanation gallery: true/false positives/negatives of every simulated site.

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


def write_gallery(
    run_dir: str | os.PathLike[str], *, config: ExperimentConfig | None = None, method: str = DEFAULT_ATTRIBUTION
) -> list[Path]:
    """Draw one explanation figure per simulated site into ``clinical/gallery/`` and refresh the report.

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
