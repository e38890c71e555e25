"""DICOM series as 3-D volumes (federation/data/dicom/series.py), from pydicom's CT_small/MR_small."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from federation.data.dicom.series import read_series, to_unit_cube

STEP = 2.5  # mm between slices


def write_ct_series(folder: Path, *, slices: int = 6, seed: int = 0, study_uid: str | None = None,
                    series_uid: str | None = None, patient_id: str = "P-CT-1", size: int | None = None,
                    drop: tuple[int, ...] = (), tilt: int | None = None, duplicate: int | None = None,
                    shift: int | None = None, accession: str = "") -> tuple[str, list[Path]]:
    """A multi-slice CT series from CT_small: slice k at origin + k*STEP along z, pixels + 10*k.

    Files are written in shuffled order; ``drop`` leaves slices out, ``tilt`` gives one slice
    another orientation, ``duplicate`` writes one slice twice at one position, ``shift`` moves
    one slice by 0.3 * STEP, ``size`` crops one slice (mixed sizes). Returns (series UID, files).
    """
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    study_uid = study_uid or generate_uid(entropy_srcs=[f"study-{seed}"])
    series_uid = series_uid or generate_uid(entropy_srcs=[f"series-{seed}"])
    origin = np.array([float(v) for v in base.ImagePositionPatient])
    folder.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(slices)
    files = []
    for k in order:
        if k in drop:
            continue
        ds = copy.deepcopy(base)
        sop = generate_uid(entropy_srcs=[f"sop-{seed}-{k}-{series_uid}"])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.PatientID, ds.AccessionNumber, ds.InstanceNumber = patient_id, accession, int(k) + 1
        ds.SeriesDescription, ds.BodyPartExamined, ds.StudyDate = "AX CHEST 2.5mm", "CHEST", "20240312"
        z = origin[2] + STEP * k + (0.3 * STEP if k == shift else 0.0)
        ds.ImagePositionPatient = [float(origin[0]), float(origin[1]), float(z)]
        if k == tilt:
            ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
        pixels = base.pixel_array.astype(np.int32) + 10 * int(k)
        if size is not None and k == 0:
            pixels = pixels[:size, :size]
        ds.set_pixel_data(pixels.astype(np.int16), "MONOCHROME2", 16, generate_instance_uid=False)
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        path = folder / f"slice-{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        if k == duplicate:
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(folder / f"slice-{k:03d}-copy.dcm", enforce_file_format=True)
            files.append(folder / f"slice-{k:03d}-copy.dcm")
    return series_uid, files


def test_a_series_becomes_one_volume_ordered_along_the_normal_with_rescale(tmp_path: Path) -> None:
    uid, files = write_ct_series(tmp_path / "ct", slices=6)
    volumes, problems = read_series(sorted(files), root=tmp_path)
    assert problems == []
    (vol,) = volumes
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert vol.series_instance_uid == uid and vol.modality == "CT"
    assert vol.voxels.shape == (6, 128, 128)
    assert vol.spacing == pytest.approx((STEP, 0.661468, 0.661468))
    assert vol.origin == pytest.approx(tuple(float(v) for v in base.ImagePositionPatient))
    for k in range(6):  # slice k holds CT_small + 10k, in HU (intercept -1024)
        np.testing.assert_array_equal(vol.voxels[k], base.pixel_array.astype(np.float32) + 10 * k - 1024)
    assert [s.split("/")[-1] for s in vol.sources] == [f"slice-{k:03d}.dcm" for k in range(6)]
    cube = to_unit_cube(vol, shape=(8, 8, 8))
    assert cube.shape == (8, 8, 8) and cube.dtype == np.float32 and 0.0 <= cube.min() < cube.max() <= 1.0


@pytest.mark.parametrize(
    ("broken", "reason", "detail"),
    [
        ({"drop": (3,)}, "missing_slice", "1 slice(s) missing between"),
        ({"tilt": 2}, "inconsistent_orientation", "slice-002.dcm has orientation"),
        ({"duplicate": 1}, "duplicate_slice", "slice-001.dcm and "),
        ({"shift": 4}, "inconsistent_spacing", "slice steps from 1.750 to 3.250 mm"),
        ({"size": 64}, "mixed_sizes", "slices of 64x64, 128x128"),
    ],
)
def test_a_broken_series_is_named_and_set_aside_the_rest_kept(tmp_path: Path, broken: dict, reason: str,
                                                               detail: str) -> None:
    good_uid, good = write_ct_series(tmp_path / "good", seed=1)
    bad_uid, bad = write_ct_series(tmp_path / "bad", seed=2, **broken)
    volumes, problems = read_series(good + bad, root=tmp_path)
    assert [v.series_instance_uid for v in volumes] == [good_uid]
    (problem,) = problems
    assert (problem.series_instance_uid, problem.reason) == (bad_uid, reason)
    assert detail in problem.detail
    assert problem.files == len(bad)


def test_single_images_are_depth_one_and_min_slices_sets_them_aside(tmp_path: Path) -> None:
    mr = get_testdata_file("MR_small.dcm")
    volumes, problems = read_series([mr])
    assert volumes[0].voxels.shape == (1, 64, 64) and problems == []
    volumes, problems = read_series([mr], min_slices=2)
    assert volumes == [] and problems[0].reason == "too_few_slices"


def _enhanced(tmp_path: Path, slices: int = 4) -> tuple[Path, np.ndarray]:
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds = copy.deepcopy(base)
    stack = np.stack([base.pixel_array.astype(np.int16) + 5 * k for k in range(slices)])[::-1]  # stored top down
    ds.set_pixel_data(np.ascontiguousarray(stack), "MONOCHROME2", 16)
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope",
                    "RescaleIntercept"):
        delattr(ds, keyword)
    shared = Dataset()
    orient, measures, transform = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures.PixelSpacing, measures.SliceThickness = [0.5, 0.5], 3.0
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 2, -100, "US"
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for i in range(slices):
        item, plane = Dataset(), Dataset()
        plane.ImagePositionPatient = [0.0, 0.0, 3.0 * (slices - 1 - i)]
        item.PlanePositionSequence = Sequence([plane])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, base.pixel_array.astype(np.float32)


def test_an_enhanced_multiframe_object_uses_its_functional_groups(tmp_path: Path) -> None:
    path, pixels = _enhanced(tmp_path)
    (vol,), problems = read_series([path], root=tmp_path)
    assert problems == []
    assert vol.voxels.shape == (4, 128, 128) and vol.spacing == pytest.approx((3.0, 0.5, 0.5))
    for k in range(4):  # ordered bottom up again, rescaled by the shared transformation
        np.testing.assert_array_equal(vol.voxels[k], (pixels + 5 * k) * 2 - 100)
    assert vol.sources == tuple(f"enhanced.dcm#{i}" for i in (3, 2, 1, 0))


def write_volume_site(root: Path, *, per_class: int = 3) -> dict[str, str]:
    """A site folder of CT series (class b brighter), one per patient, plus a broken one; labels by series UID."""
    labels = {}
    for i in range(2 * per_class):
        uid, files = write_ct_series(root / f"s{i}", slices=5, seed=100 + i, patient_id=f"P{i}")
        if i % 2:
            for path in files:  # class b: +300 HU
                ds = pydicom.dcmread(path)
                ds.set_pixel_data((ds.pixel_array.astype(np.int32) + 300).astype(np.int16), "MONOCHROME2", 16,
                                  generate_instance_uid=False)
                ds.save_as(path, enforce_file_format=True)
        labels[uid] = "b" if i % 2 else "a"
    bad_uid, _ = write_ct_series(root / "broken", slices=5, seed=999, patient_id="P-broken", drop=(2,))
    labels[bad_uid] = "a"
    lines = ["series_instance_uid,label", *(f"{k},{v}" for k, v in labels.items())]
    (root / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return labels


def test_dicom_volume_site_trains_a_3d_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import torch

    from federation.config.schema import DataConfig, ModelConfig
    from federation.data import check_site_data, load_dataset
    from federation.models import build_model

    write_volume_site(tmp_path)
    config = DataConfig(dataset="dicom_volume", data_dir=str(tmp_path), image_size=16, dicom_label_names="a,b",
                        dicom_channels=1, dicom_test_fraction=0.34)
    with caplog.at_level("WARNING"):
        splits = load_dataset(config, seed=0)
    assert "missing_slice" in caplog.text  # the broken series is set aside, named in the site's log
    check_site_data(config, splits)
    assert splits.train_images.shape == (4, 1, 16, 16, 16) and splits.test_images.shape == (2, 1, 16, 16, 16)
    assert sorted(splits.train_labels.tolist()) == [0, 0, 1, 1] and sorted(splits.test_labels.tolist()) == [0, 1]
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="cnn"), in_channels=1, num_classes=2, spatial_dims=3, dp=False)
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(np.array(splits.train_images))),
                                             torch.from_numpy(np.array(splits.train_labels)))
    loss.backward()
    assert torch.isfinite(loss)


def test_dicom_volume_test_split_carries_each_series_sex_and_age_for_subgroups(tmp_path: Path) -> None:
    from federation.config.schema import DataConfig
    from federation.data import load_dataset

    labels = write_volume_site(tmp_path)
    for path in tmp_path.rglob("*.dcm"):  # class a: women of 40 (PatientAge); b: men born 70 years before the study
        ds = pydicom.dcmread(path)
        woman = labels.get(ds.SeriesInstanceUID) == "a"
        ds.PatientSex, ds.PatientAge = ("F", "040Y") if woman else ("M", "")
        ds.PatientBirthDate = "" if woman else "19540110"
        ds.save_as(path, enforce_file_format=True)
    config = DataConfig(dataset="dicom_volume", data_dir=str(tmp_path), image_size=8, dicom_label_names="a,b",
                        dicom_channels=1, dicom_test_fraction=0.5)
    splits = load_dataset(config, seed=0)
    test = splits.test_labels.tolist()
    assert sorted(test) == [0, 0, 1]  # the broken series (class a) is set aside
    assert splits.test_groups["sex"].tolist() == [0 if y == 0 else 1 for y in test]  # SEX_CODES: F 0, M 1
    assert splits.test_groups["age"].tolist() == [40 if y == 0 else 70 for y in test]  # study 2024-03-12, born 1954-01-10


def test_dicom_volume_labels_outside_the_site_folder_are_refused(tmp_path: Path) -> None:
    from federation.data.dicom.dataset import DicomSettings
    from federation.data.dicom.volumes import load_volume_site

    write_volume_site(tmp_path / "site", per_class=1)
    (tmp_path / "elsewhere.csv").write_text("series_instance_uid,label\n", encoding="utf-8")
    with pytest.raises(ValueError, match="resolves outside the site folder"):
        load_volume_site(tmp_path / "site", settings=DicomSettings(labels="../elsewhere.csv"), size=8)


def _write_seg(files: list[Path], out: Path, *, lesion_slices: tuple[int, ...]) -> None:
    """A DICOM SEG (highdicom) of a written CT series: a box lesion (class 1) on the given slice numbers."""
    from federation.inference.writeback import ModelIdentity, segmentation_object

    sources = sorted((pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2]))
    labelmap = np.zeros((len(sources), 128, 128), np.uint8)
    for i, ds in enumerate(sources):
        if int(ds.InstanceNumber) - 1 in lesion_slices:
            labelmap[i, 40:88, 48:96] = 1
    seg = segmentation_object(source_images=sources, labelmap=labelmap, label_names=["background", "lesion"],
                              model=ModelIdentity(name="annotator", version="1", sha256="-"))
    seg.save_as(out, enforce_file_format=True)


def test_dicom_seg_labels_align_with_their_series_for_3d_segmentation(tmp_path: Path) -> None:
    import torch

    from federation.config.schema import DataConfig, ModelConfig
    from federation.data import check_site_data, load_dataset
    from federation.models import build_model

    for i in range(4):
        _, files = write_ct_series(tmp_path / f"s{i}", slices=4, seed=200 + i, patient_id=f"SEG-P{i}")
        _write_seg(files, tmp_path / f"s{i}" / "seg.dcm", lesion_slices=(1, 2))
    write_ct_series(tmp_path / "unsegmented", slices=4, seed=299, patient_id="SEG-P9")
    config = DataConfig(dataset="dicom_seg", task="segmentation", data_dir=str(tmp_path), volume_shape="8,16,16",
                        dicom_label_names="background,lesion", dicom_channels=1, dicom_test_fraction=0.25)
    splits = load_dataset(config, seed=0)
    check_site_data(config, splits)
    assert splits.train_images.shape == (3, 1, 8, 16, 16) and splits.test_masks.shape == (1, 1, 8, 16, 16)
    masks = np.concatenate([splits.train_masks, splits.test_masks])[:, 0]
    # slices 1-2 of 4 -> depths 2..5 of 8; rows 40:88 and columns 48:96 of 128 -> 5:11 and 6:12 of 16
    expected = np.zeros((8, 16, 16), np.uint8)
    expected[2:6, 5:11, 6:12] = 1
    for mask in masks:
        np.testing.assert_array_equal(mask, expected)
    torch.manual_seed(0)
    unet = build_model(ModelConfig(name="unet", width=4), in_channels=1, num_classes=2, spatial_dims=3, dp=False,
                       task="segmentation")
    assert unet(torch.from_numpy(np.array(splits.train_images))).shape == (3, 2, 8, 16, 16)
