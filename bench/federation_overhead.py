"""P1: what does federating cost on top of the sites' own training steps?

Run from the repository root (takes a few minutes; more with --repeats)::

    python bench/federation_overhead.py                        # 10 sites x 3 rounds, synthetic, DP
    python bench/federation_overhead.py --rounds 5 --repeats 3 --set data.num_samples=6000

Three things run the same federation (same config, data, model, seeds, steps),
interleaved, ``--repeats`` times:

* ``limit``: the physical limit. One plain Python process loads every site's data,
  then for each round and site calls ``federation.training.train_local`` (the
  routine the sites run, DP accountant included) on the global weights and
  averages the results. Only the ``train_local`` calls are timed: no start-up, no
  data loading, no evaluation, no messages.
* ``medfed``: ``medfed simulate`` (the real ClientApp/ServerApp on Flower's Ray
  engine, with per-site and central evaluation, checkpoints, records), timed as a
  command from start to exit.
* ``vanilla``: a minimal Flower app doing the same training with Flower's stock
  FedAvg and per-site evaluation (bench/_vanilla_flower.py), same engine, timed
  from start to exit.
* ``medfed-noeval`` (with ``--no-eval-variant``): medfed without per-round evaluation
  (``strategy.fraction_evaluate=0 server.central_eval=false``).
* ``medfed-eval-every-K`` (with ``--eval-every K``): medfed evaluating at the sites and
  centrally every K-th round and the last (``server.eval_every=K``); its steady round
  is the *mean* of rounds 2..R (evaluated and unevaluated rounds in the proportion
  the run had), so use ``--rounds`` a multiple of K.
* ``parallel``: the limit as ``W`` processes at once (``W`` = the site workers the
  engine runs, ``cores / simulation.cpus_per_site``), process ``k`` training sites
  ``k, k+W, ...`` (each averages only its own sites: the weights differ from the
  federation's, the arithmetic per step does not). A round takes the slowest
  process's share. Processes that share caches and memory bandwidth can slow
  each other down; this measures what the cores do instead of assuming ``serial / W``.

The rounds' timestamps split a federation's time into a fixed start-up part
``F`` (interpreter, imports, Ray, worker processes, data, noise calibration,
teardown) and a steady per-round cost ``P`` (median of rounds 2..R); the limit
likewise into its first round and a steady per-round ``L``. A run of ``N`` rounds
is then ``F + N P`` against ``L_1 + (N - 1) L``: the script prints that ratio for
N = the measured rounds, 10, 50 and 100, against the serial limit (one process,
back to back, as specified) and against the parallel limit (the ``parallel``
runs). The limit uses ``--limit-threads`` torch threads (default 1, what a site
worker gets with ``simulation.cpus_per_site=1``).

``--sweep`` measures runs inside a sweep instead (issue 22.4)::

    python bench/federation_overhead.py --sweep --rounds 10 --sweep-runs 4

A sweep of ``--sweep-runs`` runs of the preset (seeds 0, 1, ...; default: the
synthetic preset, its own sites) runs through ``run_sweep`` in a fresh process,
once cold (``warm=False``: every run starts and stops Ray and its site workers, as
before) and once warm (one Ray, the site workers kept from run to run). Each run's
wall time (from the sweep's "running" to its "done") splits as above into a fixed
part ``F = wall - R * P`` and ``R`` steady rounds ``P`` (median of rounds 2..R);
the fixed cost per run inside a sweep is the median ``F`` of runs 2..N (run 1 of a
warm sweep starts Ray and the workers). The ratio of a run to its sites' training
steps back to back is its wall time over the serial limit's total for the same
config (``limit`` above).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, Stats, TreeMemorySampler, loadavg, machine, ratio, say, write_json

DEFAULT_SET = ["data.num_sites=10", "server.rounds=3"]


def _config(preset: str | None, overrides: list[str], out_dir: str, run_name: str):
    from simulations.harness import resolve_config

    return resolve_config(
        config_path=preset, overrides=[*overrides, f"server.out_dir={out_dir}", f"server.run_name={run_name}"]
    )


def worker_limit(preset: str | None, overrides: list[str], threads: int, share: tuple[int, int] = (0, 1)) -> dict:
    """Train every site (of ``share = (k, W)``: sites k, k+W, ...) every round back to back; time only train_local."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)

    from federation.data import load_site_data
    from federation.models import build_model
    from federation.privacy import SitePrivacy
    from federation.training import model_state, select_device, train_local

    with tempfile.TemporaryDirectory() as tmp:
        config = _config(preset, overrides, tmp, "limit")
    n = config.data.num_sites
    sites = [load_site_data(config.data, seed=config.seed, site_index=i, num_sites=n) for i in range(n)]
    torch.manual_seed(config.seed)
    model = build_model(config.model, in_channels=sites[0].in_channels, num_classes=sites[0].num_classes,
                        dp=config.privacy.enabled)
    global_state = model_state(model)
    privacy = [
        SitePrivacy(config=config.privacy, num_examples=len(s.train), batch_size=config.train.batch_size,
                    local_epochs=config.train.local_epochs, planned_rounds=config.server.rounds)
        if config.privacy.enabled else None
        for s in sites
    ]
    device = select_device(config.train.device)
    rounds = []
    for server_round in range(1, config.server.rounds + 1):
        seconds, states, weights = 0.0, [], []
        for index, site in enumerate(sites):
            if index % share[1] != share[0]:
                continue
            model.load_state_dict(global_state)
            start = time.perf_counter()
            result = train_local(model=model, dataset=site.train, config=config.train, privacy=privacy[index],
                                 seed=config.seed * 100_003 + server_round * 1_009 + index, device=device)
            seconds += time.perf_counter() - start
            states.append(model_state(model))
            weights.append(result.num_examples)
        total = sum(weights)
        global_state = {k: sum(s[k] * (w / total) for s, w in zip(states, weights)) for k in global_state}
        rounds.append(seconds)
    workers = max(1, int((os.cpu_count() or 1) / min(config.simulation.cpus_per_site, os.cpu_count() or 1)))
    return {"rounds": rounds, "threads": torch.get_num_threads(), "workers": workers}


