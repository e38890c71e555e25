"""Lesion masks of the synthetic generator, and explanations that land on the lesion."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from monai.visualize import GradCAM

from federation.config import DataConfig
from federation.data import generate_synthetic, load_dataset
from federation.data.synthetic import generate_synthetic_lesions, synthetic_lesion_masks
from federation.inference import DEFAULT_ATTRIBUTION, Overlay, available_attributions, make_attributor, save_overlays
from federation.inference.gradcam import default_target_layer
from federation.inference.predict import explain_inputs, predict_inputs
from federation.inference.preprocess import InputImage
from federation.inference.pointing import pointing_score
from federation.models.cnn import SmallCNN


def test_lesion_masks_keep_the_images_and_mark_only_positives() -> None:
    images, labels = generate_synthetic(num_samples=200, image_size=28, seed=5)
    data = generate_synthetic_lesions(num_samples=200, image_size=28, seed=5)
    np.testing.assert_array_equal(data.images, images)
    np.testing.assert_array_equal(data.labels, labels)
    assert data.masks.dtype == np.uint8 and data.masks.shape == images.shape
    assert set(np.unique(data.masks)) == {0, 1}
    per_image = data.masks.reshape(200, -1).sum(axis=1)
    assert (per_image[labels == 0] == 0).all()
    assert (per_image[labels == 1] > 0).all()
    assert int(data.masks.sum()) == 10462  # pinned: same seed, same masks
    again = generate_synthetic_lesions(num_samples=200, image_size=28, seed=5)
    np.testing.assert_array_equal(again.masks, data.masks)
    other = generate_synthetic_lesions(num_samples=200, image_size=28, seed=6)
    assert not np.array_equal(other.masks, data.masks)


def test_lesion_masks_sit_where_the_lesions_were_drawn() -> None:
    data = generate_synthetic_lesions(num_samples=400, image_size=32, seed=1)
    pos = np.flatnonzero(data.labels == 1)
    brighter, found = 0, 0
    for i in pos:
        image, mask = data.images[i, 0], data.masks[i, 0].astype(bool)
        brighter += image[mask].mean() > image[~mask].mean()
        # A lesion is a bright blob: the peak of a band-pass (DoG) filter lies in it.
        dog = ndi.gaussian_filter(image - ndi.gaussian_filter(image, 32 * 0.3), 32 * 0.05)
        found += mask.ravel()[np.argmax(dog)]
    assert brighter / len(pos) >= 0.98
    assert found / len(pos) >= 0.9


def test_split_masks_align_with_load_dataset() -> None:
    config = DataConfig(dataset="synthetic", num_samples=300, image_size=28, max_train_samples=100, max_test_samples=40)
    splits = load_dataset(config, seed=3)
    train_masks, test_masks = synthetic_lesion_masks(config, seed=3)
    assert train_masks.shape == splits.train_images.shape and test_masks.shape == splits.test_images.shape
    for masks, labels in ((train_masks, splits.train_labels), (test_masks, splits.test_labels)):
        np.testing.assert_array_equal(masks.reshape(len(masks), -1).max(axis=1), labels)
    full = generate_synthetic_lesions(num_samples=300, image_size=28, seed=3)
    row = int(np.flatnonzero(test_masks.reshape(40, -1).sum(axis=1))[0])
    match = [j for j in range(300) if np.array_equal(full.images[j], splits.test_images[row])]
    assert len(match) == 1
    np.testing.assert_array_equal(full.masks[match[0]], test_masks[row])
    with pytest.raises(ValueError, match="data.dataset='pneumoniamnist'"):
        synthetic_lesion_masks(DataConfig(dataset="pneumoniamnist"), seed=0)


@pytest.fixture(scope="module")
def tiny_lesion_model() -> Iterator[tuple[torch.nn.Module, np.ndarray, np.ndarray]]:
    """A small CNN trained centrally for a few seconds (no DP), and held-out lesion images it calls positive."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few seconds on one thread; much slower when oversubscribed
    try:
        torch.manual_seed(0)
        data = generate_synthetic_lesions(num_samples=360, image_size=16, seed=11)
        model = SmallCNN(spatial_dims=2, in_channels=1, num_classes=2, width=8)
        x, y = torch.from_numpy(data.images[:300]), torch.from_numpy(data.labels[:300])
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(3):
            for idx in torch.randperm(300).split(32):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                optimizer.step()
        model.eval()
        with torch.no_grad():
            called = model(torch.from_numpy(data.images[300:])).argmax(dim=1).numpy() == 1
        keep = called & (data.labels[300:] == 1)
        yield model, data.images[300:][keep], data.masks[300:][keep]
    finally:
        torch.set_num_threads(threads)


