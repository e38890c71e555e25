"""P2: the cost of DP-SGD, DP step time / non-DP step time, per model and per clipping mode.

Run from the repository root::

    python bench/dp_cost.py                                   # cnn, resnet18, densenet121; 5 repeats
    python bench/dp_cost.py --models cnn --repeats 9 --json dp_cost.json
    python bench/dp_cost.py --models resnet18 --modes hooks,medfed-ghost --threads 2
    python bench/dp_cost.py --device cuda                     # on a GPU (wall-clock ratios only)
    python bench/dp_cost.py --models unet-hippo,basic_unet-hippo,segresnet-hippo --modes hooks,medfed-ghost

One *step* is what a site does per batch: zero the gradients, forward, backward,
``optimizer.step()`` (SGD with momentum; under DP: per-sample clipping at C = 1,
Gaussian noise with sigma = 1, Poisson-style division by the expected batch size).
Every model sees a fixed batch of 64 single-channel images (28 px; DenseNet-121
needs at least 29 px and gets 32 px) with 2 classes. The segmentation models
(``*-hippo``, :data:`SEGMENTATION`) train as the ``hippo`` preset does: a batch of 8
volumes of 40 x 56 x 40 voxels, 3 classes, the segmentation task's DiceCE loss (per
sample under DP: a sample is one whole volume), width 8, instance norm.

Modes:

* ``hooks``, ``functorch``, ``ew``: Opacus' per-sample gradient modes, through
  medfed's own :func:`federation.privacy.engine.make_private`;
* ``opacus-ghost``: stock Opacus ghost clipping (``PrivacyEngine.make_private(
  grad_sample_mode="ghost")`` and its two-backward loss wrapper), with Opacus' own
  norm samplers only (medfed's are switched off for it);
* ``medfed-ghost``: medfed's ``privacy.grad_sample_mode=ghost`` (mixed ghost norms
  for convolutions, clipped sum in one backward pass), through ``make_private``;
* the baseline ``non-dp``: the same model and optimizer without Opacus.

On CPU the process first raises glibc's malloc thresholds, as a site's training
does (:func:`federation.training.device.tune_cpu_allocator`); ``--stock-malloc``
measures without that.

Repeats interleave the modes (non-DP, then each DP mode, again and again), and
each ratio pairs a DP step with the non-DP step of the same round, so both saw the
same load from other users of a shared machine. Both wall-clock time and process
CPU time (all threads) are reported; on a loaded shared machine the CPU-time ratio
is the steadier of the two.
"""

from __future__ import annotations

import argparse
import gc
import time
import warnings
from collections.abc import Callable

from _common import Stats, loadavg, machine, ratio, say, write_json

MODELS = {"cnn": 28, "resnet18": 28, "densenet121": 32}
"""Model name -> image side used."""

MODES = ("hooks", "functorch", "ew", "opacus-ghost", "medfed-ghost")

SEGMENTATION = {
    "unet-hippo": "unet",
    "basic_unet-hippo": "basic_unet",
    "segresnet-hippo": "segresnet",
}
"""Segmentation benchmark name -> registered model, built and fed as the ``hippo`` preset trains it."""
HIPPO_SHAPE, HIPPO_CLASSES, HIPPO_BATCH, HIPPO_WIDTH = (40, 56, 40), 3, 8, 8


def _build(name: str, device):
    import torch

    from federation.config.schema import ModelConfig
    from federation.models import build_model

    torch.manual_seed(0)
    if name in SEGMENTATION:
        config = ModelConfig(name=SEGMENTATION[name], norm="instance", width=HIPPO_WIDTH)
        return build_model(config, in_channels=1, num_classes=HIPPO_CLASSES, spatial_dims=3, dp=True,
                           task="segmentation").to(device)
    return build_model(ModelConfig(name=name), in_channels=1, num_classes=2, dp=True).to(device)


def _losses(name: str) -> tuple[Callable, Callable]:
    """``(batch mean loss, per-sample losses)``: cross-entropy, or the segmentation task's DiceCE."""
    import torch.nn.functional as F

    if name in SEGMENTATION:
        from federation.tasks import get_task

        task = get_task("segmentation")
        return task.loss, task.per_sample_loss
    return F.cross_entropy, lambda logits, labels: F.cross_entropy(logits, labels, reduction="none")


def _sgd(model):
    import torch

    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def _loader(images, labels):
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(images, labels), batch_size=images.shape[0])


def _plain_step(name: str, images, labels) -> Callable[[], None]:
    model = _build(name, images.device)
    optimizer = _sgd(model)
    loss, _ = _losses(name)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss(model(images), labels).backward()
        optimizer.step()

    return step


def _medfed_step(name: str, mode: str, images, labels) -> Callable[[], None]:
    """A DP step through medfed's make_private + clipped_backward (what train_local runs)."""
    from opacus.accountants import RDPAccountant

    from federation.privacy.engine import clipped_backward, make_private

    model = _build(name, images.device)
    batch = images.shape[0]
    _, per_sample = _losses(name)
    dp_model, optimizer, _ = make_private(
        accountant=RDPAccountant(), model=model, optimizer=_sgd(model), data_loader=_loader(images, labels),
        num_examples=batch, sample_rate=1.0, noise_multiplier=1.0, max_grad_norm=1.0,
        grad_sample_mode="ghost" if mode == "medfed-ghost" else mode, seed=0,
    )

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        clipped_backward(dp_model, per_sample(dp_model(images), labels))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # free per-sample gradients before the next mode runs

    return step


