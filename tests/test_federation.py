"""End to end: real ClientApp + ServerApp on Flower's simulation engine, tiny data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from federation.config import load_config
from federation.data import describe_sites
from federation.privacy import epsilon_for, local_steps, sample_rate_for
from server.run_dir import read_jsonl
from simulations.harness import resolve_config, simulate

pytestmark = pytest.mark.integration

#: 2 sites x 2 rounds on 160 synthetic images; fixed noise so every run accounts alike.
TINY = [
    "data.num_sites=2",
    "data.num_samples=160",
    "model.width=4",
    "train.batch_size=16",
    "strategy.min_sites=2",
    "server.rounds=2",
    "privacy.noise_multiplier=1.0",
    "privacy.target_epsilon=1000",
]


def _run(tmp_path: Path, name: str, extra: list[str] = (), resume: Path | None = None) -> Path:
    overrides = [*TINY, f"server.out_dir={tmp_path}", f"server.run_name={name}", *extra]
    if resume is not None:
        config = resolve_config(overrides=list(extra), resume=str(resume))
    else:
        config = resolve_config(overrides=overrides)
    return simulate(config)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 rounds, evaluated every 2nd round: round 1 trains only, round 2 (the last) also evaluates."""
    return _run(tmp_path_factory.mktemp("runs"), "straight", ["server.eval_every=2"])


def _steps_and_rate(run_dir: Path) -> dict[str, tuple[int, float]]:
    config = load_config(run_dir / "config.yaml")
    out = {}
    for site in describe_sites(config.data, seed=config.seed):
        n = site["n_train"]
        out[site["name"]] = (
            local_steps(num_examples=n, batch_size=config.train.batch_size, local_epochs=config.train.local_epochs),
            sample_rate_for(num_examples=n, batch_size=config.train.batch_size),
        )
    return out


