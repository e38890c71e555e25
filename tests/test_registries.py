"""One rule for the three registries (models, datasets, strategies), and strategy plug-ins from packages."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import strategies.registry as strategy_registry
from federation.config import ConfigError, ModelConfig, StrategyConfig
from federation.data.registry import _REGISTRY as DATASETS
from federation.data.registry import available_datasets, register_dataset
from federation.models.registry import _REGISTRY as MODELS
from federation.models.registry import available_models, build_model, register_model
from strategies.registry import available_strategies, build_strategy, register_strategy


@pytest.fixture
def clean_registries() -> Iterator[None]:
    saved = [(registry, dict(registry)) for registry in (MODELS, DATASETS, strategy_registry._REGISTRY)]
    loaded = strategy_registry._plugins_loaded
    yield
    for registry, entries in saved:
        registry.clear()
        registry.update(entries)
    strategy_registry._plugins_loaded = loaded


def _builder(*args: object, **kwargs: object) -> None:
    return None


REGISTER = {"model": register_model, "dataset": register_dataset, "strategy": register_strategy}


@pytest.mark.parametrize("kind", sorted(REGISTER))
def test_every_registry_refuses_a_taken_or_malformed_name_the_same_way(kind: str, clean_registries: None) -> None:
    register = REGISTER[kind]
    register("my-thing", _builder)
    with pytest.raises(ValueError, match=rf"^{kind} 'my-thing' is already registered; pass replace=True to replace it$"):
        register("my-thing", _builder)
    register("my-thing", _builder, replace=True)
    with pytest.raises(ValueError, match=rf"^invalid {kind} name 'My Thing': use lower-case letters, digits, "):
        register("My Thing", _builder)


def test_every_registry_names_the_key_and_the_valid_names_for_an_unknown_name() -> None:
    errors = []
    for call in (lambda: build_model(ModelConfig(name="vit"), in_channels=1, num_classes=2, dp=False),
                 lambda: build_strategy(StrategyConfig(name="fedsgd"), num_sites=3)):
        with pytest.raises(ConfigError) as err:
            call()
        errors.append(err.value.problems)
    from federation.data.registry import is_site_only

    with pytest.raises(ConfigError) as err:
        is_site_only("imagenet")
    errors.append(err.value.problems)
    assert errors == [
        [f"model.name: unknown model 'vit'; valid names: {', '.join(available_models())}"],
        [f"strategy.name: unknown strategy 'fedsgd'; valid names: {', '.join(available_strategies())}"],
        [f"data.dataset: unknown dataset 'imagenet'; valid names: {', '.join(available_datasets())}"],
    ]


def _install_plugin(root: Path, entry: str) -> None:
    """A package installed the way pip would (a dist-info with entry points) on ``sys.path``."""
    (root / "medfed_plugin_demo.py").write_text(
        "from flwr.serverapp.strategy import FedMedian\n"
        "def build(config, *, num_sites, **common):\n    return FedMedian(**common)\n"
    )
    info = root / "medfed_plugin_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: medfed-plugin-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[medfed.strategies]\n{entry}\n")


def test_a_strategy_plugin_from_an_installed_package_is_registered_at_the_coordinator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_registries: None
) -> None:
    from flwr.serverapp.strategy import FedMedian

    _install_plugin(tmp_path, "fedmedian-plugin = medfed_plugin_demo:build")
    monkeypatch.syspath_prepend(str(tmp_path))
    strategy_registry._plugins_loaded = False
    assert "fedmedian-plugin" in available_strategies()
    built = build_strategy(StrategyConfig(name="fedmedian-plugin", min_sites=2), num_sites=3)
    assert type(built) is FedMedian and built.min_available_nodes == 2
    assert strategy_registry.load_strategy_plugins() == []  # once per process
    sys.modules.pop("medfed_plugin_demo", None)


def test_a_plugin_may_not_take_a_registered_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_registries: None
) -> None:
    _install_plugin(tmp_path, "fedavg = medfed_plugin_demo:build")
    monkeypatch.syspath_prepend(str(tmp_path))
    strategy_registry._plugins_loaded = False
    with pytest.raises(RuntimeError, match=r"^strategy plug-in 'fedavg' = 'medfed_plugin_demo:build' of "
                                           r"medfed-plugin-demo \(medfed.strategies entry point\): ValueError: "
                                           r"strategy 'fedavg' is already registered"):
        available_strategies()
    sys.modules.pop("medfed_plugin_demo", None)
