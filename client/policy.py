"""A hospital site's own policy: what its SuperNode agrees to do, whatever the coordinator asks.

The policy is a small YAML file owned by the hospital and named by the SuperNode's
node config (``flower-supernode --node-config "policy='/etc/medfed/policy.yaml'"``)::

    # medfed site policy
    lifetime_epsilon: 10.0        # epsilon this site may spend over ALL runs together
    lifetime_delta: 1.0e-4        # delta over all runs together (each DP run adds its target_delta)
    max_delta: 1.0e-5             # largest privacy.target_delta a run may use (omit: 1/n only)
    max_rounds_per_run: 50        # rounds this site trains per run (omit: no limit)
    allowed_models: [cnn, resnet18]          # omit: any registered model
    allowed_strategies: [fedavg, fedprox]    # omit: any registered strategy
    min_noise_multiplier: 0.8     # DP-SGD noise below this is refused
    max_grad_norm: 1.0            # clipping norms above this are refused (omit: no limit)
    allow_non_dp: false           # train without differential privacy at all?
    allowed_accountants: [rdp, prv]
    min_group_size: 10            # no evaluation number describes fewer patients (at least 5)
    subgroups: [sex, age]         # attributes whose subgroups are reported ([]: none)
    age_bands: [18, 40, 65]       # the site's own age bands (the run config's are ignored)
    max_evaluations_per_run: 55   # omit: max_rounds_per_run (else 50) + 5
    max_evaluations_lifetime: 1000  # omit: no limit

Budgets compose by basic composition: the epsilons of all runs add up, and so do
the deltas (every run that trained with DP adds its ``privacy.target_delta`` once).

A simulation cannot give each simulated node its own node config, so simulated
sites share the policy named by the run-config key ``simulation.site_policy``;
a real site (any site outside a simulation engine, see :mod:`client.simulated`)
never takes its policy from the run config, which the coordinator controls.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from client.simulated import is_simulated_site

logger = logging.getLogger(__name__)

#: Node-config key naming the site's policy file.
NODE_POLICY = "policy"
#: Node-config key of the site's own disk (a site with one is never simulated).
NODE_STATE_DIR = "state-dir"
#: Run-config key of the policy simulated sites share.
RUN_SITE_POLICY = "simulation.site_policy"

Accountant = Literal["rdp", "prv", "gdp"]
Subgroup = Literal["sex", "age"]


class PolicyError(ValueError):
    """A site policy file is missing, unreadable or invalid.

    Attributes:
        path: The policy file.
        problems: One line per problem, each naming the key.
    """

    def __init__(self, problems: list[str], *, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in site policy {self.path}:\n{lines}")


class SitePolicy(BaseModel):
    """What a hospital site accepts; every limit is checked before each round.

    ``None`` (key omitted) means "no limit" for the optional limits.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    lifetime_epsilon: float = Field(gt=0.0, description="Epsilon the site may spend over all runs together.")
    lifetime_delta: float = Field(gt=0.0, lt=1.0, description="Delta over all runs together (deltas add up).")
    max_rounds_per_run: int | None = Field(None, ge=1, description="Training rounds per run.")
    allowed_models: list[str] | None = Field(None, min_length=1, description="Model names (omit: any).")
    allowed_strategies: list[str] | None = Field(None, min_length=1, description="Strategy names (omit: any).")
    min_noise_multiplier: float = Field(0.0, ge=0.0, description="Smallest DP-SGD noise multiplier accepted.")
    max_grad_norm: float | None = Field(None, gt=0.0, description="Largest clipping norm accepted.")
    max_delta: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="Largest privacy.target_delta accepted (omit: only the site's own 1/n bound applies).",
    )
    allow_non_dp: bool = Field(False, description="Whether training without DP is allowed at all.")
    require_secagg: bool = Field(
        False, description="Send model updates only under secure aggregation (secagg.enabled); refuse plain rounds.",
    )
    allowed_accountants: list[Accountant] = Field(
        default_factory=lambda: ["rdp", "prv"], min_length=1,
        description="Privacy accountants whose epsilon the site trusts (gdp can underestimate).",
    )
    # Evaluation (issue 26.4): the site, not the run config, defines its subgroups and floors.
    min_group_size: int = Field(
        10, ge=5, description="Smallest count of patients (subgroup, table cell, bin) an evaluation reply describes.",
    )
    subgroups: list[Subgroup] = Field(
        default_factory=lambda: ["sex", "age"], description="Patient attributes whose subgroups are reported.",
    )
    age_bands: str = Field("18,40,65", description="The site's age band edges in years (list or '18,40,65').")
    max_evaluations_per_run: int | None = Field(
        None, ge=0, description="Evaluations answered per run (omit: max_rounds_per_run, else 50, plus 5).",
    )
    max_evaluations_lifetime: int | None = Field(None, ge=0, description="Evaluations over all runs (omit: no limit).")

    @field_validator("age_bands", mode="before")
    @classmethod
    def _age_edges(cls, value: object) -> str:
        text = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
        from federation.config.schema import parse_age_edges

        try:
            parse_age_edges(text)
        except ValueError:
            raise ValueError("age_bands must be at most 7 strictly increasing whole years in [1, 150]") from None
        return text

    @property
    def evaluation_budget(self) -> int:
        """Evaluations answered per run: ``max_evaluations_per_run``, else the round limit (or 50) plus 5."""
        if self.max_evaluations_per_run is not None:
            return self.max_evaluations_per_run
        return (self.max_rounds_per_run or 50) + 5

    @field_validator("allowed_models")
    @classmethod
    def _known_models(cls, names: list[str] | None) -> list[str] | None:
        from federation.models import available_models

        return _check_names(names, available_models(), "model")

    @field_validator("allowed_strategies")
    @classmethod
    def _known_strategies(cls, names: list[str] | None) -> list[str] | None:
        from strategies import available_strategies

        return _check_names(names, available_strategies(), "strategy")