def _check_run(command: list[str]) -> subprocess.CompletedProcess:
    """Run a command; on failure show the end of its stderr and stop."""
    done = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        say("\n".join(done.stderr.splitlines()[-40:]))
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}")
    return done


def _round_times(rows: list[dict]) -> list[float]:
    """Durations of rounds 1..R from the cumulative times a run recorded after each round."""
    times = [row["time"] for row in sorted(rows, key=lambda r: r["round"])]
    return [b - a for a, b in zip(times, times[1:])]


def _run_medfed(preset: str | None, overrides: list[str], tmp: str, name: str) -> dict:
    command = [str(Path(sys.executable).with_name("medfed")), "simulate"]
    if preset:
        command += ["--config", preset]
    for item in [*overrides, f"server.out_dir={tmp}", f"server.run_name={name}"]:
        command += ["--set", item]
    start = time.perf_counter()
    with TreeMemorySampler(os.getpid(), interval=0.5) as memory:
        _check_run(command)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (Path(tmp) / name / "rounds.jsonl").read_text().splitlines() if line]
    return {"wall": wall, "rounds": _round_times(rows), "peak_pss_mb": memory.peak_pss / 2**20}


def _run_vanilla(preset: str | None, overrides: list[str], tmp: str) -> dict:
    times = Path(tmp) / "vanilla-times.json"
    command = [sys.executable, __file__, "--worker", "vanilla", "--times", str(times), "--sets", *overrides]
    if preset:
        command += ["--preset", preset]
    start = time.perf_counter()
    with TreeMemorySampler(os.getpid(), interval=0.5) as memory:
        _check_run(command)
    wall = time.perf_counter() - start
    rows = json.loads(times.read_text())
    return {"wall": wall, "rounds": _round_times(rows), "peak_pss_mb": memory.peak_pss / 2**20}


def _run_limit(preset: str | None, overrides: list[str], threads: int, processes: int = 1) -> dict:
    """The limit in ``processes`` processes at once (1: the serial limit); rounds = the slowest share's."""
    commands = []
    for k in range(processes):
        command = [sys.executable, __file__, "--worker", "limit", "--threads", str(threads),
                   "--share", f"{k}/{processes}", "--sets", *overrides]
        commands.append(command + (["--preset", preset] if preset else []))
    start = time.perf_counter()
    running = [subprocess.Popen(c, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for c in commands]
    shares = []
    for process in running:
        out, err = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"limit worker failed ({process.returncode}):\n{err[-2000:]}")
        shares.append(json.loads(out.strip().splitlines()[-1]))
    result = dict(shares[0])
    result["rounds"] = [max(r) for r in zip(*(s["rounds"] for s in shares))]
    result["wall"] = time.perf_counter() - start
    return result


