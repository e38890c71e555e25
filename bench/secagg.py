"""Secure aggregation's cost: round time and bytes per site against the plain round, at 5, 10 and 30 sites.

Run from the repository root::

    python bench/secagg.py                              # 5, 10, 30 sites x 6 rounds, 2 repeats
    python bench/secagg.py --sites 10 --repeats 5

Round time: ``medfed simulate`` (default CNN, DP-SGD, the synthetic data grown with
the federation so each site holds ``--per-site`` training images), once plain and once
with ``secagg.enabled=true``, alternating, so both see the same load; a round's time
is the gap between consecutive ``rounds.jsonl`` records, without round 1 (the actors
start, and under secure aggregation it is the round whose keys and shares need
exchanges of their own), and the run's median is kept; the ratio is taken per repeat. Bytes: every
message between the coordinator and one site in a steady round (round 2), run in-process
through the real site code (model arrays and protocol keys, ciphertexts and shares;
Flower's framing not counted), plain against secure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, Stats, loadavg, machine, ratio, say, write_json

TRAIN_FRACTION = 0.8  # the synthetic dataset keeps 20 % of its images as the test split


def round_times(sites: int, rounds: int, per_site: int, secure: bool, tmp: str, repeat: int,
                num_shares: int = 0) -> list[float]:
    """Steady round times of one ``medfed simulate`` run (round 1 left out)."""
    name = f"{'secure' if secure else 'plain'}-{sites}-{repeat}"
    overrides = [f"data.num_sites={sites}", f"server.rounds={rounds}", f"secagg.num_shares={num_shares}",
                 f"data.num_samples={int(round(per_site * sites / TRAIN_FRACTION))}", f"strategy.min_sites={sites}",
                 f"secagg.enabled={str(secure).lower()}", f"server.out_dir={tmp}", f"server.run_name={name}"]
    command = [str(Path(sys.executable).with_name("medfed")), "simulate"]
    for item in overrides:
        command += ["--set", item]
    done = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        say("\n".join(done.stderr.splitlines()[-30:]))
        raise SystemExit(f"medfed simulate failed ({name})")
    rows = [json.loads(line) for line in (Path(tmp) / name / "rounds.jsonl").read_text().splitlines() if line]
    times = [row["time"] for row in rows]
    return [b - a for a, b in zip(times[1:], times[2:])]


def payload_bytes(sites: int, num_shares: int = 0) -> dict[str, int]:
    """Bytes to and from one site in one round of the default CNN, plain and secure (in-process protocol)."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_secagg import FakeGrid, _protocol_site  # the tests' in-process grid and protocol site

    import numpy as np
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore.task_identity import TaskIdentity

    from federation.config import load_config
    from federation.models import build_model
    from federation.secagg import SecAggParams
    from strategies.secagg import SecureAggregation

    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, SUPERLINK_NODE_ID, 1  # noqa: SLF001
    config = load_config(None, [])
    model = build_model(config.model, in_channels=1, num_classes=2, dp=True)
    weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    nodes = list(range(1, sites + 1))
    grid = FakeGrid({n: _protocol_site({k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in weights.items()},
                                        100) for n in nodes})
    settings = config.secagg
    params = SecAggParams(threshold=0, clipping_range=settings.clipping_range,
                          quantization_bits=settings.quantization_bits, weighting=settings.weighting,
                          max_weight=settings.max_weight)
    sent_to: list[RecordDict] = []
    original = grid.send_and_receive
    counting = {"on": False}

    def recording(messages, *, timeout=None):
        messages = list(messages)
        if counting["on"]:
            sent_to.extend(m.content for m in messages if m.metadata.dst_node_id == nodes[0])
        return original(messages, timeout=timeout)

    grid.send_and_receive = recording
    strategy = SecureAggregation(inner=FedAvg(), params=params, num_shares=num_shares,
                                 threshold_fraction=settings.threshold, timeout=None)
    arrays = ArrayRecord({k: torch.from_numpy(v) for k, v in weights.items()})
    for server_round in (1, 2):  # round 1 exchanges keys and shares on its own; round 2 is a steady round
        counting["on"], seen = server_round == 2, len(grid.seen)
        replies = grid.send_and_receive(strategy.configure_train(server_round, arrays, ConfigRecord({}), grid))
        strategy.aggregate_train(server_round, replies)
    received = [r.content for r in grid.seen[seen:] if r.metadata.src_node_id == nodes[0]]
    model_bytes = sum(v.nbytes for v in weights.values())
    return {"plain_down": model_bytes, "plain_up": model_bytes,
            "secure_down": sum(_size(c) for c in sent_to), "secure_up": sum(_size(c) for c in received)}


def _size(content) -> int:
    total = 0
    for record in content.values():
        for value in record.values():
            if hasattr(value, "numpy"):
                total += value.numpy().nbytes
            else:
                for item in value if isinstance(value, list) else [value]:
                    total += len(item) if isinstance(item, (bytes, str)) else 8
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[5, 10, 30])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-site", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num-shares", type=int, default=0,
                        help="secagg.num_shares: share holders per site (0: every site, the default)")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args()
    results: dict = {"machine": machine(), "args": vars(args), "sites": {}}
    for sites in args.sites:
        plain, secure = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for repeat in range(args.repeats):
                load = loadavg()
                plain.append(statistics.median(round_times(sites, args.rounds, args.per_site, False, tmp, repeat)))
                secure.append(statistics.median(round_times(sites, args.rounds, args.per_site, True, tmp, repeat,
                                                            args.num_shares)))
                say(f"{sites} sites (load {load}): plain {plain[-1]:.2f} s, secure {secure[-1]:.2f} s a round")
        sizes = payload_bytes(sites, args.num_shares)
        row = {"plain": Stats(plain).as_dict(), "secure": Stats(secure).as_dict(),
               "ratio": ratio(secure, plain).as_dict(), "bytes": sizes}
        results["sites"][sites] = row
        say(f"{sites} sites: round plain {Stats(plain).fmt()}, secure {Stats(secure).fmt()}, "
            f"ratio {ratio(secure, plain).fmt('x')}; bytes per site down/up plain "
            f"{sizes['plain_down']}/{sizes['plain_up']}, secure {sizes['secure_down']}/{sizes['secure_up']}")
    write_json(args.json, results)


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    say(f"total {time.perf_counter() - started:.0f} s")
