"""Load, override, validate and flatten :class:`ExperimentConfig`.

A config is built from three layers, later ones winning: the schema defaults, a YAML
preset, and ``key=value`` overrides (``--set train.lr=0.1``). Every problem found in
any layer is collected and raised together in one :class:`ConfigError`, each line
naming the dotted key, the bad value and what is allowed.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from federation.config.schema import ExperimentConfig

logger = logging.getLogger(__name__)

Scalar = bool | int | float | str


class ConfigError(ValueError):
    """One or more problems in a config; ``problems`` lists them, one per key."""

    def __init__(self, problems: list[str], *, source: str = "config") -> None:
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {source}:\n{lines}")


def _field_info(model: type[BaseModel], dotted: str) -> Any | None:
    """Return the pydantic FieldInfo for a dotted key, or None if it does not exist."""
    parts = dotted.split(".")
    current: type[BaseModel] = model
    for i, part in enumerate(parts):
        field = current.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        if i == len(parts) - 1:
            return field
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        current = annotation
    return None


def _allowed(dotted: str) -> str:
    """Describe the values a key accepts, for error messages."""
    field = _field_info(ExperimentConfig, dotted)
    if field is None:
        return ""
    annotation = field.annotation
    if get_origin(annotation) is Literal:
        return "allowed: " + ", ".join(repr(v) for v in get_args(annotation))
    bounds = []
    for meta in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(meta, attr, None)
            if value is not None:
                bounds.append(f"{sign} {value}")
    kind = getattr(annotation, "__name__", str(annotation))
    return f"expected {kind}" + (f" {' and '.join(bounds)}" if bounds else "")


def valid_keys(model: type[BaseModel] = ExperimentConfig, prefix: str = "") -> list[str]:
    """All dotted leaf keys of the schema, in declaration order."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        dotted = f"{prefix}{name}"
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(valid_keys(annotation, prefix=dotted + "."))
        else:
            keys.append(dotted)
    return keys