def worker_sweep(preset: str | None, overrides: list[str], runs: int, warm: bool) -> dict:
    """Run a sweep of ``runs`` seeds through ``run_sweep`` (cold or warm); each run's wall time and rounds."""
    from simulations.sweep import load_sweep, run_sweep

    stamps: dict[str, dict[str, float]] = {}

    def on_run(run, status: str) -> None:  # noqa: ANN001
        stamps.setdefault(run.run_id, {})[status] = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="medfed-bench-sweep-") as tmp:
        privacy = _config(preset, overrides, tmp, "bench").privacy  # a sweep's runs set their DP: the preset's
        spec = Path(tmp) / "bench.yaml"
        spec.write_text(f"name: bench\nbase: {preset or 'synthetic'}\nset: [{', '.join(overrides)}]\n"
                        f"strategies: [fedavg]\nseeds: [{', '.join(str(k) for k in range(runs))}]\n"
                        f"privacy: [{f'{privacy.target_epsilon:g}' if privacy.enabled else 'off'}]\n")
        start = time.perf_counter()
        root = run_sweep(load_sweep(spec), out_dir=tmp, on_run=on_run, warm=warm)
        total = time.perf_counter() - start
        rows = []
        for run_id, times in stamps.items():
            lines = (root / "runs" / run_id / "rounds.jsonl").read_text().splitlines()
            rows.append({"run": run_id, "wall": times["done"] - times["running"],
                         "rounds": _round_times([json.loads(line) for line in lines if line])})
        report = total - max(times["done"] for times in stamps.values())
    return {"runs": rows, "sweep_wall": total, "after_last_run": report}


def _run_sweep(preset: str | None, overrides: list[str], runs: int, tmp: str, *, warm: bool) -> dict:
    """A sweep in a fresh process (its imports included, as ``medfed sweep``); its runs' times."""
    times = Path(tmp) / f"sweep-{int(warm)}.json"
    command = [sys.executable, __file__, "--worker", "sweep", "--sweep-runs", str(runs), "--warm", str(int(warm)),
               "--times", str(times), "--sets", *overrides]
    if preset:
        command += ["--preset", preset]
    start = time.perf_counter()
    _check_run(command)
    return {**json.loads(times.read_text()), "process_wall": time.perf_counter() - start}


def _sweep_fixed(runs: list[dict]) -> list[float]:
    """``F = wall - R * P`` of each run (``P``: the median of its rounds 2..R)."""
    fixed = []
    for run in runs:
        rounds = run["rounds"]
        per_round = statistics.median(rounds[1:]) if len(rounds) > 1 else rounds[0]
        fixed.append(run["wall"] - per_round * len(rounds))
    return fixed


