"""Config: all problems reported at once, key named; presets and the Flower app config valid."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from federation.config import (
    ConfigError,
    ExperimentConfig,
    from_flat,
    load_config,
    to_flat,
    valid_keys,
)
from simulations.harness import PRESETS_DIR

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(PRESETS_DIR.glob("*.yaml"))


def test_defaults_validate_and_round_trip_through_run_config() -> None:
    config = load_config()
    assert config == ExperimentConfig()
    flat = to_flat(config)
    assert set(flat) == set(valid_keys())
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert from_flat(flat) == config


def test_overrides_are_typed() -> None:
    config = load_config(None, ["train.lr=0.2", "privacy.enabled=false", "data.num_sites=5", "name=abc"])
    assert config.train.lr == 0.2
    assert config.privacy.enabled is False
    assert config.data.num_sites == 5
    assert config.name == "abc"


def test_every_problem_is_reported_at_once_naming_the_key(tmp_path: Path) -> None:
    preset = tmp_path / "bad.yaml"
    preset.write_text("data:\n  partition: zipf\n  num_sites: 0\ntrain:\n  lrr: 0.1\nmodle: {}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(preset, ["privacy.target_delta=2", "train.optimizer=rmsprop"])
    problems = caught.value.problems
    text = str(caught.value)
    assert len(problems) == 6, problems
    assert "data.partition" in text and "'iid', 'dirichlet'" in text
    assert "data.num_sites" in text and ">= 1" in text
    assert "train.lrr: unknown key (did you mean train.lr" in text
    assert "modle: unknown key" in text
    assert "privacy.target_delta" in text
    assert "train.optimizer" in text and "'sgd', 'adam'" in text
    assert str(preset) in text


def test_cross_field_checks_name_the_key() -> None:
    with pytest.raises(ConfigError, match="model.norm: 'batch' cannot be used with privacy.enabled=true"):
        load_config(None, ["model.norm=batch"])
    with pytest.raises(ConfigError, match="strategy.min_sites: quorum 9"):
        load_config(None, ["strategy.min_sites=9"])
    assert load_config(None, ["model.norm=batch", "privacy.enabled=false"]).model.norm == "batch"


def test_malformed_override_and_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["train.lr"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    with pytest.raises(FileNotFoundError, match="nothere.yaml"):
        load_config(tmp_path / "nothere.yaml")


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_shipped_preset_validates_and_starts_with_its_command(preset: Path) -> None:
    config = load_config(preset)
    first = preset.read_text().splitlines()[0]
    assert first.startswith("# medfed simulate"), f"{preset.name} must start with the command that runs it"
    if preset.stem != "synthetic":
        assert f"--config simulations/configs/{preset.name}" in first
    assert config.name


def test_required_presets_exist() -> None:
    names = {p.stem for p in PRESETS}
    assert {"synthetic", "pneumonia_dirichlet", "pneumonia_dirichlet_dp"} <= names
    pneu = load_config(PRESETS_DIR / "pneumonia_dirichlet.yaml")
    pneu_dp = load_config(PRESETS_DIR / "pneumonia_dirichlet_dp.yaml")
    for config in (pneu, pneu_dp):
        assert (config.data.dataset, config.data.num_sites, config.data.partition, config.data.alpha) == (
            "pneumoniamnist", 5, "dirichlet", 0.5)
    assert not pneu.privacy.enabled
    assert pneu_dp.privacy.enabled and pneu_dp.privacy.target_epsilon <= 8 and pneu_dp.privacy.target_delta == 1e-5


def test_flower_app_config_mirrors_the_schema() -> None:
    """`flwr run .` must see exactly the keys and defaults medfed validates."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app_config = project["tool"]["flwr"]["app"]["config"]
    assert app_config == ExperimentConfig().model_dump(), (
        "pyproject.toml [tool.flwr.app.config] differs from federation/config/schema.py defaults: "
        "run python scripts/sync_app_config.py"
    )
    assert project["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "server.app:app",
        "clientapp": "client.app:app",
    }
