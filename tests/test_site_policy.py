"""Site policy, privacy ledger and audit log: a hospital's own limits, enforced at the site.

Epsilons are pinned: site-1 of the tiny synthetic federation below holds 64 training
images, so with batch 16 and noise 1.0 one round is 4 DP-SGD steps at q = 0.25, and
the RDP accountant gives ``EPS_1`` after one round and ``EPS_2`` after two.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from rich.console import Console
from typer.testing import CliRunner

import client.site_cli as site_cli
from client.admission import admit_train_round, evaluate_refusal
from client.app import app
from client.audit import read_audit
from client.guard import EVALUATE_METRICS, REFUSAL_CODES
from client.handling import SitePolicyInvalid
from client.ledger import LedgerError, PrivacyLedger
from client.policy import PolicyError, SitePolicy, load_policy, parse_policy, policy_source
from federation.config import load_config, to_flat
from federation.models import build_model
from federation.privacy import SitePrivacy, epsilon_for

EPS_1 = 4.870641742929558  # epsilon_for(noise 1.0, q 0.25, 4 steps, delta 1e-5)
EPS_2 = 6.253144612851234  # same, 8 steps
TINY = [
    "data.num_sites=2", "data.num_samples=160", "model.width=4", "train.batch_size=16",
    "privacy.noise_multiplier=1.0", "privacy.target_epsilon=1000",
]


def test_pinned_epsilons() -> None:
    assert epsilon_for(noise_multiplier=1.0, sample_rate=0.25, steps=4, delta=1e-5) == pytest.approx(EPS_1, rel=1e-12)
    assert epsilon_for(noise_multiplier=1.0, sample_rate=0.25, steps=8, delta=1e-5) == pytest.approx(EPS_2, rel=1e-12)


def _policy(**values) -> SitePolicy:
    return SitePolicy(**{"lifetime_epsilon": 100.0, "lifetime_delta": 1e-3, **values})


def _privacy(config) -> SitePrivacy:
    return SitePrivacy(config=config.privacy, num_examples=64, batch_size=16, local_epochs=1.0, planned_rounds=5)


def _admit(tmp_path: Path, policy: SitePolicy | None, *overrides: str, run: str = "r", server_round: int = 1,
           ledger: PrivacyLedger | None = None, privacy: SitePrivacy | None = None):
    config = load_config(None, [*TINY, *overrides])
    ledger = ledger or PrivacyLedger.open(tmp_path)
    if privacy is None and config.privacy.enabled:
        privacy = _privacy(config)
    return admit_train_round(policy=policy, ledger=ledger, config=config, privacy=privacy, run=run,
                             server_round=server_round, run_id=11)


# ---------------------------------------------------------------- ledger at the budget
def test_lifetime_budget_refuses_exactly_beyond_it(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path)
    ledger.commit("earlier", epsilon=1.5, delta=1e-5, server_round=3, run_id=1)
    # the round that reaches the budget exactly is allowed, and reserves its epsilon
    admitted = _admit(tmp_path, _policy(lifetime_epsilon=1.5 + EPS_1), ledger=ledger)
    assert admitted.refusal is None
    assert admitted.lifetime_epsilon_before == pytest.approx(1.5)
    assert admitted.lifetime_epsilon_after == pytest.approx(1.5 + EPS_1, rel=1e-12)
    assert PrivacyLedger.open(tmp_path).runs["r"].reserved == pytest.approx(EPS_1, rel=1e-12)
    # a budget a hair below it refuses, naming both numbers
    ledger_b = PrivacyLedger.open(tmp_path / "c")
    ledger_b.commit("earlier", epsilon=1.5, delta=1e-5, server_round=3)
    refused = _admit(tmp_path / "c", _policy(lifetime_epsilon=1.5 + EPS_1 - 1e-4), ledger=ledger_b)
    assert refused.refusal == (
        f"lifetime-epsilon: lifetime epsilon spent 1.5000, this round would reach {1.5 + EPS_1:.4f}, "
        f"the site's lifetime budget is {1.5 + EPS_1 - 1e-4:g}"
    )
    assert "r" not in PrivacyLedger.open(tmp_path / "c").runs, "a refused round reserves nothing"


def test_second_round_of_a_run_counts_the_run_once(tmp_path: Path) -> None:
    config = load_config(None, TINY)
    privacy = _privacy(config)
    ledger = PrivacyLedger.open(tmp_path)
    assert _admit(tmp_path, _policy(lifetime_epsilon=EPS_2), ledger=ledger, privacy=privacy).refusal is None
    privacy.record_steps(4)  # round 1 trained
    ledger.commit("r", epsilon=privacy.epsilon_spent(), delta=1e-5, server_round=1)
    assert PrivacyLedger.open(tmp_path).spent_epsilon() == pytest.approx(EPS_1, rel=1e-12)
    # round 2 reaches EPS_2 exactly (not EPS_1 + EPS_2): allowed at EPS_2, refused just below
    assert _admit(tmp_path, _policy(lifetime_epsilon=EPS_2), server_round=2, ledger=ledger,
                  privacy=privacy).refusal is None
    refused = _admit(tmp_path, _policy(lifetime_epsilon=EPS_2 - 1e-3), server_round=2, ledger=ledger, privacy=privacy)
    assert refused.refusal is not None and refused.refusal.startswith("lifetime-epsilon: ")
    assert f"would reach {EPS_2:.4f}" in refused.refusal


def test_lifetime_delta_adds_up_over_runs(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path)
    for name in ("a", "b"):
        ledger.commit(name, epsilon=0.5, delta=1e-5, server_round=1)
    assert ledger.spent_delta() == pytest.approx(2e-5)
    assert _admit(tmp_path, _policy(lifetime_delta=3e-5), ledger=ledger).refusal is None
    refused = _admit(tmp_path, _policy(lifetime_delta=2.5e-5), ledger=ledger)
    assert refused.refusal == ("lifetime-delta: lifetime delta would reach 3e-05 with this run's delta 1e-05, "
                               "the site's lifetime delta is 2.5e-05")


def test_ledger_is_atomic_json_and_never_reset(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path)
    ledger.reserve("run-1", epsilon=2.0, delta=1e-5, run_id=5)
    ledger.commit("run-1", epsilon=1.75, delta=1e-5, server_round=4, run_id=6)
    stored = json.loads((tmp_path / "ledger.json").read_text())
    entry = stored["runs"]["run-1"]
    assert (entry["epsilon"], entry["reserved"], entry["rounds"], entry["last_round"], entry["run_ids"]) == (
        1.75, 0.0, 1, 4, [5, 6])
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"], "no temporary file left behind"
    (tmp_path / "ledger.json").write_text('{"format": "medfed-ledger-v1", "runs": {"x": {"epsilon": -1}}}')
    with pytest.raises(LedgerError, match="never reset"):
        PrivacyLedger.open(tmp_path)
    with pytest.raises(ValueError, match="run name"):
        ledger.reserve("../escape", epsilon=1.0, delta=1e-5)


# ---------------------------------------------------------------- policy violations
@pytest.mark.parametrize(
    ("policy", "overrides", "server_round", "expected"),
    [
        ({"allowed_models": ["resnet18"]}, [], 1,
         "model-not-allowed: model 'cnn' is not allowed; allowed: resnet18"),
        ({"allowed_strategies": ["fedprox", "fedavgm"]}, [], 1,
         "strategy-not-allowed: strategy 'fedavg' is not allowed; allowed: fedprox, fedavgm"),
        ({}, ["privacy.enabled=false"], 1,
         "dp-required: privacy.enabled=false but this site trains only with differential privacy"),
        ({}, ["privacy.accountant=gdp"], 1,
         "accountant-not-allowed: accountant 'gdp' is not allowed; allowed: rdp, prv"),
        ({"max_grad_norm": 0.5}, [], 1,
         "clipping-too-high: privacy.max_grad_norm=1 is above the site's maximum 0.5"),
        ({"min_noise_multiplier": 1.2}, [], 1,
         "noise-too-low: noise multiplier 1 is below the site's minimum 1.2"),
        ({"max_rounds_per_run": 3}, [], 4,
         "max-rounds: round 4 (after 0 trained in this run) is beyond the site's max_rounds_per_run=3"),
    ],
)
def test_requests_outside_policy_are_refused_with_reason(
    tmp_path: Path, policy: dict, overrides: list[str], server_round: int, expected: str
) -> None:
    decision = _admit(tmp_path, _policy(**policy), *overrides, server_round=server_round)
    assert decision.refusal == expected
    assert expected.split(":")[0] in REFUSAL_CODES
    assert not (tmp_path / "ledger.json").exists(), "a refusal spends and reserves nothing"


def test_run_budget_max_rounds_by_count_and_ledger_mismatch(tmp_path: Path) -> None:
    run_budget = _admit(tmp_path, None, f"privacy.target_epsilon={EPS_1 - 0.01}")
    assert run_budget.refusal is not None and run_budget.refusal.startswith(
        "run-budget: privacy budget exhausted: epsilon spent 0.0000, another round of 4 steps would reach "
        f"{EPS_1:.4f}")
    ledger = PrivacyLedger.open(tmp_path / "l")
    for rnd in (1, 2):
        ledger.commit("r", epsilon=0.0, delta=1e-5, server_round=rnd)
    assert _admit(tmp_path, _policy(max_rounds_per_run=2), server_round=2, ledger=ledger).refusal == (
        "max-rounds: round 2 (after 2 trained in this run) is beyond the site's max_rounds_per_run=2")
    ledger.commit("r", epsilon=3.0, delta=1e-5, server_round=3)  # the run's accountant was lost since
    assert _admit(tmp_path, None, ledger=ledger).refusal == (
        "ledger-mismatch: the ledger records epsilon 3.0000 for this run but its accountant holds 0.0000; "
        "the run's privacy state was lost, start a new run name")


def test_non_dp_only_when_allowed_and_evaluation_checks_model_and_strategy(tmp_path: Path) -> None:
    decision = _admit(tmp_path, _policy(allow_non_dp=True), "privacy.enabled=false")
    assert decision.refusal is None and decision.run_epsilon_before is None
    entry = PrivacyLedger.open(tmp_path).runs["r"]
    assert entry.dp is False and entry.charged_epsilon == 0.0
    config = load_config(None, TINY)
    assert evaluate_refusal(_policy(min_noise_multiplier=5.0), config) is None
    assert evaluate_refusal(_policy(allowed_models=["densenet121"]), config) == (
        "model-not-allowed: model 'cnn' is not allowed; allowed: densenet121")


# ---------------------------------------------------------------- policy files
def test_invalid_policy_file_names_file_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "lifetime_epsilon: -2\n"
        "lifetime_delta: 1.0e-4\n"
        "max_rounds_per_ru: 5\n"
        "allowed_models: [cnn, vit]\n"
        "min_noise_multiplier: lots\n"
    )
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    text = str(info.value)
    assert str(path) in text
    assert "lifetime_epsilon: Input should be greater than 0 (got -2)" in text
    assert "max_rounds_per_ru: unknown key; valid keys: lifetime_epsilon" in text
    assert "allowed_models: unknown model name(s) ['vit']; valid: " in text
    assert "min_noise_multiplier: Input should be a valid number" in text
    assert len(info.value.problems) == 4
    with pytest.raises(PolicyError, match="lifetime_delta: required key is missing"):
        parse_policy("lifetime_epsilon: 1\n", path="inline.yaml")
    with pytest.raises(PolicyError, match=r"(?s)missing\.yaml.*cannot read the file"):
        load_policy(tmp_path / "missing.yaml")


def test_policy_source_run_config_only_for_simulated_sites(monkeypatch: pytest.MonkeyPatch) -> None:
    import client.simulated as simulated

    run_config = {"simulation.site_policy": "/sim/policy.yaml"}
    # outside a simulation engine no node config makes a site simulated (issue 26.7)
    assert policy_source(node_config={"partition-id": 0}, run_config=run_config).path == ""
    monkeypatch.setattr(simulated, "_in_flower_simulation_actor", lambda: True)
    assert policy_source(node_config={"partition-id": 0}, run_config=run_config).path == "/sim/policy.yaml"
    real = {"state-dir": "/var/medfed", "site-name": "north"}
    assert policy_source(node_config=real, run_config=run_config).path == ""
    assert policy_source(node_config={**real, "policy": "/etc/p.yaml"}, run_config=run_config).path == "/etc/p.yaml"


def test_policy_check_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(site_cli, "console", Console(width=200))
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump({"lifetime_epsilon": 8.0, "lifetime_delta": 1e-4, "allowed_models": ["cnn"]}))
    bad.write_text("lifetime_epsilon: 8\nlifetime_delta: 2\n")
    result = CliRunner().invoke(site_cli.site_app, ["policy-check", str(good)])
    assert result.exit_code == 0, result.output
    assert "policy is valid" in result.output and "['cnn']" in result.output
    result = CliRunner().invoke(site_cli.site_app, ["policy-check", str(bad)])
    assert result.exit_code == 2
    assert "lifetime_delta: Input should be less than 1 (got 2)" in result.output and "bad.yaml" in result.output


# ---------------------------------------------------------------- the ClientApp end to end
def _message(kind: str, weights: dict[str, torch.Tensor], server_round: int, run: str) -> Message:
    content = RecordDict({"arrays": ArrayRecord(weights),
                          "config": ConfigRecord({"server-round": server_round, "run-name": run})})
    metadata = Metadata(run_id=11, message_id=f"{kind}-{server_round}", src_node_id=0, dst_node_id=1,
                        reply_to_message_id="", group_id=str(server_round), created_at=time.time(), ttl=600.0,
                        message_type=kind)
    return Message(content=content, metadata=metadata)


@pytest.fixture(scope="module")
def site_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """site-1 under a policy whose lifetime budget is exactly one round: train, evaluate, train (refused)."""
    tmp = tmp_path_factory.mktemp("site")
    policy = tmp / "policy.yaml"
    policy.write_text(yaml.safe_dump({"lifetime_epsilon": EPS_1, "lifetime_delta": 1e-4}))
    config = load_config(None, [*TINY, f"server.out_dir={tmp}", f"simulation.site_policy={policy}",
                                f"simulation.site_state_dir={tmp / 'disks'}"])
    torch.manual_seed(0)
    weights = build_model(config.model, in_channels=1, num_classes=2, dp=True).state_dict()
    context = Context(run_id=11, node_id=1, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config=to_flat(config))
    with pytest.MonkeyPatch.context() as patch:  # this process plays a simulation engine's site worker
        patch.setattr("client.simulated._in_flower_simulation_actor", lambda: True)
        replies = [app(_message(kind, weights, rnd, "study-a"), context)
                   for kind, rnd in (("train", 1), ("evaluate", 1), ("train", 2))]
    return {"replies": replies, "disk": tmp / "disks" / "site-1", "weights": weights, "context": context,
            "tmp": tmp}


def test_site_trains_to_its_lifetime_budget_then_refuses(site_run: dict) -> None:
    trained, evaluated, refused = site_run["replies"]
    assert not trained.has_error(), trained.error if trained.has_error() else ""
    metrics = dict(trained.content["metrics"])
    assert metrics["num-examples"] == 64 and metrics["steps"] == 4
    assert metrics["epsilon"] == pytest.approx(EPS_1, rel=1e-12)
    assert {"num-examples", "loss", "auc", "accuracy"} <= set(dict(evaluated.content["metrics"])) <= EVALUATE_METRICS
    assert not refused.has_error() and not refused.content.array_records
    reason = refused.content["status"]["refused"]
    assert reason == (f"lifetime-epsilon: lifetime epsilon spent {EPS_1:.4f}, this round would reach "
                      f"{EPS_2:.4f}, the site's lifetime budget is {EPS_1:g}")
    assert refused.content["site"]["name"] == "site-1"
    ledger = PrivacyLedger.open(site_run["disk"])
    assert ledger.spent_epsilon() == pytest.approx(EPS_1, rel=1e-12) and ledger.runs["study-a"].rounds == 1


def test_audit_log_records_requests_replies_and_refusals(site_run: dict) -> None:
    entries = read_audit(site_run["disk"] / "audit.jsonl")
    assert [(e["event"], e["round"], e.get("refused")) for e in entries] == [
        ("train", 1, None), ("evaluate", 1, None), ("train", 2, entries[2]["refused"])]
    first = entries[0]
    assert first["site"] == "site-1" and first["run_name"] == "study-a" and first["run_id"] == 11
    assert first["requested"]["run_config"]["privacy.noise_multiplier"] == 1.0
    assert first["requested"]["message_config"] == {"server-round": 1, "run-name": "study-a"}
    shapes = {a["name"]: (a["shape"], a["dtype"]) for a in first["sent"]["arrays"]}
    assert shapes == {k: (list(v.shape), "float32") for k, v in site_run["weights"].items()}
    assert first["sent"]["metrics"]["epsilon"] == pytest.approx(EPS_1, rel=1e-12)
    assert (first["epsilon_before"], first["lifetime_epsilon_before"]) == (0.0, 0.0)
    assert first["epsilon_after"] == pytest.approx(EPS_1, rel=1e-12)
    assert first["lifetime_epsilon_after"] == pytest.approx(EPS_1, rel=1e-12)
    third = entries[2]
    assert third["refused"].startswith("lifetime-epsilon: ") and third["sent"]["arrays"] == []
    assert third["sent"]["status"] == {"refused": third["refused"]}
    assert third["epsilon_before"] == third["epsilon_after"] == pytest.approx(EPS_1, rel=1e-12)
    assert third["epsilon_planned"] == pytest.approx(EPS_2, rel=1e-12)


def test_audit_cli_summarizes_runs_and_refusals(site_run: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(site_cli, "console", Console(width=250))
    result = CliRunner().invoke(site_cli.site_app, ["audit", str(site_run["disk"].parent)])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "study-a" in line and "site-1" in line)
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells[:9] == ["site-1", "study-a", "1", "1", "1", "0", f"{EPS_1:.4f}", "1e-05", f"{EPS_1:.4f}"]
    assert "lifetime-epsilon: lifetime epsilon spent" in result.output
    assert f"site-1: lifetime epsilon {EPS_1:.4f}, delta 1e-05 over 1 run(s)" in result.output
    empty = CliRunner().invoke(site_cli.site_app, ["audit", str(site_run["tmp"] / "nowhere")])
    assert empty.exit_code == 2 and "no audit.jsonl" in empty.output


def test_invalid_policy_stops_the_clientapp_without_leaking_its_path(
    site_run: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = tmp_path / "MF0012345-policy.yaml"
    bad.write_text("lifetime_epsilon: 1\nlifetime_delta: 1e-5\nallow_non_dp: maybe\n")
    context = site_run["context"]
    node_config = {"site-name": "north", "data-dir": str(tmp_path), "policy": str(bad), "state-dir": str(tmp_path)}
    hostile = Context(run_id=11, node_id=1, node_config=node_config, state=RecordDict(),
                      run_config=context.run_config)
    with pytest.raises(SitePolicyInvalid) as info:
        app(_message("train", site_run["weights"], 1, "study-b"), hostile)
    assert str(bad) not in str(info.value) and "MF0012345" not in str(info.value)
    assert str(bad) in caplog.text and "allow_non_dp" in caplog.text


#: One fresh site process, as a deployed SuperNode starts per message: evaluate, then train with DP.
_FRESH_SITE = """
import sys, time
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from client.app import app
from federation.config import load_config, to_flat
config = load_config(None, {overrides!r})
import torch
from federation.models.cnn import build_cnn
weights = build_cnn(config=config.model, in_channels=1, num_classes=2, spatial_dims=2).state_dict()
context = Context(run_id=11, node_id=1, node_config={node_config!r},
                  state=RecordDict(), run_config=to_flat(config))
