"""Tests for federation.data.dicom and ``medfed site``: pixels, index cache, quarantine, demo, CLI."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEGLSLossless,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from typer.testing import CliRunner

from client.site_cli import site_app
from federation.config.schema import DataConfig
from federation.data.dicom import (
    INDEX_FILENAME,
    DicomReadOptions,
    Reason,
    build_index,
    check_site,
    decoder_problem,
    index_path_for,
    load_dicom_site,
    load_dicom_splits,
    make_demo_site,
    match_channels,
    read_image,
)


def _shared_data() -> Path | None:
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    for candidate in (os.environ.get("MEDFED_DATA_DIR", ""), str(default)):
        if candidate and (Path(candidate) / "CT_small.dcm").is_file():
            return Path(candidate)
    return None


SHARED = _shared_data()
needs_shared = pytest.mark.skipif(
    SHARED is None, reason="CT_small.dcm/MR_small.dcm not found in $MEDFED_DATA_DIR or ../shared/data"
)
needs_npz = pytest.mark.skipif(
    SHARED is None or not (SHARED / "pneumoniamnist.npz").is_file(), reason="pneumoniamnist.npz not in shared data"
)


def _write(path: Path, arr: np.ndarray, *, photometric: str = "MONOCHROME2", bits: int | None = None,
           modality: str = "OT", **elements: object) -> str:
    """Write a minimal Secondary Capture file holding ``arr``; return its SOP Instance UID."""
    uid = generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = SecondaryCaptureImageStorage, uid, modality
    ds.set_pixel_data(arr, photometric, bits or arr.dtype.itemsize * 8, generate_instance_uid=False)
    for key, value in elements.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return uid


def _write_encapsulated(path: Path, tsyntax: str) -> str:
    """A file claiming a compressed transfer syntax, with bogus encapsulated pixel data."""
    uid = _write(path, np.zeros((4, 4), np.uint8))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = tsyntax
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return uid


def _labels(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("sop_instance_uid", "label")) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _reasons(report) -> dict[str, Reason]:
    return {q.path: q.reason for q in report.quarantined}


# --------------------------------------------------------------------------- pixels


def test_modality_lut_then_window_exact(tmp_path: Path) -> None:
    arr = np.array([[0, 50], [100, 150]], dtype=np.uint16)  # -> HU -100, 0, 100, 200
    path = tmp_path / "w.dcm"
    _write(path, arr, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=50, WindowWidth=200)
    out = read_image(path)
    assert out.shape == (1, 1, 2, 2) and out.dtype == np.float32
    # DICOM LINEAR window (PS3.3 C.11.2.1.2.1): c' = c - 0.5, w' = w - 1, clipped outside
    expected = np.array([[0.0, (0 - 49.5) / 199 + 0.5], [(100 - 49.5) / 199 + 0.5, 1.0]])
    np.testing.assert_allclose(out[0, 0], expected, atol=1e-6)


def test_rescale_without_window_normalization_modes(tmp_path: Path) -> None:
    path = tmp_path / "r.dcm"
    _write(path, np.array([[0, 50], [100, 150]], dtype=np.uint16), RescaleSlope=2, RescaleIntercept=-100)
    np.testing.assert_allclose(read_image(path)[0, 0], [[0, 1 / 3], [2 / 3, 1]], atol=1e-6)  # auto -> min-max
    lo, hi = -100.0, 65535 * 2 - 100.0
    np.testing.assert_allclose(
        read_image(path, normalize="range")[0, 0], (np.array([[-100, 0], [100, 200]]) - lo) / (hi - lo), atol=1e-7
    )


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    arr = np.array([[0, 255], [51, 204]], dtype=np.uint8)
    path = tmp_path / "m1.dcm"
    _write(path, arr, photometric="MONOCHROME1")
    np.testing.assert_allclose(read_image(path)[0, 0], 1.0 - arr / 255.0, atol=1e-7)
    _write(path, arr, photometric="MONOCHROME2")
    np.testing.assert_allclose(read_image(path)[0, 0], arr / 255.0, atol=1e-7)


def test_voi_lut_sequence_applied(tmp_path: Path) -> None:
    item = Dataset()
    item.add_new(0x00283002, "US", [4, 0, 8])  # LUT Descriptor: 4 entries, first 0, 8 bit
    item.add_new(0x00283006, "US", [0, 50, 100, 200])  # LUT Data
    path = tmp_path / "voi.dcm"
    _write(path, np.array([[0, 1], [2, 3]], dtype=np.uint8), VOILUTSequence=[item])
    np.testing.assert_allclose(read_image(path)[0, 0], [[0, 0.25], [0.5, 1.0]], atol=1e-7)


def test_multiframe_first_middle_all(tmp_path: Path) -> None:
    arr = np.stack([np.full((2, 3), v, np.uint8) for v in (10, 20, 30)])
    path = tmp_path / "mf.dcm"
    _write(path, arr)
    assert read_image(path, frames="first").shape == (1, 1, 2, 3)
    np.testing.assert_allclose(read_image(path, frames="first"), 10 / 255, atol=1e-7)
    np.testing.assert_allclose(read_image(path, frames="middle"), 20 / 255, atol=1e-7)
    every = read_image(path, frames="all")
    assert every.shape == (3, 1, 2, 3)
    np.testing.assert_allclose(every[:, 0, 0, 0], np.array([10, 20, 30]) / 255, atol=1e-7)


def test_rgb_three_channels_and_channel_matching(tmp_path: Path) -> None:
    arr = np.zeros((2, 2, 3), np.uint8)
    arr[..., 0], arr[..., 2] = 255, 51
    path = tmp_path / "rgb.dcm"
    _write(path, arr, photometric="RGB")
    out = read_image(path)
    assert out.shape == (1, 3, 2, 2)
    np.testing.assert_allclose(out[0, :, 0, 0], [1.0, 0.0, 0.2], atol=1e-7)
    assert match_channels(out, 1).shape == (1, 1, 2, 2)
    np.testing.assert_allclose(match_channels(out, 1)[0, 0, 0, 0], 0.299 + 0.114 * 0.2, atol=1e-6)
    assert match_channels(match_channels(out, 1), 3).shape == (1, 3, 2, 2)


@needs_shared
def test_real_ct_and_mr_slices() -> None:
    ct = read_image(SHARED / "CT_small.dcm")  # rescaled HU, no window -> per-image min-max
    assert ct.shape == (1, 1, 128, 128) and ct.min() == 0.0 and ct.max() == 1.0
    mr = read_image(SHARED / "MR_small.dcm")  # window 600/1600
    assert mr.shape == (1, 1, 64, 64) and 0.0 <= mr.min() and mr.max() <= 1.0
    assert 0.2 < float(np.mean((mr > 0) & (mr < 1))) <= 1.0


# --------------------------------------------------------------------------- quarantine


@pytest.fixture()
def no_j2k_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend no JPEG 2000 decoder plugin (pillow / pylibjpeg / gdcm) is installed."""
    monkeypatch.setattr(get_decoder(JPEG2000Lossless), "_available", {})


