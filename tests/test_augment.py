"""train.augment (issue 21): registry parsing, determinism for seed and site, masks aligned, 2-D and 3-D."""

from __future__ import annotations

import pytest
import torch

from federation.config import ConfigError
from federation.data.augment import PRESETS, parse_augment


def _run(spec: str, images: torch.Tensor, masks: torch.Tensor | None, seed: int):
    return parse_augment(spec)(images.clone(), None if masks is None else masks.clone(),
                               generator=torch.Generator().manual_seed(seed))


def test_presets_and_lists_parse_into_registered_transforms() -> None:
    assert not parse_augment("none")
    assert [n for n, _ in parse_augment("light").steps] == ["flip", "intensity"]
    steps = parse_augment("flip(p=1, axis=0), noise(std=0.05)").steps
    assert steps == (("flip", {"p": 1.0, "axis": 0.0}), ("noise", {"p": 0.5, "std": 0.05}))
    assert set(PRESETS) == {"none", "light", "strong"}
    with pytest.raises(ConfigError, match="unknown transform 'exec'.*a list of: flip\\(p=0.5, axis=-1\\)"):
        parse_augment("exec(code=1)")
    with pytest.raises(ConfigError, match="flip has no parameter 'angle'"):
        parse_augment("flip(angle=3)")
    with pytest.raises(ConfigError, match="must be a number, got '__import__'"):
        parse_augment("noise(std=__import__)")
    with pytest.raises(ConfigError, match="must be a probability"):
        parse_augment("noise(p=2)")


@pytest.mark.parametrize("shape", [(6, 1, 16, 16), (3, 1, 8, 12, 12)])
def test_the_same_seed_gives_the_same_batch_and_another_site_another(shape: tuple[int, ...]) -> None:
    images = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    first, _ = _run("strong", images, None, seed=11)
    again, _ = _run("strong", images, None, seed=11)
    other, _ = _run("strong", images, None, seed=12)
    assert torch.equal(first, again)
    assert not torch.equal(first, other) and not torch.equal(first, images)
    assert first.shape == images.shape


def _blocky_masks(shape: tuple[int, ...]) -> torch.Tensor:
    masks = torch.zeros((shape[0], *shape[2:]), dtype=torch.uint8)
    masks[(slice(None),) + tuple(slice(2, s // 2 + 1) for s in shape[2:])] = 1
    masks[(slice(None),) + tuple(slice(s // 2 + 1, s - 2) for s in shape[2:])] = 2
    return masks


@pytest.mark.parametrize("shape", [(8, 1, 16, 16), (4, 1, 8, 16, 16)])
def test_masks_move_with_their_images(shape: tuple[int, ...]) -> None:
    masks = _blocky_masks(shape)
    images = masks.unsqueeze(1).float()  # the image is its own mask: alignment is visible exactly
    for spec in ("flip(p=0.5,axis=0),flip(p=0.5)", "rotate90(p=1)"):
        out, moved = _run(spec, images, masks, seed=3)
        assert moved.dtype == torch.uint8 and torch.equal(out[:, 0].round().to(torch.uint8), moved)
        assert not torch.equal(moved, masks)
    out, moved = _run("affine(p=1,rotate=0.3,scale=0.1,translate=0.1)", images, masks, seed=3)
    assert set(moved.unique().tolist()) <= {0, 1, 2}  # labels stay labels (nearest neighbour)
    agree = (out[:, 0].round().to(torch.uint8) == moved).float().mean()
    assert agree > 0.9 and not torch.equal(moved, masks)  # bilinear image vs nearest mask differ at edges only


def test_intensity_transforms_leave_masks_alone_and_classification_labels_pass() -> None:
    images, masks = torch.rand(4, 1, 8, 8), _blocky_masks((4, 1, 8, 8))
    out, moved = _run("intensity(p=1),gamma(p=1),noise(p=1)", images, masks, seed=1)
    assert torch.equal(moved, masks) and not torch.equal(out, images)


def test_training_applies_augmentation_reproducibly_for_a_seed() -> None:
    from torch.utils.data import TensorDataset

    from federation.config.schema import ModelConfig, TrainConfig
    from federation.models import build_model
    from federation.training import train_local

    data = TensorDataset(torch.rand(24, 1, 12, 12, generator=torch.Generator().manual_seed(0)),
                         torch.randint(0, 2, (24,), generator=torch.Generator().manual_seed(1)))
    results = []
    for augment in ("strong", "strong", "none"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(width=4), in_channels=1, num_classes=2, dp=False)
        train_local(model=model, dataset=data, config=TrainConfig(batch_size=8, augment=augment, device="cpu"),
                    privacy=None, seed=5)
        results.append(model.classifier.weight.detach().clone())
    assert torch.equal(results[0], results[1]) and not torch.equal(results[0], results[2])