def _check_names(names: list[str] | None, valid: list[str], kind: str) -> list[str] | None:
    if names is None:
        return None
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"unknown {kind} name(s) {unknown}; valid: {', '.join(valid)}")
    return names


def _problems(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = ", ".join(SitePolicy.model_fields)
            problems.append(f"{key}: unknown key; valid keys: {valid}")
        elif e["type"] == "missing":
            problems.append(f"{key}: required key is missing")
        else:
            msg = str(e["msg"]).removeprefix("Value error, ")
            problems.append(f"{key}: {msg} (got {e.get('input')!r})")
    return problems


def parse_policy(text: str, *, path: str | os.PathLike[str]) -> SitePolicy:
    """Validate the YAML text of a policy; ``path`` only names it in errors.

    Raises:
        PolicyError: Naming the file and every bad key.
    """
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise PolicyError([f"not valid YAML: {err}"], path=path) from None
    if not isinstance(tree, Mapping):
        raise PolicyError(["the top level must be a mapping of policy keys (see client/policy.py)"], path=path)
    try:
        return SitePolicy.model_validate(dict(tree))
    except ValidationError as err:
        raise PolicyError(_problems(err), path=path) from None


_CACHE: dict[str, tuple[tuple[int, int], SitePolicy]] = {}
_CACHE_LOCK = threading.Lock()


def load_policy(path: str | os.PathLike[str]) -> SitePolicy:
    """Read and validate a policy file (cached until the file changes).

    Raises:
        PolicyError: The file is missing, unreadable or invalid (naming file and key).
    """
    file = Path(path).expanduser()
    try:
        stat = file.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        with _CACHE_LOCK:
            cached = _CACHE.get(str(file))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        text = file.read_text(encoding="utf-8")
    except OSError as err:
        raise PolicyError([f"cannot read the file ({err.strerror or err})"], path=file) from None
    policy = parse_policy(text, path=file)
    with _CACHE_LOCK:
        _CACHE[str(file)] = (stamp, policy)
    return policy


@dataclass(frozen=True)
class PolicySource:
    """Where a site's policy comes from: ``path`` ("" = no policy) and ``origin`` (for logs)."""

    path: str
    origin: str


def policy_source(*, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> PolicySource:
    """Which policy file governs this site.

    The node config's ``policy`` wins. A simulated site (inside a simulation engine:
    :func:`client.simulated.is_simulated_site`) falls back to the flat run config's
    ``simulation.site_policy``; a real site never does, since the run config comes
    from the coordinator.
    """
    if str(node_config.get(NODE_POLICY, "")).strip():
        return PolicySource(path=str(node_config[NODE_POLICY]).strip(), origin="node config 'policy'")
    if is_simulated_site(node_config) and str(run_config.get(RUN_SITE_POLICY, "")).strip():
        return PolicySource(path=str(run_config[RUN_SITE_POLICY]).strip(), origin=f"run config {RUN_SITE_POLICY}")
    return PolicySource(path="", origin="none")


def site_policy(*, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> SitePolicy | None:
    """Load the site's policy (None when it has none; a warning is logged for real sites).

    Raises:
        PolicyError: The policy named by the node or run config is invalid.
    """
    source = policy_source(node_config=node_config, run_config=run_config)
    if not source.path:
        if not is_simulated_site(node_config):
            logger.warning("site has no policy (node config key %r): no limits besides the run config",
                           NODE_POLICY)
        return None
    return load_policy(source.path)