@needs_shared
def test_bad_files_are_quarantined_with_reasons(tmp_path: Path, no_j2k_decoder: None) -> None:
    site = tmp_path / "site"
    site.mkdir()
    rows: list[tuple[str, str]] = []
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(SHARED / name, site / name)
        rows.append((str(pydicom.dcmread(site / name, stop_before_pixels=True).SOPInstanceUID), name[:2]))
    ds = pydicom.dcmread(SHARED / "CT_small.dcm")
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(site / "truncated.dcm")
    rows.append((str(ds.SOPInstanceUID), "CT"))
    data = (site / "truncated.dcm").read_bytes()
    (site / "truncated.dcm").write_bytes(data[: len(data) - 5000])  # cut inside the pixel data
    del ds.PixelData
    ds.SOPInstanceUID = generate_uid()
    (site / "sub").mkdir()
    ds.save_as(site / "sub" / "nopixels.dcm")
    rows.append((str(ds.SOPInstanceUID), "CT"))
    (site / "random.bin").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    raw = Dataset()
    raw.PatientID, raw.Modality = "X", "CT"
    raw.save_as(site / "nometa.dcm", implicit_vr=True, little_endian=True)  # no preamble, no file meta
    rows.append((_write_encapsulated(site / "j2k.dcm", JPEG2000Lossless), "CT"))
    rows.append((_write(site / "us.dcm", np.zeros((4, 4), np.uint8), modality="US"), "CT"))
    _write(site / "unlabeled.dcm", np.zeros((4, 4), np.uint8), modality="CT")
    rows.append(("1.2.3.4.5.404", "CT"))
    labels = _labels(site / "labels.csv", rows)

    report = check_site(site, labels, options=DicomReadOptions(modalities=["ct", "MR"]))
    reasons = _reasons(report)
    assert reasons == {
        "truncated.dcm": Reason.TRUNCATED,
        "sub/nopixels.dcm": Reason.NO_PIXEL_DATA,
        "random.bin": Reason.NOT_DICOM,
        "nometa.dcm": Reason.NOT_DICOM,
        "j2k.dcm": Reason.NO_DECODER,
        "us.dcm": Reason.WRONG_MODALITY,
        "unlabeled.dcm": Reason.UNLABELED,
        "1.2.3.4.5.404": Reason.MISSING_IMAGE,
    }
    j2k = next(q for q in report.quarantined if q.reason is Reason.NO_DECODER)
    assert "pylibjpeg-openjpeg" in j2k.detail and "pip install" in j2k.detail
    assert report.usable == 2 and report.ok
    assert report.label_counts == {"CT": 1, "MR": 1}
    assert report.modalities == {"CT": 1, "MR": 1}
    assert report.image_sizes == {"128x128": 1, "64x64": 1}
    assert set(report.manufacturers) == {"GE MEDICAL SYSTEMS", "TOSHIBA_MEC"}
    assert json.loads(json.dumps(report.to_dict()))["reason_counts"]["not_dicom"] == 2

    images, y, loaded = load_dicom_site(site, labels, image_size=32,
                                        options=DicomReadOptions(modalities=["CT", "MR"]))
    assert images.shape == (2, 1, 32, 32) and images.dtype == np.float32 and y.dtype == np.int64
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert sorted(y.tolist()) == [0, 1] and _reasons(loaded) == reasons


