"""Research scenarios: quantity/natural partitions, MONAI acquisition shifts, Heart Disease, 3-D, logreg."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.transforms import AdjustContrast

from federation.config import ConfigError, DataConfig, load_config
from federation.data import describe_sites, load_dataset, load_site_data, site_partitions
from federation.data.heart import HEART_FEATURES, load_heart_disease, read_center
from federation.data.shift import (
    SHIFT_COMPONENTS,
    AcquisitionProfile,
    acquisition_profile,
    adjust_contrast_per_image,
    apply_acquisition_shift,
    parse_components,
    shift_site_images,
)
from federation.data.skew import partition_quantity, quantity_shares
from federation.models import build_model
from federation.privacy import SitePrivacy
from federation.training import train_local
from federation.training.schedule import round_learning_rate, site_train_config, with_site_schedule


def _covers_once(parts: list[np.ndarray], n: int) -> None:
    merged = np.concatenate(parts)
    assert len(merged) == n and np.array_equal(np.sort(merged), np.arange(n))


# ----------------------------------------------------------------- quantity skew


def test_quantity_shares_from_fractions_and_power_law() -> None:
    np.testing.assert_allclose(quantity_shares(num_sites=3, fractions="5,3,2"), [0.5, 0.3, 0.2])
    np.testing.assert_allclose(quantity_shares(num_sites=3, exponent=1.0), np.array([1, 1 / 2, 1 / 3]) / (11 / 6))
    np.testing.assert_allclose(quantity_shares(num_sites=4, exponent=0.0), [0.25] * 4)
    with pytest.raises(ValueError, match="lists 2 sizes but data.num_sites=3"):
        quantity_shares(num_sites=3, fractions="1,2")
    with pytest.raises(ValueError, match="must all be > 0"):
        quantity_shares(num_sites=2, fractions="1,0")


def test_quantity_partition_is_deterministic_exact_and_keeps_every_sample_once() -> None:
    labels = np.arange(1000) % 3
    parts = partition_quantity(labels, shares=quantity_shares(num_sites=3, fractions="0.5,0.3,0.2"), seed=7,
                               min_site_size=2)
    assert [len(p) for p in parts] == [500, 300, 200]
    _covers_once(parts, 1000)
    again = partition_quantity(labels, shares=quantity_shares(num_sites=3, fractions="0.5,0.3,0.2"), seed=7,
                               min_site_size=2)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition_quantity(labels, shares=quantity_shares(num_sites=3, fractions="0.5,0.3,0.2"), seed=8,
                               min_site_size=2)
    assert not np.array_equal(parts[0], other[0])
    tiny = partition_quantity(np.zeros(20, dtype=np.int64), shares=np.array([0.97, 0.02, 0.01]), seed=0,
                              min_site_size=3)
    assert [len(p) for p in tiny] == [14, 3, 3]
    _covers_once(tiny, 20)


def test_quantity_partition_through_the_site_layer() -> None:
    config = DataConfig(num_samples=400, num_sites=4, partition="quantity", quantity_exponent=1.5)
    train, test = site_partitions(config, seed=3)
    splits = load_dataset(config, seed=3)
    _covers_once(train, len(splits.train_labels))
    _covers_once(test, len(splits.test_labels))
    sizes = [len(p) for p in train]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 2.5 * sizes[3]
    again, _ = site_partitions(config.model_copy(update={"num_samples": 400}), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(train, again))


# ----------------------------------------------------------------- feature shift


def test_acquisition_profiles_are_deterministic_per_site_and_neutral_at_zero() -> None:
    a = acquisition_profile(site_index=1, seed=0, strength=1.0)
    assert a == acquisition_profile(site_index=1, seed=0, strength=1.0)
    assert a != acquisition_profile(site_index=2, seed=0, strength=1.0)
    assert acquisition_profile(site_index=1, seed=0, strength=0.0) == AcquisitionProfile()
    only_noise = acquisition_profile(site_index=1, seed=0, strength=1.0, components=("noise",))
    assert only_noise.noise_std == a.noise_std and only_noise.gamma == 1.0 and only_noise.blur_sigma == 0.0
    assert parse_components("all") == SHIFT_COMPONENTS
    assert parse_components("noise, blur") == ("blur", "noise")
    with pytest.raises(ValueError, match="unknown component"):
        parse_components("blur,sharpen")


def test_vectorised_gamma_is_monai_adjust_contrast_per_image() -> None:
    images = torch.rand(4, 1, 8, 8)
    ours = adjust_contrast_per_image(images, gamma=1.7)
    monai = torch.stack([torch.as_tensor(AdjustContrast(gamma=1.7)(img)) for img in images])
    torch.testing.assert_close(ours, monai.as_subclass(torch.Tensor), rtol=1e-5, atol=1e-6)


def test_shift_is_deterministic_keeps_samples_and_works_in_2d_and_3d() -> None:
    rng = np.random.default_rng(0)
    images = rng.random((12, 1, 16, 16)).astype(np.float32)
    out = shift_site_images(images, site_index=2, seed=5, strength=1.0)
    assert out.shape == images.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0 and not np.allclose(out, images)
    np.testing.assert_array_equal(out, shift_site_images(images, site_index=2, seed=5, strength=1.0))
    assert not np.allclose(out, shift_site_images(images, site_index=3, seed=5, strength=1.0))
    np.testing.assert_array_equal(images, rng.__class__(np.random.PCG64(0)).random((12, 1, 16, 16)).astype(np.float32))
    identity = apply_acquisition_shift(images, profile=AcquisitionProfile(), noise_seed=0)
    np.testing.assert_allclose(identity, images, atol=1e-6)
    volumes = rng.random((3, 1, 8, 8, 8)).astype(np.float32)
    shifted = shift_site_images(volumes, site_index=0, seed=1, strength=1.0)
    assert shifted.shape == volumes.shape and not np.allclose(shifted, volumes)
    with pytest.raises(ValueError, match="tabular"):
        shift_site_images(rng.random((4, 13)).astype(np.float32), site_index=0, seed=0, strength=1.0)


def test_acquisition_shift_at_sites_keeps_the_partition_and_differs_by_site() -> None:
    plain = DataConfig(num_samples=200, num_sites=2, site_shift="none")
    shifted = plain.model_copy(update={"site_shift": "acquisition", "shift_strength": 1.0})
    assert [p.tolist() for p in site_partitions(plain, seed=1)[0]] == [
        p.tolist() for p in site_partitions(shifted, seed=1)[0]]
    for k in range(2):
        a = load_site_data(plain, seed=1, site_index=k)
        b = load_site_data(shifted, seed=1, site_index=k)
        assert a.train.tensors[0].shape == b.train.tensors[0].shape
        assert torch.equal(a.train.tensors[1], b.train.tensors[1])
        assert not torch.allclose(a.train.tensors[0], b.train.tensors[0])
        again = load_site_data(shifted, seed=1, site_index=k)
        assert torch.equal(b.test.tensors[0], again.test.tensors[0])


# ----------------------------------------------------------------- heart disease


def test_heart_preprocessing_matches_flamby(shared_data_dir: Path) -> None:
    rows = [len(read_center(shared_data_dir / f"processed.{c}.data")[1])
            for c in ("cleveland", "hungarian", "switzerland", "va")]
    assert rows == [303, 261, 46, 130]
    splits = load_heart_disease(config=DataConfig(), data_dir=shared_data_dir, seed=0)
    assert splits.train_images.shape == (486, 13) and splits.test_images.shape == (254, 13)
    assert len(HEART_FEATURES) == 13 and splits.spatial_dims == 0
    counts = [((splits.train_sites == k).sum(), (splits.test_sites == k).sum()) for k in range(4)]
    assert counts == [(199, 104), (172, 89), (30, 16), (85, 45)]  # FLamby README
    positives = [int(splits.train_labels[splits.train_sites == k].sum() + splits.test_labels[splits.test_sites == k]
                     .sum()) for k in range(4)]
    assert positives == [139, 98, 45, 101]
    # Subgroups for clinical evaluation come from the raw (unstandardised) sex and age columns.
    sex, age = splits.test_groups["sex"], splits.test_groups["age"]
    assert [np.bincount(sex[splits.test_sites == k], minlength=2).tolist() for k in range(4)] == [
        [34, 70], [19, 70], [0, 16], [3, 42]]  # [female, male] per site
    assert [(int(age[splits.test_sites == k].min()), int(age[splits.test_sites == k].max())) for k in range(4)] == [
        (34, 76), (31, 63), (46, 68), (38, 75)]
    for k in (0, 1, 3):  # standardised with the site's own training rows (Switzerland has a constant column)
        train = splits.train_images[splits.train_sites == k]
        np.testing.assert_allclose(train.mean(axis=0), 0.0, atol=1e-5)
        np.testing.assert_allclose(train.std(axis=0, ddof=1), 1.0, atol=1e-4)


def test_heart_natural_sites_through_the_config(shared_data_dir: Path) -> None:
    config = load_config(None, ["data.dataset=heart_disease", "data.partition=natural", "data.num_sites=4",
                                f"data.data_dir={shared_data_dir}"])
    sites = describe_sites(config.data, seed=0)
    assert [(s["origin"], s["n_train"] + s["n_test"]) for s in sites] == [
        ("Cleveland", 303), ("Hungary", 261), ("Switzerland", 46), ("VA Long Beach", 130)]
    assert sites[2]["label_counts"] == {0: 0, 1: 30}
    bad = config.data.model_copy(update={"num_sites": 3})
    with pytest.raises(ValueError, match="has 4 natural sites"):
        site_partitions(bad, seed=0)
    with pytest.raises(ValueError, match="needs a dataset recorded at real sites"):
        site_partitions(DataConfig(num_samples=100, partition="natural"), seed=0)
    site = load_site_data(config.data, seed=0, site_index=3)
    assert site.spatial_dims == 0 and tuple(site.train.tensors[0].shape) == (85, 13)


def test_logreg_is_flamby_logistic_regression_and_trains_with_dp(shared_data_dir: Path) -> None:
    config = load_config(None, ["model.name=logreg", "train.batch_size=4", "train.local_steps=25",
                                "train.momentum=0", "train.lr=0.01", "privacy.noise_multiplier=1.0",
                                "privacy.target_epsilon=100", "train.num_threads=1"])
    model = build_model(config.model, in_channels=13, num_classes=2, spatial_dims=0, dp=True)
    x = torch.randn(6, 13)
    logits = model(x)
    z = model.linear(x)[:, 0]
    assert torch.equal(logits[:, 0], torch.zeros(6))
    torch.testing.assert_close(torch.softmax(logits, dim=1)[:, 1], torch.sigmoid(z))
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    torch.testing.assert_close(F.cross_entropy(logits, y), F.binary_cross_entropy_with_logits(z, y.float()))
    with pytest.raises(ConfigError, match="'cnn' takes 2-D images, 3-D volumes, but the data is tabular"):
        build_model(config.model.model_copy(update={"name": "cnn"}), in_channels=13, num_classes=2,
                    spatial_dims=0, dp=True)

    data = load_site_data(DataConfig(dataset="heart_disease", partition="natural", num_sites=4,
                                     data_dir=str(shared_data_dir)), seed=0, site_index=2)  # Switzerland, 30 rows
    train = site_train_config(config.train, num_examples=len(data.train))
    privacy = SitePrivacy(config=config.privacy, num_examples=len(data.train), batch_size=4,
                          local_epochs=train.local_epochs, planned_rounds=1)
    result = train_local(model=model, dataset=data.train, config=train, privacy=privacy, seed=0)
    assert result.steps == 25 and privacy.total_steps == 25 and result.epsilon > 0


def test_local_steps_give_exactly_that_many_steps_at_every_site_size() -> None:
    train = load_config(None, ["train.local_steps=100", "train.batch_size=4"]).train
    for n in (1, 3, 4, 30, 85, 172, 199, 1000, 4708):
        site = site_train_config(train, num_examples=n)
        from federation.privacy import local_steps
        assert local_steps(num_examples=n, batch_size=4, local_epochs=site.local_epochs) == 100
    assert site_train_config(train.model_copy(update={"local_steps": 0}), num_examples=10).local_epochs == 1.0


def test_cosine_lr_schedule_decays_over_the_planned_rounds() -> None:
    config = load_config(None, ["train.lr=0.01", "train.lr_schedule=cosine", "train.lr_final=0.1", "server.rounds=5"])
    lrs = [with_site_schedule(config, num_examples=100, server_round=r).train.lr for r in range(1, 6)]
    # 0.01 * (0.1 + 0.9 * (1 + cos(pi * k / 4)) / 2), k = 0..4
    assert lrs == pytest.approx([0.01, 0.0086819805, 0.0055, 0.0023180195, 0.001])
    assert round_learning_rate(config.train, server_round=9, total_rounds=5) == pytest.approx(0.001)  # clamped
    constant = load_config(None, ["train.lr=0.01", "server.rounds=5"])
    assert with_site_schedule(constant, num_examples=100, server_round=3) is constant


# ----------------------------------------------------------------- 3-D volumes


def test_adrenalmnist3d_loads_official_volumes_and_trains_a_3d_cnn(shared_data_dir: Path) -> None:
    config = DataConfig(dataset="adrenalmnist3d", data_dir=str(shared_data_dir), num_sites=3,
                        max_train_samples=60, max_test_samples=30)
    splits = load_dataset(config.model_copy(update={"max_train_samples": 0, "max_test_samples": 0}), seed=0)
    assert splits.train_images.shape == (1188, 1, 28, 28, 28) and splits.test_images.shape == (298, 1, 28, 28, 28)
    assert np.bincount(splits.train_labels).tolist() == [929, 259] and splits.spatial_dims == 3
    site = load_site_data(config, seed=0, site_index=0)
    assert site.spatial_dims == 3 and tuple(site.train.tensors[0].shape[1:]) == (1, 28, 28, 28)
    model_config = load_config(None, ["model.width=2"]).model
    model = build_model(model_config, in_channels=1, num_classes=2, spatial_dims=site.spatial_dims, dp=True)
    assert model(site.train.tensors[0][:2]).shape == (2, 2)
