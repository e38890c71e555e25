"""P4: aggregating 100 replies of a DenseNet-121-sized model: time and memory, streaming vs Flower.

Run from the repository root::

    python bench/aggregation.py                  # 100 replies, 5 timed repeats
    python bench/aggregation.py --replies 30 --repeats 3 --json out.json

Baseline: Flower 1.42's own ``FedAvg.aggregate_train`` (``aggregate_arrayrecords``).
Candidate: medfed's ``StreamingFedAvg`` (what ``strategy.name=fedavg`` builds).
Both get the same list of reply Messages, as ``Grid.send_and_receive`` hands them
over. Timing repeats alternate the two in one process (paired ratios); memory is
measured in a fresh process per strategy: the peak resident set during the call
above the resident set before it (``VmHWM`` reset through ``/proc/self/clear_refs``),
and the peak of Python/NumPy allocations traced by ``tracemalloc``.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tracemalloc

from _common import Stats, loadavg, machine, peak_rss, ratio, reset_peak_rss, rss_now, say, timed, write_json

MB = 1 << 20


def _replies(count: int):
    """``count`` train replies holding DenseNet-121 (1 channel, 2 classes) weights, different per reply."""
    import numpy as np
    import torch
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from federation.config.schema import ModelConfig
    from federation.models import build_model

    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, SUPERLINK_NODE_ID, 1
    torch.manual_seed(0)
    state = build_model(ModelConfig(name="densenet121"), in_channels=1, num_classes=2, dp=True).state_dict()
    base = {name: tensor.numpy() for name, tensor in state.items()}
    rng = np.random.default_rng(0)
    replies = []
    for node in range(1, count + 1):
        factor = np.float32(1.0 + 0.01 * rng.standard_normal())
        arrays = ArrayRecord({name: Array(value * factor) for name, value in base.items()})
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": int(rng.integers(50, 500))})})
        instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
        replies.append(Message(content, reply_to=instruction))
    params = sum(v.size for v in base.values())
    return replies, params, sum(v.nbytes for v in base.values())


def _strategies():
    import logging

    from flwr.serverapp.strategy import FedAvg

    from strategies import streaming

    class OneThread(streaming.StreamingFedAvg):
        def aggregate_train(self, server_round, replies):
            valid, _ = self._check_and_log_replies(replies, is_train=True)
            contents = [msg.content for msg in valid]
            return streaming.aggregate_arrayrecords_streaming(contents, self.weighted_by_key, workers=1), None

    logging.getLogger("flwr").setLevel(logging.WARNING)
    return {"flower": FedAvg(), "streaming": streaming.StreamingFedAvg(), "streaming-1thread": OneThread()}


def worker_timing(count: int, repeats: int) -> dict:
    """Alternate the two aggregations ``repeats`` times on one set of replies; check equality."""
    replies, params, model_bytes = _replies(count)
    strategies = _strategies()
    times: dict[str, list[float]] = {name: [] for name in strategies}
    results = {}
    for _ in range(repeats):
        for name, strategy in strategies.items():
            gc.collect()
            seconds, (arrays, _) = timed(strategy.aggregate_train, 1, replies)
            times[name].append(seconds)
            results[name] = arrays
    same = all(
        results["flower"][k].numpy().tobytes() == results["streaming"][k].numpy().tobytes() for k in results["flower"]
    )
    return {"params": params, "model_mb": model_bytes / MB, "times": times, "identical": same, "load": loadavg()}


def worker_memory(count: int, name: str) -> dict:
    """Peak RSS and traced allocations of one aggregation, in a fresh process."""
    replies, _, model_bytes = _replies(count)
    strategy = _strategies()[name]
    gc.collect()
    before = rss_now()
    resettable = reset_peak_rss()
    seconds, _ = timed(strategy.aggregate_train, 1, replies)
    rss_peak = peak_rss() - before if resettable else float("nan")
    gc.collect()
    tracemalloc.start()
    strategy.aggregate_train(1, replies)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"rss_peak_mb": rss_peak / MB, "traced_peak_mb": traced_peak / MB, "model_mb": model_bytes / MB,
            "replies_rss_mb": before / MB, "first_call_s": seconds}


def _run_worker(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replies", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind = args.worker[0]
        result = worker_timing(args.replies, args.repeats) if kind == "timing" else worker_memory(args.replies, kind)
        print(json.dumps(result))
        return

    info = machine()
    say(f"P4 aggregation: {args.replies} replies of DenseNet-121, machine {info}")
    timing = _run_worker("timing", "--replies", str(args.replies), "--repeats", str(args.repeats))
    memory = {name: _run_worker(name, "--replies", str(args.replies)) for name in ("flower", "streaming")}
    flower, streaming = Stats(timing["times"]["flower"]), Stats(timing["times"]["streaming"])
    speedup = ratio(timing["times"]["flower"], timing["times"]["streaming"])
    say(f"model: {timing['params']:,} parameters, {timing['model_mb']:.1f} MB per reply; "
        f"results bit-identical: {timing['identical']}; load during timing {timing['load']}")
    say(f"time   Flower FedAvg    {flower.fmt()}")
    say(f"time   StreamingFedAvg  {streaming.fmt()}   speed-up {speedup.fmt('x')} "
        f"(default threads: min(4, cores))")
    one = Stats(timing["times"]["streaming-1thread"])
    say(f"time   streaming, 1 thread {one.fmt()}   speed-up "
        f"{ratio(timing['times']['flower'], timing['times']['streaming-1thread']).fmt('x')}")
    for name, row in memory.items():
        say(f"memory {name:9s} peak RSS above the held replies {row['rss_peak_mb']:.0f} MB, "
            f"traced allocations peak {row['traced_peak_mb']:.0f} MB "
            f"({row['traced_peak_mb'] / row['model_mb']:.2f} x model; replies held: {row['replies_rss_mb']:.0f} MB RSS)")
    write_json(args.json, {"machine": info, "replies": args.replies, "timing": timing, "memory": memory,
                            "flower": flower.as_dict(), "streaming": streaming.as_dict(),
                            "speedup": speedup.as_dict()})


if __name__ == "__main__":
    main()