def test_corrupt_compressed_data_is_a_decode_error(tmp_path: Path) -> None:
    if decoder_problem(JPEG2000Lossless) is not None:
        pytest.skip("no JPEG 2000 decoder installed here")
    uid = _write_encapsulated(tmp_path / "bogus.dcm", JPEG2000Lossless)
    ok = _write(tmp_path / "ok.dcm", np.full((4, 4), 7, np.uint8))
    labels = _labels(tmp_path / "labels.csv", [(uid, "1"), (ok, "0")])
    headers = check_site(tmp_path, labels, decode=False)
    assert headers.usable == 2 and not headers.pixels_checked
    report = check_site(tmp_path, labels)
    assert _reasons(report) == {"bogus.dcm": Reason.DECODE_ERROR} and report.usable == 1


def test_missing_decoder_names_the_package() -> None:
    # highdicom (the pacs extra, in .[dev]) brings pyjpegls: then HTJ2K is the syntax without a decoder
    problem = decoder_problem(JPEGLSLossless) or decoder_problem(HTJ2KLossless)
    if problem is None:
        pytest.skip("decoders of JPEG-LS and HTJ2K are both installed here")
    assert "pip install" in problem and ("pylibjpeg-" in problem or "pyjpegls" in problem)
    assert decoder_problem(ExplicitVRLittleEndian) is None


def test_duplicates_and_bad_labels_keyed_by_path(tmp_path: Path) -> None:
    img = np.arange(16, dtype=np.uint8).reshape(4, 4)
    _write(tmp_path / "a.dcm", img)
    shutil.copy(tmp_path / "a.dcm", tmp_path / "b.dcm")  # same SOP Instance UID
    for name in ("c", "d", "e"):
        _write(tmp_path / f"{name}.dcm", img)
    rows = [("a.dcm", "pneumonia"), ("./b.dcm", "normal"), ("c.dcm", "normal"), ("c.dcm", "pneumonia"),
            ("d.dcm", "tumour"), ("e.dcm", "")]
    labels = _labels(tmp_path / "labels.csv", rows, header=("Path", "Finding"))
    report = check_site(tmp_path, labels, options=DicomReadOptions(key_column="path", label_column="finding",
                                                                   label_names=["normal", "pneumonia"]))
    assert _reasons(report) == {
        "b.dcm": Reason.DUPLICATE, "c.dcm": Reason.BAD_LABEL, "d.dcm": Reason.BAD_LABEL, "e.dcm": Reason.UNLABELED,
    }
    assert report.label_counts == {"normal": 0, "pneumonia": 1}
    with pytest.raises(ValueError, match="no label column"):
        check_site(tmp_path, labels, options=DicomReadOptions(key_column="path", label_column="diagnosis"))


