"""The clinical report and model card of a segmentation run: read from what the sites sent, never re-evaluated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from federation.config import load_config, to_yaml

LABELS = ["background", "anterior", "posterior"]


def _metrics(dice: float, *, posterior: bool = True) -> dict[str, float]:
    m = {"num-examples": 8.0, "loss": 0.5, "dice": dice, "dice-lo": dice - 0.05, "dice-hi": dice + 0.05,
         "dice-n": 8.0, "dice-1": dice + 0.02, "dice-1-lo": dice - 0.03, "dice-1-hi": dice + 0.07, "dice-1-n": 8.0,
         "hd95-1": 2.5, "hd95-1-median": 2.0, "hd95-1-n": 8.0, "voldiff-1": -0.1, "voldiff-1-abs": 0.2,
         "dice-2-n": 8.0 if posterior else 3.0, "hd95-2-n": 8.0 if posterior else 3.0}
    if posterior:  # a site with 3 posterior cases sends their counts only
        m |= {"dice-2": dice - 0.02, "dice-2-lo": dice - 0.1, "dice-2-hi": dice, "hd95-2": 3.0 + dice,
              "hd95-2-median": 3.0, "voldiff-2": 0.05, "voldiff-2-abs": 0.15}
    return m


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    config = load_config(None, ["data.dataset=synthetic_seg", "data.task=segmentation", "data.num_sites=3",
                                "model.name=unet", "server.run_name=segrun"])
    run = tmp_path / "segrun"
    (run / "export").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(config))
    (run / "export" / "model.json").write_text(json.dumps({"label_names": LABELS, "num_classes": 3}))
    rows = [{"round": 1, "site": "site-1", "phase": "evaluate", "metrics": _metrics(0.5)},  # superseded by round 2
            {"round": 2, "site": "site-1", "phase": "evaluate", "metrics": _metrics(0.80)},
            {"round": 2, "site": "site-2", "phase": "evaluate", "metrics": _metrics(0.70)},
            {"round": 2, "site": "site-3", "phase": "evaluate", "metrics": _metrics(0.90, posterior=False)}]
    (run / "sites.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({"final_global": {"loss": 0.4, "dice": 0.81, "dice-1": 0.8}}))
    return run


def test_segmentation_report_tables_per_site_and_structure_with_worst_site_and_spread(run: Path) -> None:
    from server.clinical_report import write_clinical_report

    report = write_clinical_report(run).read_text()
    assert report.startswith("# Clinical report — run `segrun` (segmentation)")
    assert "| site | round | cases | mean Dice [95% CI] | anterior Dice | posterior Dice |" in report
    assert "| site-1 | 2 | 8 | 0.800 [0.750, 0.850] | 0.820 [0.770, 0.870] | 0.780 [0.700, 0.800] |" in report
    assert "| site-3 | 2 | 8 | 0.900 [0.850, 0.950] | 0.920 [0.870, 0.970] | n/a (suppressed or not sent by " \
           "the site) |" in report
    assert "### posterior" in report
    assert "| site-2 | 8 | 0.680 [0.600, 0.700] | 3.70 / 3.00 | 0.050 / 0.150 |" in report
    assert "| site-3 | 3 | n/a (suppressed" in report  # 3 cases: count only
    assert "| mean Dice | 0.800 (3 sites) | site-2 0.700 | 0.200 |" in report
    assert "| posterior Dice | 0.730 (2 sites) | site-2 0.680 | 0.100 |" in report
    assert "| posterior HD95 (voxels) | 3.75 (2 sites) | site-1 3.80 | 0.10 |" in report  # worst = largest
    assert "![site_dice](site_dice.png)" in report and (run / "clinical" / "site_dice.png").is_file()
    saved = json.loads((run / "clinical" / "segmentation.json").read_text())
    assert saved["across_sites"]["anterior"]["dice"]["worst"] == {"name": "site-2", "value": pytest.approx(0.72)}
    assert saved["sites"]["site-1"]["round"] == 2


def test_segmentation_model_card_shows_dice_per_site_and_structure(run: Path) -> None:
    from federation.config import load_config as load
    from server.model_card import write_model_card

    md, js = write_model_card(run, load(run / "config.yaml"))
    card = md.read_text()
    assert "image segmentation" in card and "Segmentation: one class per pixel/voxel" in card
    assert "| site-2 | 2 | 8 | 0.700 [0.650, 0.750] | 0.720 [0.670, 0.770] | 0.680 [0.600, 0.700] |" in card
    assert "| anterior Dice | 0.820 (3 sites) | site-2 0.720 | 0.200 |" in card
    assert "AUC" not in card and "dice 0.810, dice-1 0.800" in card
    assert json.loads(js.read_text())["metrics"]["segmentation"]["structures"] == ["anterior", "posterior"]
