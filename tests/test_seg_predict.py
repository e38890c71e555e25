"""``medfed predict`` with a segmentation run on NIfTI volumes: masks on the inputs' grid, volumes in mm³."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from federation.inference.export import export_model
from federation.inference.preprocess import Preprocessing

#: A rotated, anisotropic voxel grid (voxel volume 0.7 * 1.2 * 2.5 = 2.1 mm³).
AFFINE = np.array([[0.0, -0.7, 0.0, 10.0], [1.2, 0.0, 0.0, -5.0], [0.0, 0.0, 2.5, 3.0], [0.0, 0.0, 0.0, 1.0]])


class Threshold(nn.Module):
    """Logits whose arg-max is ``x > 0.5``: the mask reproduces a binary input wherever the model saw it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), x - 0.5], dim=1)


def _export(model: nn.Module, run: Path, shape: tuple[int, int, int], labels: list[str]) -> None:
    export_model(model=model, out_dir=run / "export",
                 preprocessing=Preprocessing(image_size=0, in_channels=1, spatial_dims=3, volume_shape=shape),
                 metadata={"task": "segmentation", "dataset": "nifti", "num_classes": len(labels),
                           "label_names": labels})


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def _predict(run: Path, inputs: Path, out: Path):
    from simulations.cli import app

    return CliRunner().invoke(app, ["predict", "--model", str(run), "--input", str(inputs), "--out", str(out)],
                              terminal_width=250)


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["input"]: row for row in csv.DictReader(handle)}


def test_masks_undo_the_pad_and_crop_keep_name_shape_affine_and_volumes_are_exact(tmp_path: Path) -> None:
    import nibabel as nib

    _export(Threshold(), tmp_path / "run", (8, 8, 8), ["background", "lesion"])
    rng = np.random.default_rng(0)
    padded = (rng.random((6, 5, 7)) < 0.3).astype(np.float32)  # smaller than 8^3 on every side: padded
    cropped = (rng.random((13, 5, 9)) < 0.3).astype(np.float32)  # sides 13 and 9 cropped (centred), 5 padded
    _save(tmp_path / "in" / "a.nii.gz", padded)
    _save(tmp_path / "in" / "sub" / "b.nii", cropped)
    _save(tmp_path / "in" / "four_d.nii.gz", np.zeros((6, 5, 7, 2), np.float32))
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"not a nifti file")

    result = _predict(tmp_path / "run", tmp_path / "in", tmp_path / "out")
    assert result.exit_code == 1, result.output  # two inputs failed, named; the others were written
    assert f"{tmp_path / 'in' / 'broken.nii.gz'}: " in result.output
    assert "four_d.nii.gz: ValueError: expected a single-channel 3-D volume, got shape (6, 5, 7, 2)" in result.output
    assert "2 mask(s)" in result.output and "2 input(s) failed" in result.output

    expected_b = np.zeros_like(cropped)
    expected_b[2:10, :, 0:8] = cropped[2:10, :, 0:8]  # the centred 8-voxel window; outside it: background
    rows = _rows(tmp_path / "out" / "volumes.csv")
    assert set(rows) == {"a.nii.gz", "sub/b.nii", "four_d.nii.gz", "broken.nii.gz"}
    for name, expected in (("a.nii.gz", padded), ("sub/b.nii", expected_b)):
        mask, image = nib.load(str(tmp_path / "out" / name)), nib.load(str(tmp_path / "in" / name))
        assert mask.shape == expected.shape and np.array_equal(mask.affine, image.affine)  # float32 in the file
        np.testing.assert_allclose(mask.affine, AFFINE, atol=1e-6)
        assert mask.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(mask.dataobj), expected.astype(np.uint8))
        assert float(rows[name]["voxel_mm3"]) == abs(float(np.linalg.det(image.affine[:3, :3])))
        assert float(rows[name]["voxel_mm3"]) == pytest.approx(2.1, rel=1e-6)
        assert float(rows[name]["lesion_mm3"]) == int(expected.sum()) * float(rows[name]["voxel_mm3"])
        assert rows[name]["error"] == ""
    assert rows["broken.nii.gz"]["mask"] == "" and rows["broken.nii.gz"]["error"]


