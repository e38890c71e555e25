"""P6 (GPU): DenseNet-121 training throughput with and without DP and bf16, and a short federation on the GPU.

Called by ``bench/gpu.sh``; runs anywhere torch sees a CUDA device::

    python bench/gpu_bench.py throughput [--batch 64 --steps 10 --size 224]
    python bench/gpu_bench.py federation            # 2 sites x 2 rounds, in this process

``throughput`` times medfed's own training step (``federation.training.local._train_step``,
the function ``train_local`` runs per batch) on DenseNet-121 at ``--size`` pixels,
one grey-scale channel, 2 classes, on batches from a ``DataLoader`` (pinned CPU
memory, as in training), after ``--warmup`` steps: non-DP fp32, non-DP bf16
autocast, DP-SGD fp32 (``grad_sample_mode`` auto = what medfed picks, and Opacus'
hooks), and DP-SGD under bf16 autocast (medfed trains DP in fp32; this row only
says what bf16 would give). Images/s count the images really processed (DP
batches are Poisson-sampled).

``federation`` runs a short DP federation through the sites' own code
(``client.site.train_round``/``evaluate_round``, ``train.device=auto``) and the
server's streaming FedAvg, without Flower's transport: the path ``gpu.sh`` takes
when Ray (Flower's simulation engine) is not installed. It prints the device the
sites trained on.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _say(*parts: object) -> None:
    print(*parts, flush=True)


def throughput(args: argparse.Namespace) -> list[dict]:
    """Images/s of one configuration after warm-up."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from federation.config.schema import ModelConfig, PrivacyConfig, TrainConfig
    from federation.models import build_model
    from federation.privacy import SitePrivacy, is_empty_batch, unwrap_model
    from federation.training.local import _make_optimizer, _Tally, _train_step

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    count = args.batch * (args.steps + args.warmup) * 2
    images = torch.rand(count, 1, args.size, args.size)
    labels = torch.randint(0, 2, (count,))
    dataset = TensorDataset(images, labels)
    rows = []
    cases = [("non-DP", "fp32", None), ("non-DP", "bf16", None), ("DP", "fp32", "auto"), ("DP", "fp32", "hooks"),
             ("DP", "bf16", "auto"), ("DP", "bf16", "hooks")]
    for dp, precision, mode in cases:
        name = f"{dp} {precision}" + (f" ({mode})" if mode else "")
        try:
            torch.manual_seed(0)
            model = build_model(ModelConfig(name=args.model), in_channels=1, num_classes=2, dp=dp == "DP").to(device)
            model.train()
            optimizer = _make_optimizer([p for p in model.parameters() if p.requires_grad], TrainConfig(lr=0.01))
            loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, pin_memory=True, drop_last=True)
            private = dp == "DP"
            if private:
                privacy = SitePrivacy(config=PrivacyConfig(noise_multiplier=1.0, target_epsilon=1e9,
                                                           grad_sample_mode=mode),
                                      num_examples=count, batch_size=args.batch, local_epochs=1.0, planned_rounds=1)
                model, optimizer, loader = privacy.make_private(model=model, optimizer=optimizer, data_loader=loader,
                                                                seed=0)
            batches = iter(loader)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            seen, start = 0, None
            for step in range(args.warmup + args.steps):
                if step == args.warmup:
                    if cuda:
                        torch.cuda.synchronize()
                    start, seen = time.perf_counter(), 0
                batch = next(batches)
                tally = _Tally()
                _train_step(model=model, optimizer=optimizer, batch=batch, device=device, amp=precision == "bf16",
                            private=private, tally=tally)
                seen += 0 if is_empty_batch(batch) else int(batch[1].shape[0])
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            row = {"case": name, "images_per_s": seen / seconds, "step_ms": 1000 * seconds / args.steps,
                   "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")}
            if private:
                unwrap_model(model)
        except Exception as error:  # noqa: BLE001 - report every case, whatever breaks
            row = {"case": name, "error": f"{type(error).__name__}: {error}"[:300]}
        rows.append(row)
        if "error" in row:
            _say(f"  {name:22s} FAILED {row['error']}")
        else:
            _say(f"  {name:22s} {row['images_per_s']:9.1f} images/s  {row['step_ms']:8.1f} ms/step  "
                 f"peak {row['peak_gb']:.1f} GB")
        if cuda:
            torch.cuda.empty_cache()
    return rows


def _simulated_site(config, *, index: int, sites: int, tmp: str):
    """Site ``index`` of an in-process simulated federation (outside a simulation engine, so built directly)."""
    from pathlib import Path

    from client.site import SiteSettings

    name = f"site-{index + 1}"
    return SiteSettings(name=name, site_index=index, num_sites=sites, data_dir=config.data.data_dir,
                        state_dir=Path(tmp) / "site-state" / name, run_name="gpu", simulated=True)


def federation(args: argparse.Namespace) -> dict:
    """A short DP federation through the sites' code and the streaming FedAvg, on the GPU."""
    import torch
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    from client import cache
    from client.site import evaluate_round, train_round
    from federation.config import load_config
    from federation.data import dataset_info
    from federation.models import build_model
    from federation.training import select_device
    from strategies.streaming import aggregate_arrayrecords_streaming

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, [f"server.out_dir={tmp}", "server.run_name=gpu", f"data.num_sites={args.sites}",
                                    f"server.rounds={args.rounds}", "data.num_samples=800", "train.device=auto",
                                    "privacy.noise_multiplier=1.0", "privacy.target_epsilon=1000"])
        _say(f"  train.device=auto selects {select_device(config.train.device)}")
        info = dataset_info(config.data)
        torch.manual_seed(config.seed)
        weights = build_model(config.model, in_channels=info.in_channels, num_classes=info.num_classes,
                              dp=True).state_dict()
        history = []
        for server_round in range(1, args.rounds + 1):
            start = time.perf_counter()
            replies, seconds, devices = [], [], set()
            for index in range(args.sites):
                settings = _simulated_site(config, index=index, sites=args.sites, tmp=tmp)
                outcome = train_round(config=config, settings=settings, global_weights=weights,
                                      server_round=server_round)
                devices |= {str(p.device) for model in cache._models.values() for p in model.parameters()}
                seconds.append(outcome.metrics["seconds"])
                replies.append(RecordDict({"arrays": ArrayRecord(outcome.weights),
                                           "metrics": MetricRecord({"num-examples": outcome.metrics["num-examples"]})}))
            weights = aggregate_arrayrecords_streaming(replies, "num-examples").to_torch_state_dict()
            aucs = []
            for index in range(args.sites):
                settings = _simulated_site(config, index=index, sites=args.sites, tmp=tmp)
                aucs.append(evaluate_round(config=config, settings=settings, global_weights=weights)["auc"])
            row = {"round": server_round, "seconds": time.perf_counter() - start, "site_train_s": seconds,
                   "site_auc": aucs, "devices": sorted(devices)}
            history.append(row)
            _say(f"  round {server_round}: {row['seconds']:.1f} s, site training {[round(s, 2) for s in seconds]} s, "
                 f"site AUC {[round(a, 3) for a in aucs]}, sites trained on {row['devices']}")
        return {"rounds": history}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["throughput", "federation"])
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to try the script out")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch: this benchmark needs an NVIDIA GPU")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    _say(f"{args.what}: torch {torch.__version__}, {gpu}, device {args.device}, "
         f"model {args.model} {args.size}x{args.size}, batch {args.batch}")
    result = throughput(args) if args.what == "throughput" else federation(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