def test_two_sites_two_rounds_write_the_run_directory(straight_run: Path) -> None:
    run = straight_run
    for name in ("config.yaml", "rounds.jsonl", "sites.jsonl", "privacy.jsonl", "summary.json"):
        assert (run / name).is_file(), name
    assert yaml.safe_load((run / "config.yaml").read_text())["server"]["rounds"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["round-0001.pt", "round-0002.pt"]

    rounds = read_jsonl(run / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert r["aggregated"] is True
        assert set(r["sites"]) == {"site-1", "site-2"}
        assert r["train"]["train-loss"] > 0
    # server.eval_every=2: the initial model and round 2 (the last) are evaluated, round 1 is not
    for r in (rounds[0], rounds[2]):
        assert 0.0 <= r["global"]["auc"] <= 1.0 and r["global"]["loss"] > 0
    assert rounds[2]["evaluate"]["auc"] is not None
    assert rounds[1]["global"] == {} and rounds[1]["evaluate"] == {}
    sites = read_jsonl(run / "sites.jsonl")
    assert sorted((s["round"], s["site"], s["phase"]) for s in sites) == sorted(
        [(rnd, site, "train") for rnd in (1, 2) for site in ("site-1", "site-2")]
        + [(2, site, "evaluate") for site in ("site-1", "site-2")]
    )

    # epsilon per site per round is exactly what the accountant gives for the steps taken
    privacy = read_jsonl(run / "privacy.jsonl")
    steps = _steps_and_rate(run)
    for row in privacy:
        n_steps, rate = steps[row["site"]]
        expected = epsilon_for(noise_multiplier=1.0, sample_rate=rate, steps=n_steps * row["round"], delta=1e-5)
        assert row["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert len(privacy) == 4

    # the checkpoint is the global model the last round evaluated
    ckpt = torch.load(run / "checkpoints" / "round-0002.pt", weights_only=False)
    assert ckpt["round"] == 2 and all(not k.startswith("_module.") for k in ckpt["weights"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["rounds_aggregated"] == 2
    assert summary["final_global"] == rounds[-1]["global"]
    assert set(summary["privacy"]["epsilon_per_site"]) == {"site-1", "site-2"}


def test_resume_continues_at_the_next_round(tmp_path: Path, straight_run: Path) -> None:
    first = _run(tmp_path, "resumed", ["server.rounds=1"])
    assert [r["round"] for r in read_jsonl(first / "rounds.jsonl")] == [0, 1]
    resumed = _run(tmp_path, "resumed", ["server.rounds=2"], resume=first)
    assert resumed == first

    rounds = read_jsonl(resumed / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2], "no round repeated or lost"
    assert sorted({s["round"] for s in read_jsonl(resumed / "sites.jsonl")}) == [1, 2]
    # each site's accountant continued from its disk: epsilon equals the uninterrupted run's
    eps = {(r["round"], r["site"]): r["epsilon"] for r in read_jsonl(resumed / "privacy.jsonl")}
    eps_straight = {(r["round"], r["site"]): r["epsilon"] for r in read_jsonl(straight_run / "privacy.jsonl")}
    assert eps == pytest.approx(eps_straight, rel=1e-12)
    # and training picked up the same model: the final weights match the straight run
    a = torch.load(resumed / "checkpoints" / "round-0002.pt", weights_only=False)["weights"]
    b = torch.load(straight_run / "checkpoints" / "round-0002.pt", weights_only=False)["weights"]
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_sites_refuse_a_round_beyond_their_budget_and_the_run_goes_on(tmp_path: Path) -> None:
    config = load_config(None, TINY)
    sites = describe_sites(config.data, seed=config.seed)
    budgets = []
    for site in sites:
        n_steps = local_steps(num_examples=site["n_train"], batch_size=16, local_epochs=1.0)
        rate = sample_rate_for(num_examples=site["n_train"], batch_size=16)
        one = epsilon_for(noise_multiplier=1.0, sample_rate=rate, steps=n_steps, delta=1e-5)
        two = epsilon_for(noise_multiplier=1.0, sample_rate=rate, steps=2 * n_steps, delta=1e-5)
        budgets.append((one, two))
    target = (max(b[0] for b in budgets) + min(b[1] for b in budgets)) / 2
    assert all(one < target < two for one, two in budgets), "sites too different for one budget"

    run = _run(tmp_path, "budget", [f"privacy.target_epsilon={target}"])
    rounds = read_jsonl(run / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[1]["aggregated"] is True and not rounds[1].get("refused")
    assert rounds[2]["aggregated"] is False
    assert set(rounds[2]["refused"]) == {"site-1", "site-2"}
    assert all("budget" in reason for reason in rounds[2]["refused"].values())
    privacy = read_jsonl(run / "privacy.jsonl")
    assert {r["round"] for r in privacy} == {1}
    assert max(r["epsilon"] for r in privacy) <= target
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["rounds_aggregated"] == 1
    assert not math.isnan(rounds[2]["global"]["auc"])


def test_secure_aggregation_gives_the_plain_run_within_quantization(tmp_path: Path) -> None:
    """secagg.enabled: the same seeded 3-site round, aggregated from masked updates, gives the plain model."""
    three = ["data.num_sites=3", "strategy.min_sites=3", "server.rounds=1", "server.central_eval=true"]
    plain = _run(tmp_path, "plain", three)
    secure = _run(tmp_path, "secure", [*three, "secagg.enabled=true"])
    a = torch.load(plain / "checkpoints" / "round-0001.pt", weights_only=False)["weights"]
    b = torch.load(secure / "checkpoints" / "round-0001.pt", weights_only=False)["weights"]
    step = 2 * 4.0 / 2**20  # secagg.clipping_range=4, quantization_bits=20
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= step
    auc = [json.loads((run / "summary.json").read_text())["final_global"]["auc"] for run in (plain, secure)]
    assert abs(auc[0] - auc[1]) < 0.01
    record = read_jsonl(secure / "rounds.jsonl")[-1]
    assert record["aggregated"] and sorted(record["sites"]) == ["site-1", "site-2", "site-3"]
    assert all("num-examples" not in site["train"] for site in record["sites"].values())