def _suggest(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, valid_keys(), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value``; the value is read as YAML so numbers and bools get typed."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if value is None:
        value = ""
    return key, value


@functools.cache
def _schema_keys() -> tuple[tuple[str, ...], frozenset[str], frozenset[str]]:
    """The schema's dotted leaf keys (in order and as a set) and section prefixes.

    Computed once: every message a site receives is validated with them.
    """
    ordered = tuple(valid_keys())
    return ordered, frozenset(ordered), frozenset(k.rsplit(".", 1)[0] for k in ordered if "." in k)


def _collect_unknown(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Problems for keys that the schema does not define (all of them, recursively)."""
    problems = []
    _, known, sections = _schema_keys()
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and dotted in sections:
            problems.extend(_collect_unknown(value, prefix=dotted + "."))
        elif dotted not in known:
            problems.append(f"{dotted}: unknown key{_suggest(dotted)}")
    return problems


def validate_config(tree: Mapping[str, Any], *, source: str = "config") -> ExperimentConfig:
    """Validate a nested mapping; raise one ConfigError listing every problem."""
    problems = _collect_unknown(tree)
    try:
        config = ExperimentConfig.model_validate(dict(tree))
    except ValidationError as err:
        for e in err.errors():
            dotted = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                continue  # already reported with a suggestion
            hint = _allowed(dotted)
            got = e.get("input")
            problems.append(f"{dotted}: {e['msg']} (got {got!r}){'; ' + hint if hint else ''}")
        raise ConfigError(problems, source=source) from None
    problems.extend(cross_field_problems(config))
    if problems:
        raise ConfigError(problems, source=source)
    return config


def cross_field_problems(config: ExperimentConfig) -> list[str]:
    """Checks that span several sections."""
    problems = []
    if config.privacy.enabled and config.model.norm == "batch" and config.model.batchnorm == "keep":
        problems.append(
            "model.norm: 'batch' cannot be used with privacy.enabled=true "
            "(DP-SGD needs per-sample gradients); allowed: 'group', 'instance', or 'batch' with "
            "model.batchnorm=frozen|group (pretrained BatchNorm made DP-compatible)"
        )
    if config.train.ditto_lambda > 0 and (config.train.local_norm or config.train.finetune_rounds):
        problems.append(
            "train.ditto_lambda: Ditto keeps its own personal model at each site; it does not combine with "
            "train.local_norm or train.finetune_rounds: set those to false / 0, or ditto_lambda to 0"
        )
    if config.strategy.min_sites > config.data.num_sites:
        problems.append(
            f"strategy.min_sites: quorum {config.strategy.min_sites} is larger than "
            f"data.num_sites={config.data.num_sites}; lower it or add sites"
        )
    return problems


def dataset_problems(config: ExperimentConfig) -> list[str]:
    """Checks that need the dataset registry, each naming the key to set.

    A site-only dataset (its data exists only at the hospitals, e.g. ``dicom``) must
    declare the model's shape in the run config, and only it may give the
    coordinator its own validation folder (``server.central_eval_dir``). The registry
    loads torch, so this runs where a run is resolved or started (``medfed validate``,
    ``medfed simulate``, the ServerApp), not in every validation. An unknown dataset
    name gives no problem here (the name check reports it).
    """
    from federation.data.registry import declared_info_problems, is_site_only  # noqa: PLC0415 - torch

    from federation.tasks import task_problems  # noqa: PLC0415 - the registries

    try:
        site_only = is_site_only(config.data.dataset)
    except ValueError:
        return []
    problems = declared_info_problems(config.data) + task_problems(config)  # data.task vs dataset and model
    if config.server.central_eval_dir and not site_only:
        problems.append(
            f"server.central_eval_dir: only for data that exists only at the sites (e.g. dicom); "
            f"{config.data.dataset!r} is evaluated centrally on its pooled test split: set it to ''"
        )
    return problems


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
) -> ExperimentConfig:
    """Build a config from defaults, an optional YAML preset and ``key=value`` overrides.

    Args:
        path: YAML preset file, or None for the defaults.
        overrides: Strings ``"dotted.key=value"``; values are parsed as YAML scalars.

    Raises:
        ConfigError: listing every unknown key and bad value, each named.
        FileNotFoundError: when ``path`` does not exist.
    """
    tree: dict[str, Any] = {}
    source = "defaults"
    problems: list[str] = []
    overrides = list(overrides)
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError([f"not valid YAML: {err}"], source=source) from None
        if not isinstance(loaded, dict):
            raise ConfigError(["the top level must be a mapping of sections"], source=source)
        tree = loaded
    for text in overrides:
        try:
            key, value = _parse_override(text)
        except ValueError as err:
            problems.append(str(err))
            continue
        _set_dotted(tree, key, value)
    if overrides:
        source = f"{source} with --set overrides"
    if problems:
        raise ConfigError(problems, source=source)
    return validate_config(tree, source=source)


def to_flat(config: ExperimentConfig) -> dict[str, Scalar]:
    """Flatten to Flower's run-config form: ``{"train.lr": 0.05, ...}``."""
    flat: dict[str, Scalar] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(config.model_dump(), "")
    return flat


def from_flat(flat: Mapping[str, Any], *, source: str = "run config") -> ExperimentConfig:
    """Rebuild and validate a config from a flat run config (as Flower delivers it).

    Every key must be present: a run config that silently fell back to defaults
    (e.g. an app whose ``[tool.flwr.app.config]`` is incomplete) is an error.
    """
    missing = [key for key in _schema_keys()[0] if key not in flat]
    if missing:
        shown = ", ".join(missing[:8]) + (" …" if len(missing) > 8 else "")
        raise ConfigError(
            [f"{len(missing)} key(s) missing: {shown}; the Flower app's [tool.flwr.app.config] "
             "must list every medfed key (see pyproject.toml)"],
            source=source,
        )
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        _set_dotted(tree, key, value)
    return validate_config(tree, source=source)


def to_yaml(config: ExperimentConfig) -> str:
    """Serialize a resolved config as YAML, sections in schema order."""
    return yaml.safe_dump(config.model_dump(), sort_keys=False)
