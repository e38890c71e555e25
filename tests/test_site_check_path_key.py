"""`medfed site check` reads a labels CSV keyed by a `path` column without `--key-column path` (issue 19)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from federation.data.dicom import make_demo_site
from federation.data.dicom.labels import read_labels
from simulations.cli import app


def _rewrite_labels(site: Path, columns: list[str]) -> None:
    """Keep only ``columns`` of the demo site's labels.csv (sop_instance_uid, path, label)."""
    with open(site / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(site / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture()
def site(tmp_path: Path, shared_data_dir: Path) -> Path:
    if not (shared_data_dir / "breastmnist.npz").is_file():
        pytest.skip("breastmnist.npz not in shared data")
    return make_demo_site(source="breastmnist", data_dir_of_npz=shared_data_dir, out_dir=tmp_path / "site", count=6)


def test_site_check_keys_a_path_only_csv_by_its_path_column(site: Path, tmp_path: Path) -> None:
    _rewrite_labels(site, ["path", "label"])
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["site", "check", str(site), "--headers-only", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["usable"] == 6 and report["quarantined"] == []
    assert read_labels(site / "labels.csv").key_column == "path"


def test_a_csv_with_neither_key_column_says_which_option_to_set(site: Path, tmp_path: Path) -> None:
    _rewrite_labels(site, ["label"])
    result = CliRunner().invoke(app, ["site", "check", str(site), "--headers-only"], terminal_width=400)
    assert result.exit_code == 2
    assert "no key column 'sop_instance_uid' nor 'path'; columns are label;" in " ".join(result.output.split())
    assert "--key-column" in result.output
    with pytest.raises(ValueError, match="no key column 'image_id'; columns are label"):
        read_labels(site / "labels.csv", key_column="image_id")  # an explicit column is never replaced
