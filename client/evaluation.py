"""What a site's evaluation may reveal, and how often: its rules, its per-run record and its cache.

Evaluation spends no privacy budget, but every reply is an exact (un-noised) query of
the site's test patients, with weights and a threshold the coordinator chooses. So
a real site (issue 26.4):

* takes its subgroup definitions (``subgroups``, ``age_bands``) and its smallest
  releasable count (``min_group_size``, at least 5) from its own policy: the run
  config's ``clinical.age_bands`` is ignored, its ``clinical.min_group_size`` may only
  raise the floor;
* fixes the clinical settings (threshold, positive class, confidence, bins, floor,
  subgroups) and the choice of test patients (``data.*``, ``seed``) at the first
  evaluation of a run: a later request with other settings is refused
  (``evaluation-settings``), so two evaluations cannot differ only in where a
  threshold or band edge falls, or in a few test patients;
* answers at most ``max_evaluations_per_run`` evaluations per run and
  ``max_evaluations_lifetime`` over all runs (``evaluation-budget``);
* answers a repeated request (same weights, same settings, same data config) from
  its cache, without using budget, so asking twice reveals nothing new.

The record lives on the site's disk, ``<state-dir>/<site>/runs/<run>/evaluation.json``,
and is written (the count raised) *before* the evaluation runs: a crash over-counts,
never under-counts. A simulated site follows the run config and has no budget.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from client.policy import SitePolicy
from federation.config import ExperimentConfig
from federation.config.schema import parse_age_edges
from federation.metrics.clinical import ClinicalSettings

logger = logging.getLogger(__name__)

#: File of a run's evaluation record, in the run's folder on the site's disk.
RECORD_FILE = "evaluation.json"
_DEFAULTS = SitePolicy.model_fields


@dataclass(frozen=True)
class EvaluationRules:
    """How a site evaluates: clinical settings (with the site's floor and bands) and its budgets.

    Attributes:
        clinical: Operating point, intervals, bins, ``min_group_size`` and ``age_edges`` in force.
        subgroups: Patient attributes whose subgroups are reported (``sex``, ``age``).
        per_run: Evaluations answered per run (None: no limit, simulated sites).
        lifetime: Evaluations answered over all runs (None: no limit).
        limited: Whether settings are fixed per run, requests cached and budgets counted (real sites).
    """

    clinical: ClinicalSettings
    subgroups: tuple[str, ...] = ("sex", "age")
    per_run: int | None = None
    lifetime: int | None = None
    limited: bool = False
    data: str = ""

    def fingerprint(self) -> dict[str, Any]:
        """The settings fixed per run at a real site (JSON-ready); ``data`` digests the test-set choice."""
        c = self.clinical
        return {"threshold": c.threshold, "positive_class": c.positive_class, "confidence": c.confidence,
                "calibration_bins": c.calibration_bins, "min_group_size": c.min_group_size,
                "age_edges": list(c.age_edges), "subgroups": list(self.subgroups), "data": self.data}


def data_digest(config: ExperimentConfig) -> str:
    """SHA-256 (16 hex) of what chooses the evaluated patients: ``data.*`` (its folder aside) and ``seed``.

    Part of the settings fixed per run: otherwise two evaluations whose test splits
    differ by a few patients (``data.dicom_test_fraction`` 0.2 and 0.21) would let
    their difference describe those few.
    """
    data = config.data.model_dump(mode="json", exclude={"data_dir"})
    return hashlib.sha256(json.dumps({"data": data, "seed": config.seed}, sort_keys=True).encode()).hexdigest()[:16]


def evaluation_rules(*, config: ExperimentConfig, simulated: bool, policy: SitePolicy | None) -> EvaluationRules:
    """The rules in force: the run config's at a simulated site, the site's policy at a real one.

    A real site without a policy uses the policy defaults (floor 10, bands 18/40/65,
    sex and age, 55 evaluations per run).
    """
    clinical = ClinicalSettings.from_config(config.clinical)
    if simulated:
        return EvaluationRules(clinical=clinical)

    def own(key: str) -> Any:
        return getattr(policy, key) if policy is not None else _DEFAULTS[key].get_default(call_default_factory=True)

    floor = max(int(own("min_group_size")), clinical.min_group_size)  # the coordinator may only raise it
    per_run = policy.evaluation_budget if policy is not None else 55  # no policy: no round limit, so 50 + 5
    return EvaluationRules(
        clinical=replace(clinical, min_group_size=floor, age_edges=parse_age_edges(own("age_bands"))),
        subgroups=tuple(own("subgroups")), per_run=per_run, lifetime=own("max_evaluations_lifetime"), limited=True,
        data=data_digest(config),
    )


def request_key(weights: Mapping[str, torch.Tensor], *, rules: EvaluationRules, config: ExperimentConfig) -> str:
    """SHA-256 of the weights (names, dtypes, shapes, bytes), the fixed settings (data included), the model config."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    settings = {"rules": rules.fingerprint(), "data": config.data.model_dump(mode="json"),
                "model": config.model.model_dump(mode="json")}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


@dataclass
class EvaluationRecord:
    """One run's evaluations at a site: how many were answered, the settings fixed, the cached replies."""

    path: Path
    count: int = 0
    settings: dict[str, Any] | None = None
    cache: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def open(cls, run_state_dir: Path) -> EvaluationRecord:
        """Read the run's record (an empty one when the run has not evaluated yet).

        Raises:
            RuntimeError: The record exists but is unreadable (it counts answered
                evaluations, so it is never reset silently).
        """
        path = Path(run_state_dir) / RECORD_FILE
        if not path.is_file():
            return cls(path=path)
        try:
            tree = json.loads(path.read_text())
            return cls(path=path, count=int(tree["count"]), settings=tree.get("settings"),
                       cache={str(k): dict(v) for k, v in tree.get("cache", {}).items()})
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise RuntimeError(
                f"evaluation record {path} is unreadable ({err}); it counts the evaluations this run was "
                "answered, so it is never reset silently: restore it from backup or start a new run name"
            ) from None

    def save(self) -> None:
        """Write the record atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".evaluation-", suffix=".json")
        with os.fdopen(fd, "w") as handle:
            json.dump({"count": self.count, "settings": self.settings, "cache": self.cache}, handle)
        os.replace(tmp, self.path)

    def reserve(self, settings: dict[str, Any]) -> None:
        """Count one more evaluation and fix the run's settings, on disk, before evaluating."""
        self.count += 1
        if self.settings is None:
            self.settings = settings
        self.save()

    def store(self, key: str, metrics: Mapping[str, float]) -> None:
        """Remember the reply to the request ``key``."""
        self.cache[key] = dict(metrics)
        self.save()


def lifetime_evaluations(state_dir: Path) -> int:
    """Evaluations this site answered over all runs (every run's record on its disk)."""
    return sum(EvaluationRecord.open(path.parent).count for path in Path(state_dir).glob(f"runs/*/{RECORD_FILE}"))
