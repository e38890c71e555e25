"""Typed experiment configuration: schema, YAML presets, overrides and run-config form."""

from federation.config.loading import (
    ConfigError,
    dataset_problems,
    from_flat,
    load_config,
    to_flat,
    to_yaml,
    valid_keys,
    validate_config,
)
from federation.config.schema import (
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    PrivacyConfig,
    ServerConfig,
    SimulationConfig,
    StrategyConfig,
    TrainConfig,
)

__all__ = [
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "ModelConfig",
    "PrivacyConfig",
    "ServerConfig",
    "SimulationConfig",
    "StrategyConfig",
    "TrainConfig",
    "dataset_problems",
    "from_flat",
    "load_config",
    "to_flat",
    "to_yaml",
    "valid_keys",
    "validate_config",
]