def sweep_bench(args: argparse.Namespace) -> None:
    """``--sweep``: a run's fixed cost inside a cold and a warm sweep, and its ratio to the serial limit."""
    overrides = [f"server.rounds={args.rounds}", *args.sets]
    info = machine()
    say(f"P1 sweep overhead: {args.sweep_runs} runs of {' '.join(overrides)} "
        f"(config {args.config or 'synthetic preset'}), x{args.repeats}")
    say(f"machine: {info}")
    sweeps = ("warm",) if args.no_cold else ("cold", "warm")
    results: dict[str, list[dict]] = {"limit": [], **{name: [] for name in sweeps}}
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="medfed-bench-") as tmp:
            for name in ("limit", *sweeps):
                load = loadavg()
                if name == "limit":
                    row = _run_limit(args.config, overrides, args.limit_threads)
                else:
                    row = _run_sweep(args.config, overrides, args.sweep_runs, tmp, warm=name == "warm")
                row["load"], row["load_after"] = load, loadavg()
                results[name].append(row)
                if name == "limit":
                    say(f"  repeat {repeat + 1} limit {sum(row['rounds']):7.1f} s  load {load}")
                else:
                    say(f"  repeat {repeat + 1} {name} sweep {row['process_wall']:7.1f} s  runs "
                        f"{[round(r['wall'], 1) for r in row['runs']]}  fixed "
                        f"{[round(f, 1) for f in _sweep_fixed(row['runs'])]}  load {load}-{row['load_after']}")
    limit = statistics.median(sum(r["rounds"]) for r in results["limit"])
    summary: dict = {"limit_total": limit}
    for name in sweeps:
        later = [run for sweep in results[name] for run in sweep["runs"][1:]]  # runs 2..N of each sweep
        first = [sweep["runs"][0] for sweep in results[name]]
        fixed = _sweep_fixed(later)
        walls = [run["wall"] for run in later]
        summary[name] = {"fixed_per_run": Stats(fixed).as_dict(),
                         "first_run_fixed": Stats(_sweep_fixed(first)).as_dict(), "run_wall": Stats(walls).as_dict(),
                         "ratio_to_limit": Stats([w / limit for w in walls]).as_dict(),
                         "process_wall": Stats([s["process_wall"] for s in results[name]]).as_dict()}
        say(f"{name:5s} sweep: fixed cost per run (runs 2..{args.sweep_runs}) {Stats(fixed).fmt()}, first run's "
            f"{Stats(_sweep_fixed(first)).fmt()}; a {args.rounds}-round run {Stats(walls).fmt()} = "
            f"{Stats([w / limit for w in walls]).fmt('x')} its sites' training steps back to back ({limit:.1f} s)")
    write_json(args.json, {"machine": info, "overrides": overrides, "config": args.config, "runs": results,
                           "summary": summary})


