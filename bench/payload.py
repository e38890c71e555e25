"""P5: bytes a site exchanges per round, per model and transfer encoding; the AUC cost of quantizing.

Run from the repository root::

    python bench/payload.py                      # bytes only (seconds)
    python bench/payload.py --auc --rounds 10 --seeds 0 1 2    # + PneumoniaMNIST runs (minutes)

Bytes: for each model, the Messages of one round at one site, as Flower 1.42
sends them: the train instruction (global weights, fp32), the site's train reply
(its update in ``train.transfer_dtype``), the evaluate instruction (global
weights) and the evaluate reply (metrics only). "arrays" counts the ArrayRecord
(``ArrayRecord.count_bytes``); "wire" sums the serialized objects Flower pushes
(``Message`` and every nested record/array/chunk, ``deflate()``d, each unique
object once).

AUC: ``medfed simulate`` on PneumoniaMNIST (the ``pneumonia_dirichlet`` preset: 5
hospitals, Dirichlet(0.5) label skew, FedAvg, no DP, or ``--preset
pneumonia_dirichlet_dp``), once per seed with fp32, fp16 and int8 transfer, same
seed, same everything else; the global model's AUC on the pooled test split after
the last round, and its change against fp32 in the same seed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import REPO, Stats, loadavg, machine, say, write_json

MODELS = [("cnn", "width=16"), ("cnn", "width=32"), ("resnet10", ""), ("resnet18", ""), ("densenet121", "")]
DTYPES = ("fp32", "fp16", "int8")


def _wire_bytes(message) -> int:
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def round_bytes(model_name: str, extra: str, dtype: str) -> dict:
    """Bytes of one site's four Messages in one round."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from client.transfer import update_record
    from federation.config.schema import ModelConfig
    from federation.models import build_model

    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, SUPERLINK_NODE_ID, 1
    settings = {"name": model_name, **({extra.split("=")[0]: int(extra.split("=")[1])} if extra else {})}
    torch.manual_seed(0)
    model = build_model(ModelConfig(**settings), in_channels=1, num_classes=2, dp=True)
    global_w = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trained = {k: v + 0.01 * torch.randn_like(v) for k, v in global_w.items()}
    config = ConfigRecord({"server-round": 1, "run-name": "bench"})
    down = Message(RecordDict({"arrays": ArrayRecord(global_w), "config": config}), dst_node_id=1, message_type="train")
    reply = RecordDict({"site": ConfigRecord({"name": "site-1"}),
                        "arrays": update_record(trained, global_w, transfer_dtype=dtype),
                        "metrics": MetricRecord({"num-examples": 470.0, "train-loss": 0.4, "epsilon": 3.2,
                                                 "delta": 1e-5, "noise-multiplier": 1.1, "steps": 15.0,
                                                 "seconds": 4.2})})
    up = Message(reply, reply_to=down)
    down_eval = Message(RecordDict({"arrays": ArrayRecord(global_w), "config": config}), dst_node_id=1,
                        message_type="evaluate")
    up_eval = Message(RecordDict({"site": ConfigRecord({"name": "site-1"}),
                                  "metrics": MetricRecord({"num-examples": 120.0, "loss": 0.4, "auc": 0.9,
                                                           "accuracy": 0.8})}), reply_to=down_eval)
    params = sum(v.numel() for v in global_w.values())
    return {
        "model": f"{model_name}{'-' + extra if extra else ''}", "params": params, "dtype": dtype,
        "up_arrays": reply["arrays"].count_bytes(), "up_wire": _wire_bytes(up),
        "down_arrays": down.content["arrays"].count_bytes(), "down_wire": _wire_bytes(down),
        "eval_wire": _wire_bytes(down_eval) + _wire_bytes(up_eval),
    }


def auc_run(preset: str, dtype: str, seed: int, rounds: int, extra: list[str], tmp: str) -> dict:
    """Final and per-round global AUC of one ``medfed simulate`` run."""
    name = f"{dtype}-{seed}"
    command = [str(Path(sys.executable).with_name("medfed")), "simulate", "--config", preset]
    for item in [f"seed={seed}", f"server.rounds={rounds}", f"train.transfer_dtype={dtype}", *extra,
                 f"server.out_dir={tmp}", f"server.run_name={name}"]:
        command += ["--set", item]
    done = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        say("\n".join(done.stderr.splitlines()[-40:]))
        raise SystemExit(f"medfed simulate failed ({dtype}, seed {seed})")
    rows = [json.loads(line) for line in (Path(tmp) / name / "rounds.jsonl").read_text().splitlines() if line]
    aucs = [row["global"]["auc"] for row in rows]
    return {"final_auc": aucs[-1], "aucs": aucs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--auc", action="store_true", help="also measure the AUC cost on PneumoniaMNIST")
    parser.add_argument("--preset", default="pneumonia_dirichlet")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra config override")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    info = machine()
    say(f"P5 payload, machine: {info}")
    rows = [round_bytes(name, extra, dtype) for name, extra in MODELS for dtype in DTYPES]
    say(f"{'model':15s} {'params':>11s} {'dtype':5s} {'up arrays':>12s} {'up wire':>12s} {'down wire':>12s} "
        f"{'site/round':>12s} {'up vs fp32':>10s}")
    fp32_up = {r["model"]: r["up_wire"] for r in rows if r["dtype"] == "fp32"}
    for r in rows:
        total = r["up_wire"] + r["down_wire"] + r["eval_wire"]
        say(f"{r['model']:15s} {r['params']:11,d} {r['dtype']:5s} {r['up_arrays']:12,d} {r['up_wire']:12,d} "
            f"{r['down_wire']:12,d} {total:12,d} {r['up_wire'] / fp32_up[r['model']]:9.3f}x")
    result = {"machine": info, "bytes": rows}

    if args.auc:
        say(f"\nAUC cost: preset {args.preset}, {args.rounds} rounds, seeds {args.seeds}, overrides {args.sets}")
        runs: dict[str, list[dict]] = {dtype: [] for dtype in DTYPES}
        with tempfile.TemporaryDirectory(prefix="medfed-payload-") as tmp:
            for seed in args.seeds:
                for dtype in DTYPES:
                    load = loadavg()
                    run = auc_run(args.preset, dtype, seed, args.rounds, args.sets, tmp)
                    run["load"] = load
                    runs[dtype].append(run)
                    say(f"  seed {seed} {dtype}: final global AUC {run['final_auc']:.4f} (load {load})")
        for dtype in DTYPES:
            final = Stats([r["final_auc"] for r in runs[dtype]])
            drop = Stats([a["final_auc"] - b["final_auc"] for a, b in zip(runs["fp32"], runs[dtype])])
            worst_round = max(max(abs(x - y) for x, y in zip(a["aucs"], b["aucs"]))
                              for a, b in zip(runs["fp32"], runs[dtype]))
            say(f"{dtype}: final AUC {final.fmt('', 4)}; AUC drop vs fp32 (same seed) {drop.fmt('', 4)}; "
                f"largest per-round |difference| {worst_round:.4f}")
            result.setdefault("auc", {})[dtype] = {"final": final.as_dict(), "drop": drop.as_dict(),
                                                   "max_round_diff": worst_round, "runs": runs[dtype]}
    write_json(args.json, result)


if __name__ == "__main__":
    main()