def message(kind):
    config_record = ConfigRecord({{"server-round": 1, "run-name": "r"}})
    content = RecordDict({{"arrays": ArrayRecord(weights), "config": config_record}})
    return Message(content=content, metadata=Metadata(run_id=11, message_id=kind, src_node_id=0, dst_node_id=1,
                   reply_to_message_id="", group_id="1", created_at=time.time(), ttl=600.0, message_type=kind))
for kind in ("evaluate", "train"):
    reply = app(message(kind), context)
    assert not reply.has_error(), reply.error
    print(kind, "opacus" in sys.modules, sorted(reply.content.metric_records["metrics"])[:2])
"""


def test_an_evaluating_site_process_never_loads_opacus(tmp_path: Path) -> None:
    # A deployed site handles each message in a fresh process: evaluation (and
    # inference) must not pay for Opacus, which only DP training needs.
    import subprocess
    import sys

    overrides = [*TINY, f"server.out_dir={tmp_path}"]
    node_config = {"site-name": "site-1", "data-dir": str(tmp_path), "state-dir": str(tmp_path / "disks")}
    done = subprocess.run([sys.executable, "-c", _FRESH_SITE.format(overrides=overrides, node_config=node_config)],
                          capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    evaluated, trained = done.stdout.strip().splitlines()[-2:]
    assert evaluated.startswith("evaluate False ['accuracy', 'auc']"), evaluated
    assert trained.startswith("train True "), trained


def test_a_real_sites_audit_entries_are_fsynced_a_simulated_sites_only_flushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import client.audit as audit_module
    from client.audit import AuditLog

    synced: list[int] = []
    monkeypatch.setattr(audit_module.os, "fsync", lambda fd: synced.append(fd))
    AuditLog(tmp_path / "real").append({"event": "train"})
    assert len(synced) == 1
    AuditLog(tmp_path / "simulated", durable=False).append({"event": "train"})
    assert len(synced) == 1  # written and flushed (readable at once), not forced to disk
    assert read_audit(tmp_path / "simulated" / "audit.jsonl")[0]["event"] == "train"