def test_a_tiny_unet_segments_hippocampus_cases_on_their_own_grid(tmp_path: Path) -> None:
    import nibabel as nib

    from federation.config.schema import ModelConfig
    from federation.data.paths import resolve_data_dir
    from federation.models import build_model

    source = resolve_data_dir("") / "msd_hippocampus" / "imagesTr"
    cases = sorted(source.glob("hippocampus_*.nii.gz"))[:2]
    if len(cases) < 2:
        pytest.skip("MSD hippocampus is not in the data dir")
    torch.manual_seed(0)
    unet = build_model(ModelConfig(name="unet", width=2, norm="instance"), in_channels=1, num_classes=3,
                       spatial_dims=3, dp=False, task="segmentation")
    _export(unet, tmp_path / "run", (40, 56, 40), ["background", "anterior", "posterior"])
    result = _predict(tmp_path / "run", cases[0], tmp_path / "one")  # a single file
    assert result.exit_code == 0, result.output
    assert (tmp_path / "one" / cases[0].name).is_file()
    (tmp_path / "in").mkdir()
    for case in cases:
        (tmp_path / "in" / case.name).symlink_to(case)
    result = _predict(tmp_path / "run", tmp_path / "in", tmp_path / "out")
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path / "out" / "volumes.csv")
    assert list(rows) == [c.name for c in cases]
    for case in cases:
        image, mask = nib.load(str(case)), nib.load(str(tmp_path / "out" / case.name))
        assert mask.shape == image.shape and np.array_equal(mask.affine, image.affine)
        labels = np.asarray(mask.dataobj)
        voxel = abs(float(np.linalg.det(image.affine[:3, :3])))
        assert rows[case.name]["shape"] == "x".join(map(str, image.shape))
        for k, name in ((1, "anterior"), (2, "posterior")):
            assert float(rows[case.name][f"{name}_mm3"]) == int((labels == k).sum()) * voxel
    model_json = json.loads((tmp_path / "run" / "export" / "model.json").read_text())
    assert model_json["input"]["shape"] == ["N", 1, 40, 56, 40]


def test_a_2d_segmentation_model_writes_one_dicom_seg_per_series_referencing_its_sources(tmp_path: Path) -> None:
    """predict --input on DICOM files with a 2-D segmentation run: a SEG per series on the source grid; others named."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    export_model(model=Threshold(), out_dir=tmp_path / "run" / "export",
                 preprocessing=Preprocessing(image_size=32, in_channels=1, spatial_dims=2),
                 metadata={"task": "segmentation", "dataset": "synthetic_seg", "num_classes": 2,
                           "label_names": ["background", "lesion"]})
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    inputs = tmp_path / "in"
    inputs.mkdir()
    for k in range(2):  # two slices of one series
        source.SOPInstanceUID = generate_uid()
        source.InstanceNumber = k + 1
        source.ImagePositionPatient = [-158.1, -179.0, -75.7 + 5.0 * k]
        source.save_as(inputs / f"slice-{k}.dcm")
    broken = inputs / "broken"  # another series whose two slices sit at one position: named, the others written
    broken.mkdir()
    source.SeriesInstanceUID = generate_uid()
    for k in range(2):
        source.SOPInstanceUID = generate_uid()
        source.save_as(broken / f"dup-{k}.dcm")
    np.savez(inputs / "other.npz", images=np.zeros((1, 32, 32), dtype=np.float32))
    result = _predict(tmp_path / "run", inputs, tmp_path / "out")
    assert result.exit_code == 1, result.output  # the .npz image got no SEG, and is named
    assert "other.npz#0: no SEG written" in result.output
    assert "broken/dup-0.dcm: no SEG written: its series' SEG could not be built" in result.output
    [written] = sorted((tmp_path / "out").glob("*.dcm"))
    seg = pydicom.dcmread(written)
    assert seg.Modality == "SEG" and seg.SeriesInstanceUID != source.SeriesInstanceUID
    referenced = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert len(referenced) == 2 and seg.ReferencedSeriesSequence[0].SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(inputs / "slice-0.dcm").SeriesInstanceUID
    assert (int(seg.Rows), int(seg.Columns)) == (128, 128)  # the mask on the source images' grid