def test_default_explanation_lands_on_a_planted_lesion(tiny_lesion_model) -> None:
    model, images, masks = tiny_lesion_model
    assert len(images) >= 20  # the tiny model finds most lesions
    maps = make_attributor(DEFAULT_ATTRIBUTION, model)(images, class_index=1)
    assert maps.shape == images[:, 0].shape and maps.min() >= 0.0 and maps.max() == pytest.approx(1.0)
    score = pointing_score(maps, masks)
    assert score.hit_rate >= 0.8
    assert score.mass_ratio >= 2.0


def test_occlusion_points_at_the_lesion(tiny_lesion_model) -> None:
    model, images, masks = tiny_lesion_model
    occlusion = pointing_score(make_attributor("occlusion", model)(images[:12], class_index=1), masks[:12])
    assert occlusion.hit_rate >= 0.75 and occlusion.mass_ratio >= 2.0


def test_grad_cam_is_not_flipped(tiny_lesion_model) -> None:
    """MONAI's default post-processing maps max -> 0, min -> 1; medfed's hot pixels are Grad-CAM's hottest cells."""
    model, images, _ = tiny_lesion_model
    maps = make_attributor("gradcam", model)(images, class_index=1)
    cam = GradCAM(nn_module=model, target_layers=default_target_layer(model))
    with torch.enable_grad():
        raw = cam.compute_map(torch.from_numpy(images), class_idx=1).detach()  # ReLU'd, before scaling
    upsampled = torch.nn.functional.interpolate(raw, size=images.shape[2:], mode="bilinear").numpy()[:, 0]
    for shown, reference in zip(maps, upsampled):
        assert shown.max() == pytest.approx(1.0)
        assert np.corrcoef(shown.ravel(), reference.ravel())[0, 1] > 0.99


def test_pointing_score_counts_ties_as_a_random_pick() -> None:
    masks = np.zeros((2, 4, 4), dtype=np.uint8)
    masks[:, 0, :2] = 1  # 2 of 16 pixels
    maps = np.zeros((2, 4, 4), dtype=np.float32)
    maps[0, 0, 0] = 1.0  # hit, all mass inside
    # image 1: constant map -> hit 2/16, mass = area fraction
    score = pointing_score(maps, masks)
    assert score.hit_rate == pytest.approx((1 + 2 / 16) / 2)
    assert score.mass_inside == pytest.approx((1 + 2 / 16) / 2)
    assert score.area_fraction == pytest.approx(2 / 16)
    with pytest.raises(ValueError, match="non-empty mask"):
        pointing_score(maps, np.zeros_like(masks))


def test_unknown_attribution_method_lists_the_valid_ones() -> None:
    assert available_attributions() == ["gradcam", "integrated_gradients", "occlusion"]
    with pytest.raises(ValueError, match="unknown attribution method 'lime'; choose one of: gradcam, "
                                         "integrated_gradients, occlusion"):
        make_attributor("lime", torch.nn.Linear(2, 2))


def test_overlay_figure_puts_the_image_beside_the_map_with_a_colour_bar(tmp_path) -> None:
    import matplotlib.image as mpimg

    image = np.zeros((1, 16, 16), dtype=np.float32)
    cam = np.zeros((16, 16), dtype=np.float32)
    cam[4:8, 4:8] = 1.0
    path = save_overlays([Overlay(image, cam, "a"), Overlay(image, cam, "b")], tmp_path / "o.png", label="ig")
    height, width = mpimg.imread(path).shape[:2]
    assert (width, height) == (640, 2 * 290 + 30)


def test_explain_inputs_draws_the_chosen_method_and_checks_its_options(tiny_lesion_model, tmp_path) -> None:
    model, images, _ = tiny_lesion_model
    items = [InputImage(name=f"a/{i}.png", image=images[i]) for i in range(2)]
    meta = {"label_names": ["no lesion", "lesion"], "positive_class": 1, "threshold": 0.5}
    predictions = predict_inputs(torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).eval(), items, meta=meta)
    written = explain_inputs(model, items, predictions, tmp_path, meta=meta, method="occlusion")
    assert sorted(p.name for p in written.values()) == ["a__0.png.png", "a__1.png.png"]
    with pytest.raises(ValueError, match="target layer applies to --method gradcam only, not 'occlusion'"):
        explain_inputs(model, items, predictions, tmp_path, meta=meta, method="occlusion", target_layer="features.5")
    with pytest.raises(ValueError, match="unknown attribution method 'lime'"):
        explain_inputs(model, items, predictions, tmp_path, meta=meta, method="lime")