def _model(runs: list[dict], *, limit: bool, mean: bool = False) -> tuple[float, float]:
    """``(fixed, per_round)`` of runs: steady round = median (``mean``: mean) of rounds 2..R."""
    fixed, steady = [], []
    for run in runs:
        rounds = run["rounds"]
        average = statistics.fmean if mean else statistics.median
        per_round = average(rounds[1:]) if len(rounds) > 1 else rounds[0]
        total = sum(rounds) if limit else run["wall"]
        fixed.append(total - per_round * len(rounds))
        steady.append(per_round)
    return statistics.median(fixed), statistics.median(steady)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="preset or YAML (default: the synthetic preset)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="config override, repeatable")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-eval-variant", action="store_true", help="also run medfed without per-round evaluation")
    parser.add_argument("--eval-every", type=int, default=0, metavar="K",
                        help="also run medfed with server.eval_every=K (evaluation every K-th round and the last)")
    parser.add_argument("--limit-threads", type=int, default=1,
                        help="torch threads of the limit process (default 1: what a site worker gets with "
                             "simulation.cpus_per_site=1; 0 = torch's default)")
    parser.add_argument("--sweep", action="store_true",
                        help="measure runs inside a sweep, cold and warm (the preset's own sites; see above)")
    parser.add_argument("--sweep-runs", type=int, default=4, help="runs per sweep with --sweep (default 4)")
    parser.add_argument("--no-cold", action="store_true", help="with --sweep: only the warm sweep (and the limit)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", choices=["limit", "vanilla", "sweep"], help=argparse.SUPPRESS)
    parser.add_argument("--warm", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--preset", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sets", nargs="*", default=[], dest="worker_sets", help=argparse.SUPPRESS)
    parser.add_argument("--times", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--share", default="0/1", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "limit":
        k, w = (int(x) for x in args.share.split("/"))
        print(json.dumps(worker_limit(args.preset, args.worker_sets, args.threads, share=(k, w))))
        return
    if args.worker == "sweep":
        result = worker_sweep(args.preset, args.worker_sets, args.sweep_runs, warm=bool(args.warm))
        Path(args.times).write_text(json.dumps(result))
        return
    if args.sweep:
        sweep_bench(args)
        return
    if args.worker == "vanilla":
        sys.path.insert(0, str(Path(__file__).parent))
        from _vanilla_flower import run

        with tempfile.TemporaryDirectory() as tmp:
            run(_config(args.preset, args.worker_sets, tmp, "vanilla"), args.times)
        return

    overrides = [f"data.num_sites={args.sites}", f"server.rounds={args.rounds}", *args.sets]
    variants = {"medfed": overrides, "vanilla": overrides}
    if args.no_eval_variant:
        variants["medfed-noeval"] = [*overrides, "strategy.fraction_evaluate=0", "server.central_eval=false"]
    if args.eval_every > 1:
        variants[f"medfed-eval-every-{args.eval_every}"] = [*overrides, f"server.eval_every={args.eval_every}"]
    info = machine()
    say(f"P1 federation overhead: {' '.join(overrides)} (config {args.config or 'synthetic preset'})")
    say(f"machine: {info}")
    results: dict[str, list[dict]] = {"limit": [], "parallel": [], **{name: [] for name in variants}}
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="medfed-bench-") as tmp:
            for name, sets in [("limit", overrides), ("parallel", overrides), *variants.items()]:
                load = loadavg()
                if name == "limit":
                    row = _run_limit(args.config, sets, args.limit_threads)
                elif name == "parallel":
                    row = _run_limit(args.config, sets, args.limit_threads, processes=results["limit"][0]["workers"])
                elif name == "vanilla":
                    row = _run_vanilla(args.config, sets, tmp)
                else:
                    row = _run_medfed(args.config, sets, tmp, f"{name}-{repeat}")
                row["load"] = load
                results[name].append(row)
                timed = sum(row["rounds"]) if name in ("limit", "parallel") else row["wall"]
                say(f"  repeat {repeat + 1} {name:14s} {timed:7.1f} s  rounds "
                    f"{[round(r, 1) for r in row['rounds']]}  load {load}")

    limit_total = [sum(r["rounds"]) for r in results["limit"]]
    parallel_total = [sum(r["rounds"]) for r in results["parallel"]]
    workers = results["limit"][0]["workers"]
    limit_fixed, limit_round = _model(results["limit"], limit=True)
    parallel_fixed, parallel_round = _model(results["parallel"], limit=True)
    say(f"\nlimit (train_local only, back to back, {results['limit'][0]['threads']} torch thread(s)): "
        f"{Stats(limit_total).fmt()}, steady round {limit_round:.2f} s; the engine runs {workers} site worker(s) "
        f"at a time: the same in {workers} processes at once {Stats(parallel_total).fmt()}, steady round "
        f"{parallel_round:.2f} s ({limit_round / parallel_round:.2f}x faster than serial, not {workers}x)")
    summary = {"limit": {"total": Stats(limit_total).as_dict(), "first_round_extra": limit_fixed,
                         "steady_round": limit_round, "threads": results["limit"][0]["threads"], "workers": workers},
               "parallel": {"total": Stats(parallel_total).as_dict(), "first_round_extra": parallel_fixed,
                            "steady_round": parallel_round, "processes": workers}}
    for name in variants:
        walls = [r["wall"] for r in results[name]]
        fixed, per_round = _model(results[name], limit=False, mean=name.startswith("medfed-eval-every"))
        projected = {}
        for n in sorted({args.rounds, 10, 50, 100}):
            run = fixed + n * per_round
            projected[n] = {"serial": run / (limit_fixed + n * limit_round),
                            "parallel": run / (parallel_fixed + n * parallel_round)}
        say(f"{name:14s} wall {Stats(walls).fmt()}  ratio to the serial limit {ratio(walls, limit_total).fmt('x')}, "
            f"to the parallel limit {ratio(walls, parallel_total).fmt('x')}")
        say(f"{'':14s} fixed start-up {fixed:.1f} s, steady round {per_round:.2f} s "
            f"(limit {limit_round:.2f} s serial, {parallel_round:.2f} s parallel); peak PSS "
            f"{statistics.median(r['peak_pss_mb'] for r in results[name]):.0f} MB")
        say(f"{'':14s} projected ratio (serial / parallel limit): "
            + ", ".join(f"{n} rounds {v['serial']:.2f}x / {v['parallel']:.2f}x" for n, v in projected.items()))
        summary[name] = {"wall": Stats(walls).as_dict(), "ratio": ratio(walls, limit_total).as_dict(),
                         "ratio_parallel": ratio(walls, parallel_total).as_dict(),
                         "fixed": fixed, "steady_round": per_round, "projected_ratio": projected}
    write_json(args.json, {"machine": info, "overrides": overrides, "config": args.config, "runs": results,
                           "summary": summary})


if __name__ == "__main__":
    main()
