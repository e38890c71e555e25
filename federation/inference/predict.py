"""Probabilities (and optional explanation overlays) for preprocessed inputs."""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from federation.inference.attribution import DEFAULT_ATTRIBUTION, make_attributor
from federation.inference.overlays import Overlay, save_overlays
from federation.inference.preprocess import InputImage


@dataclass(frozen=True, eq=False)
class Prediction:
    """The model's output for one input.

    Attributes:
        name: The input's name (relative path, ``#frame``/``#index`` when several per file).
        probs: Class probabilities ``(K,)``.
        predicted_class: Arg-max class.
        p_positive: P(positive class).
        positive: ``p_positive >= threshold`` (the run's operating point).
    """

    name: str
    probs: np.ndarray
    predicted_class: int
    p_positive: float
    positive: bool


@torch.no_grad()
def predict_probabilities(module: nn.Module, images: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """Run ``module`` (probabilities out, e.g. the exported program) over ``(N, C, H, W)`` images."""
    out = [
        module(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size], dtype=np.float32))).cpu().numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, 0))


def predict_inputs(
    module: nn.Module, inputs: Sequence[InputImage], *, meta: dict[str, Any], batch_size: int = 64
) -> list[Prediction]:
    """Predict every input with the exported ``module`` and the run's operating point from ``meta``."""
    if not inputs:
        return []
    probs = predict_probabilities(module, np.stack([item.image for item in inputs]), batch_size=batch_size)
    positive_class, threshold = int(meta.get("positive_class", 1)), float(meta.get("threshold", 0.5))
    return [
        Prediction(
            name=item.name,
            probs=row,
            predicted_class=int(np.argmax(row)),
            p_positive=float(row[positive_class]),
            positive=bool(row[positive_class] >= threshold),
        )
        for item, row in zip(inputs, probs)
    ]


def _label(meta: dict[str, Any], k: int) -> str:
    names = meta.get("label_names") or []
    return str(names[k]) if k < len(names) else f"class-{k}"


def write_predictions_csv(
    predictions: Sequence[Prediction],
    path: str | os.PathLike[str],
    *,
    meta: dict[str, Any],
    overlays: dict[str, Path] | None = None,
) -> Path:
    """Write one row per input: ``input, p_<label>..., p_positive, positive, predicted_class, predicted_label[, gradcam]``."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    k = int(meta.get("num_classes", len(predictions[0].probs) if predictions else 0))
    header = ["input", *[f"p_{_label(meta, i)}" for i in range(k)], "p_positive", "positive",
              "predicted_class", "predicted_label"]
    if overlays is not None:
        header.append("gradcam")
    with open(out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for pred in predictions:
            row = [pred.name, *[f"{p:.6f}" for p in pred.probs], f"{pred.p_positive:.6f}", int(pred.positive),
                   pred.predicted_class, _label(meta, pred.predicted_class)]
            if overlays is not None:
                row.append(str(overlays.get(pred.name, "")))
            writer.writerow(row)
    return out


def overlay_name(name: str) -> str:
    """A safe PNG file name for an input name (``a/b.dcm#2`` -> ``a__b.dcm-2.png``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name.replace("/", "__").replace("#", "-")) + ".png"


def explain_inputs(
    model: nn.Module,
    inputs: Sequence[InputImage],
    predictions: Sequence[Prediction],
    out_dir: str | os.PathLike[str],
    *,
    meta: dict[str, Any],
    class_index: int | None = None,
    target_layer: str | None = None,
    method: str = DEFAULT_ATTRIBUTION,
) -> dict[str, Path]:
    """Write one explanation PNG per input (image beside overlay), captioned with P(positive) and the class.

    Args:
        model: The medfed network (logits out), e.g. from :func:`federation.inference.load_run_model`.
        inputs: Preprocessed inputs.
        predictions: Their predictions (same order).
        out_dir: Folder for the PNGs.
        meta: The export's ``model.json`` (class names, positive class).
        class_index: Class whose evidence is mapped; ``None``: each input's predicted class.
        target_layer: Grad-CAM layer (default: the last convolution); only with ``method="gradcam"``.
        method: Attribution method (:func:`federation.inference.attribution.available_attributions`).

    Returns:
        Input name -> PNG path.

    Raises:
        ValueError: Unknown method, or ``target_layer`` with a method other than ``gradcam``.
    """
    if target_layer is not None and method != "gradcam":
        raise ValueError(f"a target layer applies to --method gradcam only, not {method!r}")
    options = {"target_layer": target_layer} if target_layer is not None else {}
    explainer = make_attributor(method, model, **options)
    out = Path(out_dir)
    written: dict[str, Path] = {}
    positive = _label(meta, int(meta.get("positive_class", 1)))
    for item, pred in zip(inputs, predictions):
        target = pred.predicted_class if class_index is None else class_index
        cam = explainer(item.image[None], class_index=target)[0]
        title = f"{item.name}\nP({positive}) = {pred.p_positive:.3f} · {method}: {_label(meta, target)}"
        written[item.name] = save_overlays(
            [Overlay(item.image, cam, title)], out / overlay_name(item.name), label=f"{method} (1 = strongest)"
        )
    return written
