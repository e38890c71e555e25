"""Why medfed's pooled Fed-Heart-Disease baseline is 0.02 below FLamby's (docs/RESULTS.md).

FLamby trains its pooled model on features standardised with the *pooled* training
statistics, but evaluates it on each center's test split standardised with *that
center's* statistics. medfed's pooled baseline trains on the sites' data as the
sites hold it (each standardised with its own statistics, train and test alike).
This script runs FLamby's pooled protocol (logistic regression, sigmoid + BCE,
Adam lr 0.001, batch 4, 50 epochs) both ways, in plain torch:

    python bench/heart_pooled_normalisation.py [--seeds 5] [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from federation.data.heart import HEART_CENTERS, encode_features, read_center, split_center  # noqa: E402


def _standardise(reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    return (values - reference.mean(0)) / (reference.std(0, ddof=1) + 1e-9)


def _train_and_score(x_train: np.ndarray, y_train: np.ndarray, tests: list[tuple[np.ndarray, np.ndarray]],
                     seed: int) -> float:
    torch.manual_seed(seed)
    linear = torch.nn.Linear(x_train.shape[1], 1)
    optimizer = torch.optim.Adam(linear.parameters(), lr=0.001)
    x, y = torch.tensor(x_train, dtype=torch.float32), torch.tensor(y_train, dtype=torch.float32)
    order = torch.Generator().manual_seed(seed)
    for _ in range(50):
        perm = torch.randperm(len(x), generator=order)
        for start in range(0, len(x), 4):
            idx = perm[start : start + 4]
            loss = torch.nn.functional.binary_cross_entropy(torch.sigmoid(linear(x[idx])[:, 0]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        scores = [float(((torch.sigmoid(linear(torch.tensor(xt, dtype=torch.float32))[:, 0]) > 0.5).numpy()
                         == yt).mean()) for xt, yt in tests]
    return float(np.mean(scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sites = []
    for stem, _name, _md5 in HEART_CENTERS:
        path = args.data_dir / f"processed.{stem}.data"
        columns, num = read_center(path)
        features, labels = encode_features(columns, path=path), (num > 0).astype(np.int64)
        train, test = split_center(labels)
        sites.append((features[train], labels[train], features[test], labels[test]))
    y_train = np.concatenate([s[1] for s in sites]).astype(np.float32)
    tests = [(_standardise(s[0], s[2]), s[3]) for s in sites]
    pooled_raw = np.concatenate([s[0] for s in sites])
    variants = {
        "FLamby: pooled statistics for training, each site's for its test split":
            _standardise(pooled_raw, pooled_raw),
        "medfed: each site's own statistics for its training and test split":
            np.concatenate([_standardise(s[0], s[0]) for s in sites]),
    }
    for name, x_train in variants.items():
        scores = [_train_and_score(x_train, y_train, tests, seed) for seed in range(args.seeds)]
        print(f"{name}: mean per-site test accuracy {np.mean(scores):.3f} ± {np.std(scores, ddof=1):.3f} "
              f"({args.seeds} seeds)")


if __name__ == "__main__":
    main()
