"""What ``train.augment`` adds to a CPU training step (issue 21; target: ``light`` <= 10 %).

Times whole local rounds of :func:`federation.training.train_local` (the site's own
code path) on 28-px single-channel images, ``cnn`` width 32, batch 64 (the
PneumoniaMNIST presets), without and with DP-SGD, for ``none``, ``light`` and
``strong``, interleaved and repeated so that a loaded machine's noise hits every
setting alike; reports the per-step minimum and median. Also times MONAI's own
per-sample dictionary transforms on one image, for comparison.

    python bench/augment_cost.py [--repeats 5] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import TensorDataset

from federation.config.schema import ModelConfig, PrivacyConfig, TrainConfig
from federation.models import build_model
from federation.privacy import SitePrivacy
from federation.training import train_local

SETTINGS = ("none", "light", "strong")


def _round_seconds(*, augment: str, dp: bool, data: TensorDataset, steps: int) -> float:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="cnn", width=32), in_channels=1, num_classes=2, dp=dp)
    epochs = steps * 64 / len(data)
    config = TrainConfig(batch_size=64, local_epochs=epochs, augment=augment, device="cpu", lr=0.05)
    privacy = None
    if dp:
        privacy = SitePrivacy(config=PrivacyConfig(noise_multiplier=1.0, target_epsilon=1e6), num_examples=len(data),
                              batch_size=64, local_epochs=epochs, planned_rounds=1)
    started = time.perf_counter()
    result = train_local(model=model, dataset=data, config=config, privacy=privacy, seed=1, noise_source="seeded")
    return (time.perf_counter() - started) / result.steps


def _monai_per_sample() -> dict[str, float]:
    from monai.transforms import RandAffined, RandFlipd, RandScaleIntensityd

    image = {"image": torch.rand(1, 28, 28)}
    out = {}
    for name, transform in (("RandFlipd", RandFlipd(keys="image", prob=1.0)),
                            ("RandScaleIntensityd", RandScaleIntensityd(keys="image", factors=0.1, prob=1.0)),
                            ("RandAffined", RandAffined(keys="image", prob=1.0, rotate_range=0.26, scale_range=0.1))):
        started = time.perf_counter()
        for _ in range(50):
            transform(dict(image))
        out[name] = (time.perf_counter() - started) / 50 * 1000
    return out


def _isolated(*, repeats: int) -> dict[str, float]:
    """Minimum ms of one plain ``cnn`` step and of each preset on its batch, timed call by call.

    The minimum over many single calls is what a loaded machine distorts least.
    """
    from federation.data.augment import parse_augment

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="cnn", width=32), in_channels=1, num_classes=2, dp=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images, labels = torch.rand(64, 1, 28, 28), torch.randint(0, 2, (64,))
    generator = torch.Generator().manual_seed(0)
    out: dict[str, list[float]] = {"step": [], "light": [], "strong": []}
    for _ in range(repeats):
        started = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        out["step"].append(time.perf_counter() - started)
        for preset in ("light", "strong"):
            augmentation = parse_augment(preset)
            started = time.perf_counter()
            augmentation(images, None, generator=generator)
            out[preset].append(time.perf_counter() - started)
    return {k: min(v) * 1000 for k, v in out.items()}


def main() -> None:
    """Print a Markdown table of per-step times."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(640, 1, 28, 28, generator=generator),
                         torch.randint(0, 2, (640,), generator=generator))
    times: dict[tuple[bool, str], list[float]] = {(dp, a): [] for dp in (False, True) for a in SETTINGS}
    for _ in range(args.repeats):
        for key in times:
            times[key].append(_round_seconds(augment=key[1], dp=key[0], data=data, steps=args.steps))
    print(f"threads {torch.get_num_threads()}, {args.repeats} repeats x {args.steps} steps, batch 64, cnn width 32\n")
    print("| training | augment | ms/step (min) | ms/step (median) | vs none (min) | vs none (median) |")
    print("|---|---|---:|---:|---:|---:|")
    for (dp, augment), values in times.items():
        base = times[(dp, "none")]
        lo, med = min(values), statistics.median(values)
        print(f"| {'DP-SGD' if dp else 'plain'} | {augment} | {lo * 1000:.1f} | {med * 1000:.1f} | "
              f"{(lo / min(base) - 1) * 100:+.1f} % | {(med / statistics.median(base) - 1) * 100:+.1f} % |")
    iso = _isolated(repeats=max(30, args.repeats * 10))
    print(f"\nisolated minima: plain step {iso['step']:.1f} ms; augmentation of its batch: light {iso['light']:.2f} ms "
          f"({iso['light'] / iso['step'] * 100:.1f} % of the step), strong {iso['strong']:.2f} ms "
          f"({iso['strong'] / iso['step'] * 100:.1f} %)")
    print("\nMONAI per-sample dictionary transforms, ms per 28-px image:",
          ", ".join(f"{k} {v:.2f}" for k, v in _monai_per_sample().items()))


if __name__ == "__main__":
    main()