def _opacus_ghost_step(name: str, images, labels) -> Callable[[], None]:
    """Stock Opacus ghost clipping: its own module, loss wrapper and norm samplers."""
    import torch
    from opacus import PrivacyEngine

    from federation.privacy.fast_clipping import stock_norm_samplers

    model = _build(name, images.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine()
    with stock_norm_samplers():
        dp_model, optimizer, criterion, _ = engine.make_private(
            module=model, optimizer=_sgd(model), data_loader=_loader(images, labels),
            criterion=torch.nn.CrossEntropyLoss(), noise_multiplier=1.0, max_grad_norm=1.0,
            grad_sample_mode="ghost", poisson_sampling=False,
        )

    def step() -> None:
        with stock_norm_samplers():
            optimizer.zero_grad(set_to_none=True)
            criterion(dp_model(images), labels).backward()
            optimizer.step()

    return step


def _timed(step: Callable[[], None], sync: Callable[[], None]) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of one step (``sync`` waits for the GPU, if any)."""
    gc.collect()
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_model(
    name: str, modes: list[str], *, repeats: int, batch: int, device: str = "cpu", side: int = 0
) -> dict:
    """Time the non-DP step and every DP mode of one model, interleaved; return per-mode stats."""
    import torch

    generator = torch.Generator().manual_seed(0)
    if name in SEGMENTATION:  # the hippo preset's batches: volumes and their label maps
        side, batch = "x".join(map(str, HIPPO_SHAPE)), HIPPO_BATCH
        images = torch.randn(batch, 1, *HIPPO_SHAPE, generator=generator).to(device)
        labels = torch.randint(0, HIPPO_CLASSES, (batch, *HIPPO_SHAPE), generator=generator).to(device)
    else:
        side = side or MODELS[name]
        images = torch.randn(batch, 1, side, side, generator=generator).to(device)
        labels = torch.randint(0, 2, (batch,), generator=generator).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    steps: dict[str, Callable[[], None]] = {"non-dp": _plain_step(name, images, labels)}
    for mode in modes:
        steps[mode] = (_opacus_ghost_step(name, images, labels) if mode == "opacus-ghost"
                       else _medfed_step(name, mode, images, labels))
    wall: dict[str, list[float]] = {mode: [] for mode in steps}
    cpu: dict[str, list[float]] = {mode: [] for mode in steps}
    for step in steps.values():  # warm-up (allocator, lazy init)
        step()
    load = [loadavg()]
    for _ in range(repeats):
        for mode, step in steps.items():
            seconds, cpu_seconds = _timed(step, sync)
            wall[mode].append(seconds)
            cpu[mode].append(cpu_seconds)
        load.append(loadavg())
    result = {"image_side": side, "batch": batch, "loadavg": load, "modes": {}}
    for mode in steps:
        result["modes"][mode] = {
            "wall": Stats(wall[mode]).as_dict(),
            "cpu": Stats(cpu[mode]).as_dict(),
            "wall_ratio": ratio(wall[mode], wall["non-dp"]).as_dict(),
            "cpu_ratio": ratio(cpu[mode], cpu["non-dp"]).as_dict(),
        }
    return result


def table(results: dict) -> list[str]:
    """Markdown table: one row per model x mode."""
    rows = [
        "| model | mode | step wall s, median (min–max) | DP ÷ non-DP, wall | DP ÷ non-DP, CPU time |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, result in results.items():
        for mode, stats in result["modes"].items():
            w, wr, cr = stats["wall"], stats["wall_ratio"], stats["cpu_ratio"]
            ratio_w = "1" if mode == "non-dp" else f"**{wr['median']:.2f}×** ({wr['min']:.2f}–{wr['max']:.2f})"
            ratio_c = "1" if mode == "non-dp" else f"{cr['median']:.2f}× ({cr['min']:.2f}–{cr['max']:.2f})"
            rows.append(f"| {name} ({result['image_side']} px, batch {result['batch']}) | {mode} | {w['median']:.3f} "
                        f"({w['min']:.3f}–{w['max']:.3f}) | {ratio_w} | {ratio_c} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated: " + ", ".join([*MODELS, *SEGMENTATION]))
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (each runs every mode once)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--image-size", type=int, default=0, help="image side for every model (0 = 28, densenet 32)")
    parser.add_argument("--stock-malloc", action="store_true",
                        help="leave glibc's malloc thresholds alone (site training raises them: tune_cpu_allocator)")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    args = parser.parse_args()

    import torch

    from federation.training.device import tune_cpu_allocator

    allocator_tuned = args.device == "cpu" and not args.stock_malloc and tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m for m in args.models.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in models if m not in MODELS and m not in SEGMENTATION] + [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown model/mode {unknown}; models: {', '.join([*MODELS, *SEGMENTATION])}; "
                     f"modes: {', '.join(MODES)}")
    info = {**machine(), "torch_threads": torch.get_num_threads(), "device": args.device,
            "malloc_tuned": allocator_tuned}
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    say(f"machine: {info}")
    results = {}
    for name in models:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            results[name] = bench_model(name, modes, repeats=args.repeats, batch=args.batch, device=args.device,
                                        side=args.image_size)
        for row in table({name: results[name]})[2:]:
            say(row)
        write_json(args.json, {"machine": info, "args": vars(args), "results": results})  # partial results survive
    say("")
    for row in table(results):
        say(row)
    write_json(args.json, {"machine": info, "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
