"""Lesion masks of the synthetic generator, and explanations that land on the lesion."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from federation.config import DataConfig
from federation.data import generate_synthetic, load_dataset
from federation.data.synthetic import generate_synthetic_lesions, synthetic_lesion_masks


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
