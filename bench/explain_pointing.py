"""Do explanations point at the lesion? Pointing game and mass inside lesions on ``synthetic``.

Run from the repository root::

    python bench/explain_pointing.py                          # trains the default preset (medfed simulate)
    python bench/explain_pointing.py --run runs/synthetic-…   # reuse finished run dirs (repeatable)
    python bench/explain_pointing.py --run runs/… --split train --json pointing.json
    python bench/explain_pointing.py --set privacy.enabled=false --set model.width=32   # another preset's CNN

A run is trained with the real harness (``medfed simulate`` in a subprocess, into
``--out``); its final model (``export/``) is explained on every site's own images
(the site's scanner shift applied, as the gallery and ``medfed explain`` see them),
with the lesion masks of :func:`federation.data.synthetic.synthetic_lesion_masks`.
Scored: lesion-bearing images the model calls positive (at the run's threshold),
maps for the positive class. ``--split test`` (default) measures the final numbers;
``--split train`` is the separate slice on which the default method was chosen.

Reported per method (:mod:`federation.inference.pointing`): the pointing-game hit
rate (hottest pixel inside a lesion; ties count as a random tie-break), the map's
mass inside lesions and the lesion area fraction (what a random pixel / uniform map
would score), and seconds per image.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import REPO, loadavg, machine, say, write_json


def train_run(*, preset: str, overrides: list[str], out: Path) -> Path:
    """Train ``preset`` with ``medfed simulate`` into ``out`` and return the new run dir."""
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.iterdir())
    cmd = [sys.executable, "-c", "from simulations.cli import main; main()", "simulate", "-c", preset,
           "--set", f"server.out_dir={out}"]
    for item in overrides:
        cmd += ["--set", item]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    say("training:", " ".join(cmd[3:]))
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    new = sorted(p for p in set(out.iterdir()) - before if p.is_dir())
    if not new:
        raise RuntimeError(f"medfed simulate wrote no run directory into {out}")
    return new[-1]


def scored_images(run: Path, *, split: str) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Model, lesion images it calls positive (every site, shifted) and their masks."""
    import numpy as np
    import torch

    from federation.config import load_config
    from federation.data import load_site_data
    from federation.data.sites import site_partitions
    from federation.data.synthetic import synthetic_lesion_masks
    from federation.inference import load_run_model

    config = load_config(run / "config.yaml")
    model, meta = load_run_model(run)
    model.eval()
    train_masks, test_masks = synthetic_lesion_masks(config.data, seed=config.seed)
    train_parts, test_parts = site_partitions(config.data, seed=config.seed)
    masks, parts = (train_masks, train_parts) if split == "train" else (test_masks, test_parts)
    images, labels, lesions = [], [], []
    for site in range(config.data.num_sites):
        data = load_site_data(config.data, seed=config.seed, site_index=site)
        x, y = (data.train if split == "train" else data.test).tensors
        images.append(x.numpy())
        labels.append(y.numpy())
        lesions.append(masks[parts[site]])
    x, y, m = np.concatenate(images), np.concatenate(labels), np.concatenate(lesions)
    positive_class, threshold = int(meta.get("positive_class", 1)), float(meta.get("threshold", 0.5))
    with torch.no_grad():
        p = torch.softmax(model(torch.from_numpy(x)), dim=1)[:, positive_class].numpy()
    keep = (y == positive_class) & (p >= threshold)
    info = {"run": str(run), "preset": config.name, "seed": config.seed, "split": split,
            "lesion_images": int((y == positive_class).sum()), "called_positive": int(keep.sum()),
            "dp": bool(config.privacy.enabled), "width": config.model.width}
    return model, x[keep], m[keep], info | {"positive_class": positive_class}


def measure(run: Path, *, split: str, methods: list[str], limit: int) -> dict[str, Any]:
    """Score every method on one run."""
    from federation.inference.attribution import make_attributor
    from federation.inference.pointing import pointing_score

    model, images, masks, info = scored_images(run, split=split)
    if limit > 0:
        images, masks = images[:limit], masks[:limit]
    info["scored"] = len(images)
    results = {}
    for name in methods:
        explainer = make_attributor(name, model)
        start = time.perf_counter()
        maps = explainer(images, class_index=info["positive_class"])
        seconds = time.perf_counter() - start
        score = pointing_score(maps, masks)
        results[name] = {"hit_rate": round(score.hit_rate, 4), "mass_inside": round(score.mass_inside, 4),
                         "area_fraction": round(score.area_fraction, 4), "mass_ratio": round(score.mass_ratio, 3),
                         "s_per_image": round(seconds / max(1, len(images)), 4)}
        say(f"  {name:10s} pointing {score.hit_rate:.3f}  mass inside {score.mass_inside:.3f} "
            f"(area {score.area_fraction:.3f}, {score.mass_ratio:.2f}x)  {seconds / max(1, len(images)):.3f} s/image")
    return info | {"methods": results}


def main() -> None:
    from federation.inference.attribution import available_attributions

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", type=Path, default=[], help="finished run dir (repeatable)")
    parser.add_argument("--preset", default="synthetic", help="preset to train when no --run is given")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="override for training")
    parser.add_argument("--out", type=Path, default=Path("/tmp/medfed-explain-pointing"), help="where runs go")
    parser.add_argument("--split", choices=("test", "train"), default="test")
    parser.add_argument("--methods", default=",".join(available_attributions()))
    parser.add_argument("--limit", type=int, default=0, help="score at most N images per run (0 = all)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    runs = args.run or [train_run(preset=args.preset, overrides=args.overrides, out=args.out)]
    report = {"machine": machine(), "loadavg": loadavg(), "runs": []}
    for run in runs:
        say(f"{run} ({args.split} split)")
        report["runs"].append(measure(run, split=args.split, methods=args.methods.split(","), limit=args.limit))
        say(f"  scored {report['runs'][-1]['scored']} of {report['runs'][-1]['lesion_images']} lesion images "
            f"(the ones called positive)")
    write_json(args.json, report)


if __name__ == "__main__":
    main()
