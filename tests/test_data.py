"""Datasets: registry, synthetic lesions, MedMNIST files, subsets, resizing and site data."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from federation.config import DataConfig
from federation.data import (
    DatasetSplits,
    apply_site_shift,
    available_datasets,
    describe_sites,
    generate_synthetic,
    load_central_test,
    load_dataset,
    load_site_data,
    register_dataset,
    resize_images,
    resolve_data_dir,
    site_partitions,
)
from federation.data import registry

OFFICIAL = {
    "pneumoniamnist": (4708, 524, 624, 1, 2),
    "breastmnist": (546, 78, 156, 1, 2),
    "retinamnist": (1080, 120, 400, 3, 5),
}


def _real_file(data_dir: Path, flag: str) -> Path:
    path = data_dir / f"{flag}.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found (set MEDFED_DATA_DIR to a folder holding the official {flag}.npz)")
    return path


# --------------------------------------------------------------------------- paths


def test_resolve_data_dir_prefers_explicit_then_env_then_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MEDFED_DATA_DIR", raising=False)
    assert resolve_data_dir("") == (tmp_path / "home" / ".medfed" / "data").resolve()
    monkeypatch.setenv("MEDFED_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir("") == (tmp_path / "env").resolve()
    assert resolve_data_dir("~/explicit") == (tmp_path / "home" / "explicit").resolve()
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir("rel/dir") == tmp_path.resolve() / "rel" / "dir"


# --------------------------------------------------------------------------- registry


def test_builtin_datasets_are_registered() -> None:
    assert {"synthetic", "pneumoniamnist", "breastmnist", "retinamnist"} <= set(available_datasets())
    assert available_datasets() == sorted(available_datasets())


def test_unknown_dataset_error_lists_valid_names() -> None:
    with pytest.raises(ValueError) as info:
        load_dataset(DataConfig(dataset="foo"), seed=0)
    message = str(info.value)
    assert "'foo'" in message and "data.dataset" in message
    for name in ("breastmnist", "pneumoniamnist", "retinamnist", "synthetic"):
        assert name in message


def test_register_custom_dataset_and_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    calls: list[int] = []

    def tiny(*, config: DataConfig, data_dir: Path, seed: int) -> DatasetSplits:
        calls.append(seed)
        rng = np.random.default_rng(seed)
        return DatasetSplits(
            name="tiny",
            train_images=rng.random((20, 2, 8, 8), dtype=np.float32),
            train_labels=np.arange(20, dtype=np.int64) % 3,
            test_images=rng.random((6, 2, 8, 8), dtype=np.float32),
            test_labels=np.arange(6, dtype=np.int64) % 3,
            num_classes=3,
            in_channels=2,
            md5=None,
            label_names=("a", "b", "c"),
        )

    register_dataset("tiny", tiny)
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("tiny", tiny)
    config = DataConfig(dataset="tiny", image_size=8)
    first = load_dataset(config, seed=1)
    assert load_dataset(config, seed=1) is first, "the same key must reuse the cached dataset"
    assert calls == [1]
    assert load_dataset(config, seed=2) is not first
    assert not first.train_images.flags.writeable, "shared arrays must be read-only"
    resized = load_dataset(DataConfig(dataset="tiny", image_size=16), seed=1)
    assert resized.train_images.shape == (20, 2, 16, 16)
    registry.clear_dataset_cache()


def test_dataset_splits_rejects_bad_arrays() -> None:
    ok = dict(
        name="x",
        train_images=np.zeros((4, 1, 8, 8), np.float32),
        train_labels=np.zeros(4, np.int64),
        test_images=np.zeros((2, 1, 8, 8), np.float32),
        test_labels=np.zeros(2, np.int64),
        num_classes=2,
        in_channels=1,
        md5=None,
        label_names=("a", "b"),
    )
    DatasetSplits(**ok)
    with pytest.raises(ValueError, match="float32"):
        DatasetSplits(**(ok | {"train_images": np.zeros((4, 1, 8, 8), np.float64)}))
    with pytest.raises(ValueError, match="labels must lie"):
        DatasetSplits(**(ok | {"test_labels": np.array([0, 2], np.int64)}))
    with pytest.raises(ValueError, match="channels"):
        DatasetSplits(**(ok | {"in_channels": 3}))


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_balanced_and_fast() -> None:
    start = time.process_time()
    images, labels = generate_synthetic(num_samples=1200, image_size=28, seed=5)
    elapsed = time.process_time() - start
    assert elapsed < 2.0, f"generating 1200 images took {elapsed:.2f} s of CPU"
    again, labels_again = generate_synthetic(num_samples=1200, image_size=28, seed=5)
    other, _ = generate_synthetic(num_samples=1200, image_size=28, seed=6)
    assert images.shape == (1200, 1, 28, 28) and images.dtype == np.float32
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [600, 600]
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    assert not np.array_equal(images, other)
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert images.std() > 0.05, "images should not be flat"


def test_synthetic_dataset_splits_80_20_stratified() -> None:
    splits = load_dataset(DataConfig(dataset="synthetic", num_samples=1000, image_size=32), seed=0)
    assert splits.train_images.shape == (800, 1, 32, 32)
    assert splits.test_images.shape == (200, 1, 32, 32)
    assert np.bincount(splits.train_labels).tolist() == [400, 400]
    assert np.bincount(splits.test_labels).tolist() == [100, 100]
    assert splits.md5 is None and splits.num_classes == 2 and splits.in_channels == 1


def _tiny_cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveMaxPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 2),
    )


def test_synthetic_is_learnable_but_not_trivial() -> None:
    splits = load_dataset(DataConfig(dataset="synthetic"), seed=0)
    x_train = torch.from_numpy(np.array(splits.train_images))
    y_train = torch.from_numpy(np.array(splits.train_labels))
    x_test = torch.from_numpy(np.array(splits.test_images))
    y_test = splits.test_labels
    # Global intensity is (nearly) uninformative: the model has to find the lesions.
    assert roc_auc_score(y_test, splits.test_images.mean(axis=(1, 2, 3))) < 0.7
    torch.manual_seed(0)
    net = _tiny_cnn()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    with torch.no_grad():
        untrained = roc_auc_score(y_test, net(x_test)[:, 1].numpy())
    assert untrained < 0.8
    best = 0.0
    for _ in range(8):
        order = torch.randperm(len(y_train))
        for start in range(0, len(order), 32):
            batch = order[start : start + 32]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
        with torch.no_grad():
            best = max(best, roc_auc_score(y_test, net(x_test).softmax(1)[:, 1].numpy()))
        if best > 0.85:
            break
    assert best > 0.85, f"a tiny CNN should learn the synthetic task; best AUC {best:.3f}"


def test_site_shift_is_deterministic_bounded_and_site_specific() -> None:
    images, _ = generate_synthetic(num_samples=40, image_size=28, seed=0)
    before = images.copy()
    a = apply_site_shift(images, site_index=0, seed=1, strength=0.5)
    assert np.array_equal(images, before), "the input must not be modified"
    assert np.array_equal(a, apply_site_shift(images, site_index=0, seed=1, strength=0.5))
    b = apply_site_shift(images, site_index=1, seed=1, strength=0.5)
    assert a.shape == images.shape and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert np.abs(a - b).mean() > 0.01, "different sites should look different"
    assert np.abs(a - images).mean() > 0.01
    assert np.array_equal(apply_site_shift(images, site_index=3, seed=1, strength=0.0), images)
    other_noise = apply_site_shift(images, site_index=0, seed=1, strength=0.5, noise_stream=1)
    assert not np.array_equal(a, other_noise)
    assert abs(float(a.mean()) - float(other_noise.mean())) < 0.01, "same scanner, other noise"
    with pytest.raises(ValueError, match="strength"):
        apply_site_shift(images, site_index=0, seed=1, strength=-1.0)


# --------------------------------------------------------------------------- subsets and resizing


def test_max_samples_gives_deterministic_stratified_subsets() -> None:
    config = DataConfig(dataset="synthetic", num_samples=1000, max_train_samples=101, max_test_samples=37)
    splits = load_dataset(config, seed=3)
    assert len(splits.train_labels) == 101 and len(splits.test_labels) == 37
    assert abs(int(np.bincount(splits.train_labels)[0]) - 50.5) <= 1
    assert abs(int(np.bincount(splits.test_labels)[0]) - 18.5) <= 1
    registry.clear_dataset_cache()
    assert np.array_equal(load_dataset(config, seed=3).train_images, splits.train_images)
    full = load_dataset(DataConfig(dataset="synthetic", num_samples=1000), seed=3)
    rows = {row.tobytes() for row in full.train_images.reshape(800, -1)}
    assert all(row.tobytes() in rows for row in splits.train_images.reshape(101, -1)), "subset of the full split"


def test_resize_images_keeps_range_and_constants() -> None:
    flat = np.full((3, 2, 28, 28), 0.25, np.float32)
    assert np.allclose(resize_images(flat, size=64), 0.25, atol=1e-6)
    rng = np.random.default_rng(0)
    noisy = rng.random((5, 1, 28, 28), dtype=np.float32)
    small = resize_images(noisy, size=14)
    assert small.shape == (5, 1, 14, 14) and small.dtype == np.float32
    assert small.min() >= 0.0 and small.max() <= 1.0
    assert small.std() < noisy.std(), "antialiased downsampling averages noise"
    assert np.isclose(small.mean(), noisy.mean(), atol=0.01)


# --------------------------------------------------------------------------- MedMNIST


@pytest.mark.parametrize("flag", sorted(OFFICIAL))
def test_medmnist_loads_official_file(flag: str, shared_data_dir: Path) -> None:
    _real_file(shared_data_dir, flag)
    n_train, n_val, n_test, channels, classes = OFFICIAL[flag]
    splits = load_dataset(DataConfig(dataset=flag, data_dir=str(shared_data_dir)), seed=0)
    assert splits.train_images.shape == (n_train, channels, 28, 28)
    assert splits.test_images.shape == (n_test, channels, 28, 28)
    assert splits.val_images is not None and splits.val_images.shape == (n_val, channels, 28, 28)
    assert splits.val_labels is not None and splits.val_labels.shape == (n_val,)
    assert splits.train_images.dtype == np.float32 and splits.train_labels.dtype == np.int64
    assert 0.0 <= splits.train_images.min() and splits.train_images.max() <= 1.0
    assert splits.train_images.max() > 0.9, "uint8 should be scaled by 1/255, not more"
    assert splits.num_classes == classes and splits.in_channels == channels
    assert len(splits.label_names) == classes
    assert set(np.unique(splits.train_labels).tolist()) == set(range(classes))
    assert splits.md5 is not None and len(splits.md5) == 32


def test_retinamnist_channels_are_rgb_planes(shared_data_dir: Path) -> None:
    path = _real_file(shared_data_dir, "retinamnist")
    raw = np.load(path)["train_images"]  # (N, 28, 28, 3) uint8
    splits = load_dataset(DataConfig(dataset="retinamnist", data_dir=str(shared_data_dir)), seed=0)
    assert np.allclose(splits.train_images[7, 0], raw[7, :, :, 0] / 255.0)
    assert np.allclose(splits.train_images[7, 2], raw[7, :, :, 2] / 255.0)


def test_medmnist_resize_and_subset(shared_data_dir: Path) -> None:
    _real_file(shared_data_dir, "breastmnist")
    config = DataConfig(dataset="breastmnist", data_dir=str(shared_data_dir), image_size=64, max_train_samples=100)
    splits = load_dataset(config, seed=0)
    assert splits.train_images.shape == (100, 1, 64, 64)
    assert splits.test_images.shape == (156, 1, 64, 64)
    assert splits.val_images is not None and splits.val_images.shape == (78, 1, 64, 64)
    assert splits.train_images.min() >= 0.0 and splits.train_images.max() <= 1.0


def test_md5_mismatch_names_file_and_both_checksums(shared_data_dir: Path, tmp_path: Path) -> None:
    source = _real_file(shared_data_dir, "breastmnist")
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt = tmp_path / "breastmnist.npz"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ValueError) as info:
        load_dataset(DataConfig(dataset="breastmnist", data_dir=str(tmp_path)), seed=0)
    message = str(info.value)
    assert str(corrupt) in message
    assert "750601b1f35ba3300ea97c75c52ff8f6" in message
    assert __import__("hashlib").md5(bytes(data)).hexdigest() in message
    assert "data.download=true" in message


def test_missing_file_explains_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_dataset(DataConfig(dataset="pneumoniamnist", data_dir=str(tmp_path)), seed=0)
    message = str(info.value)
    for needle in (str(tmp_path / "pneumoniamnist.npz"), "data.data_dir", "MEDFED_DATA_DIR", "data.download=true"):
        assert needle in message, f"{needle!r} missing from: {message}"


def test_download_without_medmnist_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "medmnist", None)  # makes `import medmnist` fail
    with pytest.raises(ImportError, match="pip install medmnist"):
        load_dataset(DataConfig(dataset="breastmnist", data_dir=str(tmp_path), download=True), seed=0)


def test_download_uses_medmnist_and_checks_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, shared_data_dir: Path
) -> None:
    source = _real_file(shared_data_dir, "breastmnist")
    fake = types.ModuleType("medmnist")
    seen: list[dict] = []

    class BreastMNIST:  # stands in for medmnist.BreastMNIST
        def __init__(self, *, split: str, root: str, download: bool) -> None:
            seen.append({"split": split, "root": root, "download": download})
            shutil.copy(source, Path(root) / "breastmnist.npz")

    fake.BreastMNIST = BreastMNIST  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "medmnist", fake)
    target = tmp_path / "new" / "dir"
    splits = load_dataset(DataConfig(dataset="breastmnist", data_dir=str(target), download=True), seed=0)
    assert seen == [{"split": "train", "root": str(target.resolve()), "download": True}]
    assert len(splits.train_labels) == 546


# --------------------------------------------------------------------------- sites


def test_sites_partition_the_pooled_train_split_exactly(shared_data_dir: Path) -> None:
    _real_file(shared_data_dir, "pneumoniamnist")
    config = DataConfig(
        dataset="pneumoniamnist", data_dir=str(shared_data_dir), num_sites=4, partition="dirichlet", alpha=0.5
    )
    pooled = load_dataset(config, seed=0)
    train_parts, test_parts = site_partitions(config, seed=0)
    assert np.array_equal(np.sort(np.concatenate(train_parts)), np.arange(4708))
    assert np.array_equal(np.sort(np.concatenate(test_parts)), np.arange(624))
    total = 0
    for i in range(4):
        site = load_site_data(config, seed=0, site_index=i)
        assert site.name == f"site-{i + 1}"
        images, labels = site.train.tensors
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert np.array_equal(images.numpy(), pooled.train_images[train_parts[i]]), "no shift for MedMNIST"
        assert np.array_equal(labels.numpy(), pooled.train_labels[train_parts[i]])
        assert sum(site.label_counts.values()) == len(labels)
        assert len(site.test) == len(test_parts[i]) >= 1
        total += len(labels)
    assert total == 4708
    central = load_central_test(config, seed=0)
    assert len(central) == 624
    assert np.array_equal(central.tensors[0].numpy(), pooled.test_images)


def test_synthetic_sites_are_shifted_and_cover_the_pool() -> None:
    config = DataConfig(num_sites=3, num_samples=300)
    pooled = load_dataset(config, seed=0)
    sites = [load_site_data(config, seed=0, site_index=i) for i in range(3)]
    assert sum(len(s.train) for s in sites) == len(pooled.train_labels) == 240
    assert sum(len(s.test) for s in sites) == len(pooled.test_labels) == 60
    train_parts, _ = site_partitions(config, seed=0)
    for site, part in zip(sites, train_parts):
        images, labels = site.train.tensors
        assert np.array_equal(labels.numpy(), pooled.train_labels[part])
        assert not np.allclose(images.numpy(), pooled.train_images[part]), "synthetic sites get a scanner shift"
        assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
        assert site.num_classes == 2 and site.in_channels == 1
    again = load_site_data(config, seed=0, site_index=1)
    assert torch.equal(again.train.tensors[0], sites[1].train.tensors[0])
    assert np.array_equal(load_central_test(config, seed=0).tensors[0].numpy(), pooled.test_images)


def test_site_index_out_of_range_is_named() -> None:
    with pytest.raises(ValueError, match="site_index=3"):
        load_site_data(DataConfig(num_sites=3), seed=0, site_index=3)
    with pytest.raises(ValueError, match="site_index=-1"):
        load_site_data(DataConfig(num_sites=3), seed=0, site_index=-1)
    site = load_site_data(DataConfig(num_sites=3), seed=0, site_index=4, num_sites=5)
    assert site.name == "site-5"


def test_impossible_site_split_names_the_keys() -> None:
    config = DataConfig(num_samples=100, num_sites=50, min_site_size=2)
    with pytest.raises(ValueError) as info:
        load_site_data(config, seed=0, site_index=0)
    message = str(info.value)
    assert "data.num_sites=50" in message and "data.min_site_size=2" in message and "80 samples" in message


def test_describe_sites_sums_to_the_pool() -> None:
    config = DataConfig(num_sites=4, partition="dirichlet", alpha=0.3, num_samples=600)
    rows = describe_sites(config, seed=1)
    assert [r["name"] for r in rows] == ["site-1", "site-2", "site-3", "site-4"]
    assert sum(r["n_train"] for r in rows) == 480 and sum(r["n_test"] for r in rows) == 120
    for row in rows:
        assert sum(row["label_counts"].values()) == row["n_train"]
        assert sum(row["test_label_counts"].values()) == row["n_test"]
        assert set(row["label_counts"]) == {0, 1}


def _fresh(code: str) -> str:
    """stdout of ``code`` in a fresh interpreter (nothing of federation.data loaded yet)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_builtin_datasets_register_on_first_use_and_a_user_override_wins() -> None:
    # In a fresh interpreter that imported a dataset module first, the registry fills
    # itself on its first use; a replacement registered before any lookup (that first
    # use) is not overwritten by the built-in of the same name.
    code = (
        "import numpy as np\n"
        "import federation.data.heart\n"
        "from federation.config.schema import DataConfig\n"
        "from federation.data import DatasetSplits, available_datasets, load_dataset, register_dataset\n"
        "def mine(*, config, data_dir, seed):\n"
        "    x = np.zeros((4, 1, 8, 8), np.float32); y = np.array([0, 1, 0, 1])\n"
        "    return DatasetSplits(name='synthetic', train_images=x, train_labels=y, test_images=x, test_labels=y,\n"
        "                         num_classes=2, in_channels=1, md5=None, label_names=('a', 'b'))\n"
        "register_dataset('synthetic', mine, replace=True)\n"
        "print(' '.join(available_datasets()))\n"
        "print(len(load_dataset(DataConfig(dataset='synthetic', image_size=8), seed=0).train_labels))\n"
    )
    names, size = _fresh(code).splitlines()
    assert names.split() == [
        "adrenalmnist3d", "breastmnist", "dicom", "dicom_seg", "dicom_volume", "heart_disease", "msd_hippocampus",
        "nifti", "pneumoniamnist", "retinamnist", "synthetic", "synthetic_seg"]
    assert size == "4"


def test_lazy_package_names() -> None:
    import federation.data as data
    from federation._lazy import lazy_exports

    assert {"load_site_data", "register_dataset", "resolve_data_dir"} <= set(dir(data)) and "SiteData" in data.__all__
    with pytest.raises(AttributeError, match="'federation.data' has no attribute 'load_sites'"):
        data.load_sites  # noqa: B018 - the attribute access is the test
    with pytest.raises(ValueError, match="'f' exported by both a.b and a.c"):
        lazy_exports("a", {"a.b": ("f",), "a.c": ("f", "g")})