# --------------------------------------------------------------------------- index cache


def test_index_cache_reuse_and_invalidation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(3):
        _write(tmp_path / f"img{i}.dcm", np.full((4, 4), i, np.uint8))
    first = build_index(tmp_path)
    assert (first.parsed, first.reused) == (3, 0) and first.path == tmp_path / INDEX_FILENAME

    calls: list[object] = []
    real_dcmread = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: calls.append(a) or real_dcmread(*a, **k))
    second = build_index(tmp_path)
    assert (second.parsed, second.reused, len(calls)) == (0, 3, 0)
    assert second.records == first.records

    stat = (tmp_path / "img1.dcm").stat()
    os.utime(tmp_path / "img1.dcm", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched
    (tmp_path / "img2.dcm").unlink()
    third = build_index(tmp_path)
    assert (third.parsed, third.reused, len(calls)) == (1, 1, 1)
    saved = json.loads((tmp_path / INDEX_FILENAME).read_text())
    assert sorted(f["path"] for f in saved["files"]) == ["img0.dcm", "img1.dcm"]

    _write(tmp_path / "img0.dcm", np.full((6, 6), 9, np.uint8))  # content (and size) changed
    fourth = build_index(tmp_path)
    assert fourth.parsed == 1 and next(r for r in fourth.records if r.path == "img0.dcm").rows == 6


def test_index_in_cache_dir_and_unwritable_cache(tmp_path: Path) -> None:
    site, cache = tmp_path / "site", tmp_path / "cache"
    _write(site / "x.dcm", np.zeros((4, 4), np.uint8))
    index = build_index(site, cache_dir=cache)
    assert index.path == index_path_for(site, cache) and index.path.parent == cache
    assert not (site / INDEX_FILENAME).exists()
    assert build_index(site, cache_dir=cache).reused == 1
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    broken = build_index(site, cache_dir=blocker / "sub")  # cannot be created: logged, not raised
    assert broken.path is None and len(broken.records) == 1


# --------------------------------------------------------------------------- demo site


@pytest.fixture(scope="module")
def demo_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if SHARED is None or not (SHARED / "pneumoniamnist.npz").is_file():
        pytest.skip("pneumoniamnist.npz not in shared data")
    return make_demo_site(source="pneumoniamnist", data_dir_of_npz=SHARED,
                          out_dir=tmp_path_factory.mktemp("demo") / "site", count=20, seed=3)


@needs_npz
def test_demo_site_round_trips_pixels_and_labels(demo_site: Path) -> None:
    with np.load(SHARED / "pneumoniamnist.npz") as npz:
        source, source_labels = npz["train_images"], npz["train_labels"].reshape(-1)
    with open(demo_site / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 20 and list(rows[0]) == ["sop_instance_uid", "path", "label"]
    manufacturers, modalities, bits = set(), set(), set()
    for row in rows:
        ds = pydicom.dcmread(demo_site / row["path"])
        assert UID(row["sop_instance_uid"]).is_valid and ds.SOPInstanceUID == row["sop_instance_uid"]
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.Rows == ds.Columns == 28
        assert ds.PatientName and ds.PatientID and ds.PatientAge.endswith("Y") and ds.PixelSpacing
        assert ds.StudyInstanceUID != ds.SeriesInstanceUID
        src_index = int(str(ds.PatientID)[4:])
        img = read_image(demo_site / row["path"])
        np.testing.assert_array_equal(np.rint(img[0, 0] * 255).astype(np.uint8), source[src_index])
        np.testing.assert_allclose(img[0, 0], source[src_index] / 255.0, atol=1e-6)
        assert int(row["label"]) == int(source_labels[src_index])
        manufacturers.add(ds.Manufacturer)
        modalities.add(ds.Modality)
        bits.add(ds.BitsAllocated)
    assert modalities <= {"CR", "DX"} and len(manufacturers) >= 2 and bits == {8, 16}
    assert len({r["sop_instance_uid"] for r in rows}) == 20

    report = check_site(demo_site)
    assert report.usable == 20 and not report.quarantined and sum(report.label_counts.values()) == 20
    images, labels, _ = load_dicom_site(demo_site, image_size=16)
    assert images.shape == (20, 1, 16, 16) and labels.tolist() == [int(r["label"]) for r in rows]


@needs_npz
def test_demo_sources_breast_and_retina(tmp_path: Path) -> None:
    breast = make_demo_site(source="breastmnist", data_dir_of_npz=SHARED, out_dir=tmp_path / "b", count=4, seed=1)
    first = pydicom.dcmread(next((breast / "images").rglob("*.dcm")))
    assert first.Modality == "US" and first.PatientSex == "F"
    if not (SHARED / "retinamnist.npz").is_file():
        pytest.skip("retinamnist.npz not in shared data")
    retina = make_demo_site(source="retinamnist", data_dir_of_npz=SHARED, out_dir=tmp_path / "r", count=3, seed=1)
    images, labels, report = load_dicom_site(retina, image_size=28)
    assert images.shape == (3, 3, 28, 28) and report.modalities == {"OP": 3}
    with pytest.raises(FileExistsError):
        make_demo_site(source="retinamnist", data_dir_of_npz=SHARED, out_dir=tmp_path / "r", count=3)


@needs_npz
def test_registry_loader_splits_by_patient(demo_site: Path) -> None:
    config = SimpleNamespace(dataset="dicom", image_size=16, dicom_test_fraction=0.25, dicom_modalities="CR,DX")
    splits = load_dicom_splits(config=config, data_dir=demo_site, seed=0)
    assert (len(splits.train_labels), len(splits.test_labels)) == (15, 5)
    assert splits.in_channels == 1 and splits.num_classes == 2 and splits.image_size == 16
    plain = load_dicom_splits(config=DataConfig(image_size=20), data_dir=demo_site, seed=0)  # schema defaults
    assert plain.train_images.shape[1:] == (1, 20, 20) and len(plain.test_labels) == 4


# --------------------------------------------------------------------------- CLI


@needs_npz
def test_cli_make_demo_and_check(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli-site"
    made = runner.invoke(site_app, ["make-demo", "--from", "pneumoniamnist", "--out", str(out),
                                    "--count", "6", "--data-dir", str(SHARED)])
    assert made.exit_code == 0, made.output
    (out / "junk.dcm").write_bytes(b"not dicom at all")
    json_path = tmp_path / "report.json"
    checked = runner.invoke(site_app, ["check", str(out), "--modality", "CR,DX", "--json", str(json_path)])
    assert checked.exit_code == 0, checked.output
    assert "not_dicom" in checked.output and "junk.dcm" in checked.output
    assert json.loads(json_path.read_text())["usable"] == 6

    none = runner.invoke(site_app, ["check", str(out), "--labels", str(out / "labels.csv"), "-m", "MR"])
    assert none.exit_code == 1 and "wrong_modality" in none.output
    missing = runner.invoke(site_app, ["check", str(out), "--labels", str(tmp_path / "nope.csv")])
    assert missing.exit_code == 2


def test_pydicom_test_corpus_never_crashes(tmp_path: Path) -> None:
    """Every file of pydicom's bundled test corpus is either usable or quarantined with a reason."""
    corpus = Path(pydicom.__file__).parent / "data" / "test_files"
    if not (corpus / "MR_truncated.dcm").is_file():
        pytest.skip("pydicom's bundled test files are not installed")
    paths = [r.path for r in build_index(corpus, use_cache=False).records]
    labels = _labels(tmp_path / "labels.csv", [(p, str(i % 2)) for i, p in enumerate(paths)], header=("path", "label"))
    report = check_site(corpus, labels, options=DicomReadOptions(key_column="path", cache_dir=tmp_path / "cache"))
    assert report.usable + len(report.quarantined) == report.files_scanned == len(paths)
    assert report.usable > 20 and not (corpus / INDEX_FILENAME).exists()
    reasons = _reasons(report)
    assert reasons["MR_truncated.dcm"] is Reason.TRUNCATED
    assert reasons["no_meta.dcm"] is Reason.NOT_DICOM and reasons["rtplan.dcm"] is Reason.NO_PIXEL_DATA
    assert "image_dfl.dcm" not in reasons  # deflated transfer syntax decodes through the full parser
    if decoder_problem(JPEGLSLossless) is not None:
        assert reasons["MR_small_jpeg_ls_lossless.dcm"] is Reason.NO_DECODER
