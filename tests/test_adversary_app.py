"""Attacks and faults live in the simulation's ClientApp only: the deployed ClientApp ignores them entirely."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

import client.app as deployed
from federation.config import load_config, to_flat
from federation.faults import round_faults
from simulations import adversary_app

ROOT = Path(__file__).resolve().parents[1]
#: Two simulated sites of 32 small synthetic images, no DP: a simulated site trains seeded, so replies compare
#: exactly.
TINY = ("data.num_sites=2", "data.num_samples=64", "data.image_size=16", "model.width=4", "train.batch_size=16",
        "privacy.enabled=false")
#: This test's site: site-2 (partition 1), as a simulation engine's node config gives it.
NODE = {"partition-id": 1, "num-partitions": 2}


def _train(real_site, handler, tmp_path: Path, *overrides: str, run_name: str):
    """One train request of ``handler`` at simulated site-2 (run ``run_name``: no replayed reply)."""
    run_config = dict(to_flat(load_config(None, [*TINY, f"server.out_dir={tmp_path}", *overrides])))
    weights = real_site.weights(run_config)
    reply = handler(real_site.message("train", weights, run_name=run_name),
                    real_site.context(run_config, node_config=NODE))
    return weights, reply


def _arrays(reply) -> dict[str, torch.Tensor]:
    assert not reply.has_error() and "status" not in reply.content
    return reply.content["arrays"].to_torch_state_dict()


def test_the_deployed_app_ignores_attacks_and_faults_the_simulation_app_applies_them(
    real_site, tmp_path: Path, simulated_site_process: None
) -> None:
    drop = "faults.dropout_rate=0.5"
    assert round_faults(load_config(None, [*TINY, drop]).faults, num_sites=2, server_round=1, seed=0) == {1: "drop"}
    scenario = ("attack.kind=label_flip", "attack.sites=2", drop)
    old, honest = _train(real_site, deployed.train, tmp_path, run_name="honest")
    _, ignored = _train(real_site, deployed.train, tmp_path, *scenario, run_name="deployed")
    honest, ignored = _arrays(honest), _arrays(ignored)
    assert all(torch.equal(ignored[name], honest[name]) for name in honest)  # even at a simulated site

    _, dropped = _train(real_site, adversary_app.train, tmp_path, *scenario, run_name="dropped")
    assert dropped.has_error()  # the uniform error reply of a crashed site
    _, flipped = _train(real_site, adversary_app.train, tmp_path, "attack.kind=label_flip", "attack.sites=2",
                        run_name="flipped")
    flipped = _arrays(flipped)
    assert any(not torch.equal(flipped[n], honest[n]) for n in honest if torch.is_floating_point(honest[n]))
    _, scaled = _train(real_site, adversary_app.train, tmp_path, "attack.kind=scale", "attack.sites=2",
                       "attack.scale=3", run_name="scaled")
    scaled = _arrays(scaled)
    for name, value in honest.items():
        if torch.is_floating_point(value):
            torch.testing.assert_close(scaled[name], old[name] + 3 * (value - old[name]))
        else:
            assert torch.equal(scaled[name], value)
    _, resent = _train(real_site, adversary_app.train, tmp_path, "attack.kind=scale", "attack.sites=2",
                       "attack.scale=3", run_name="scaled")  # the same round again: replayed, attacked again
    assert all(torch.equal(_arrays(resent)[name], scaled[name]) for name in scaled)
    _, bystander = _train(real_site, adversary_app.train, tmp_path, "attack.kind=scale", "attack.sites=1",
                          run_name="bystander")
    assert all(torch.equal(_arrays(bystander)[name], honest[name]) for name in honest)  # site-1 attacks, not us


def test_the_simulation_app_serves_every_message_type_of_the_deployed_app() -> None:
    assert sorted(adversary_app.app._registered_funcs) == sorted(deployed.app._registered_funcs)  # noqa: SLF001
    assert sorted(adversary_app.app._registered_funcs) == ["evaluate.default", "query.secagg", "train.default"]


def test_no_deployed_module_imports_the_scenarios() -> None:
    """A SuperNode loads client/ (and the coordinator server/): neither may reach attack or fault code."""
    scenario_modules = ("simulations", "federation.attacks", "federation.faults")
    offences = []
    for path in sorted([*ROOT.glob("client/*.py"), *ROOT.glob("server/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offences += [f"{path.relative_to(ROOT)}: {name}" for name in names
                         if name.startswith(scenario_modules)]
    assert offences == []
    assert not (ROOT / "client" / "adversary.py").exists()
