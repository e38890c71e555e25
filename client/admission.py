"""Whether a site takes part in a round: its policy and its privacy ledger decide.

Plain functions, no Flower types. :func:`admit_train_round` runs before every
training round (after the run's accountant is restored) and either returns a
refusal reason (``"<code>: <detail>"``, see :data:`client.guard.REFUSAL_CODES`)
or reserves this round's epsilon in the ledger. :func:`evaluate_refusal` is the
same check for evaluation, which spends no privacy budget.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from client.evaluation import EvaluationRecord, EvaluationRules
from client.guard import refusal
from client.ledger import BUDGET_SLACK, PrivacyLedger
from client.policy import SitePolicy
from federation.config import ExperimentConfig

if TYPE_CHECKING:  # Opacus loads with the accountant a training round brings (evaluation never does)
    from federation.privacy import SitePrivacy

logger = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _name(value: str) -> str:
    """A name from the run config, quoted, or a placeholder when it could not leave the site."""
    return repr(value) if _SAFE_NAME.match(value) else "(a name outside the safe alphabet)"


@dataclass(frozen=True)
class Admission:
    """The decision on one training round and the epsilons around it.

    Run epsilons are the run's own accountant; lifetime epsilons add every other
    run in the ledger. ``*_after`` is what the round would reach (planned). All
    epsilons are None for a run without DP.
    """

    refusal: str | None
    run_epsilon_before: float | None = None
    run_epsilon_after: float | None = None
    lifetime_epsilon_before: float | None = None
    lifetime_epsilon_after: float | None = None
    lifetime_delta_after: float | None = None


def evaluate_refusal(policy: SitePolicy | None, config: ExperimentConfig) -> str | None:
    """Refusal reason for an evaluation request, or None: only the model and strategy are checked."""
    if policy is None:
        return None
    if policy.allowed_models is not None and config.model.name not in policy.allowed_models:
        return refusal("model-not-allowed",
                       f"model {_name(config.model.name)} is not allowed; allowed: {', '.join(policy.allowed_models)}")
    if policy.allowed_strategies is not None and config.strategy.name not in policy.allowed_strategies:
        return refusal("strategy-not-allowed",
                       f"strategy {_name(config.strategy.name)} is not allowed; "
                       f"allowed: {', '.join(policy.allowed_strategies)}")
    return None


def evaluation_budget_refusal(
    *, rules: EvaluationRules, record: EvaluationRecord, lifetime_count: int
) -> str | None:
    """Refusal reason for an evaluation a real site would answer fresh (not from its cache), or None.

    The clinical settings are fixed by the run's first evaluation; the run's and the
    site's lifetime evaluation budgets (:mod:`client.evaluation`) are checked after.
    """
    if not rules.limited:
        return None
    fixed, asked = record.settings, rules.fingerprint()
    if fixed is not None and fixed != asked:
        changed = sorted(key for key in asked if fixed.get(key) != asked[key])
        return refusal("evaluation-settings",
                       f"this run was first evaluated with other {', '.join(changed)}; "
                       "a site fixes its clinical settings for the whole run")
    if rules.per_run is not None and record.count >= rules.per_run:
        return refusal("evaluation-budget",
                       f"{record.count} evaluations answered in this run, the site's max_evaluations_per_run "
                       f"is {rules.per_run}")
    if rules.lifetime is not None and lifetime_count >= rules.lifetime:
        return refusal("evaluation-budget",
                       f"{lifetime_count} evaluations answered over all runs, the site's "
                       f"max_evaluations_lifetime is {rules.lifetime}")
    return None


def request_refusal(policy: SitePolicy | None, config: ExperimentConfig) -> str | None:
    """Policy checks that need only the run config: model, strategy, DP, accountant, clipping."""
    if policy is None:
        return None
    reason = evaluate_refusal(policy, config)
    if reason is not None:
        return reason
    if not config.privacy.enabled:
        if policy.allow_non_dp:
            return None
        return refusal("dp-required", "privacy.enabled=false but this site trains only with differential privacy")
    if config.privacy.accountant not in policy.allowed_accountants:
        return refusal("accountant-not-allowed",
                       f"accountant {_name(config.privacy.accountant)} is not allowed; "
                       f"allowed: {', '.join(policy.allowed_accountants)}")
    if policy.max_grad_norm is not None and config.privacy.max_grad_norm > policy.max_grad_norm:
        return refusal("clipping-too-high",
                       f"privacy.max_grad_norm={config.privacy.max_grad_norm:g} is above "
                       f"the site's maximum {policy.max_grad_norm:g}")
    return None


def _rounds_refusal(policy: SitePolicy | None, ledger: PrivacyLedger, run: str, server_round: int) -> str | None:
    if policy is None or policy.max_rounds_per_run is None:
        return None
    done = ledger.runs[run].rounds if run in ledger.runs else 0
    if server_round > policy.max_rounds_per_run or done >= policy.max_rounds_per_run:
        return refusal("max-rounds",
                       f"round {server_round} (after {done} trained in this run) is beyond "
                       f"the site's max_rounds_per_run={policy.max_rounds_per_run}")
    return None


def delta_refusal(policy: SitePolicy | None, privacy: SitePrivacy) -> str | None:
    """Refusal reason when the run's delta is above 1/n of the site's training set or the policy's max_delta.

    A delta of 1/n or more allows a mechanism that releases one whole patient record
    (at delta 0.5 the accountant even reports a negative epsilon), so the site
    checks it itself whatever the run config says.
    """
    delta, n = privacy.delta, privacy.num_examples
    if delta > 1.0 / n:
        return refusal("delta-too-high",
                       f"privacy.target_delta={delta:g} is above 1 over this site's {n} training examples "
                       f"({1.0 / n:.3g})")
    if policy is not None and policy.max_delta is not None and delta > policy.max_delta:
        return refusal("delta-too-high",
                       f"privacy.target_delta={delta:g} is above the site's max_delta {policy.max_delta:g}")
    return None


def _privacy_refusal(
    policy: SitePolicy | None, ledger: PrivacyLedger, run: str, privacy: SitePrivacy
) -> tuple[str | None, Admission]:
    """Noise floor, ledger consistency, run budget and lifetime budget, in that order."""
    from federation.privacy import PrivacyBudgetExhausted  # noqa: PLC0415 - see the TYPE_CHECKING import

    before = privacy.epsilon_spent()
    after = privacy.epsilon_after(privacy.steps_per_round)
    life_before, _ = ledger.lifetime_after(run, run_epsilon=before, delta=privacy.delta)
    life_after, delta_after = ledger.lifetime_after(run, run_epsilon=after, delta=privacy.delta)
    numbers = Admission(None, before, after, life_before, life_after, delta_after)
    recorded = ledger.runs[run].epsilon if run in ledger.runs else 0.0
    if recorded > before * (1.0 + BUDGET_SLACK) + 1e-12:
        return refusal("ledger-mismatch",
                       f"the ledger records epsilon {recorded:.4f} for this run but its accountant holds "
                       f"{before:.4f}; the run's privacy state was lost, start a new run name"), numbers
    if policy is not None and privacy.noise_multiplier < policy.min_noise_multiplier:
        return refusal("noise-too-low",
                       f"noise multiplier {privacy.noise_multiplier:.4g} is below the site's minimum "
                       f"{policy.min_noise_multiplier:g}"), numbers
    try:
        privacy.check_round()
    except PrivacyBudgetExhausted as stop:
        return refusal("run-budget", stop.reason), numbers
    if policy is not None and not ledger.within(life_after, policy.lifetime_epsilon):
        return refusal("lifetime-epsilon",
                       f"lifetime epsilon spent {life_before:.4f}, this round would reach {life_after:.4f}, "
                       f"the site's lifetime budget is {policy.lifetime_epsilon:g}"), numbers
    if policy is not None and not ledger.within(delta_after, policy.lifetime_delta):
        return refusal("lifetime-delta",
                       f"lifetime delta would reach {delta_after:.3g} with this run's delta {privacy.delta:g}, "
                       f"the site's lifetime delta is {policy.lifetime_delta:g}"), numbers
    return None, numbers


def admit_train_round(
    *,
    policy: SitePolicy | None,
    ledger: PrivacyLedger,
    config: ExperimentConfig,
    privacy: SitePrivacy | None,
    run: str,
    server_round: int,
    run_id: int | None = None,
) -> Admission:
    """Decide on one training round; when admitted, reserve its epsilon in the ledger.

    Args:
        policy: The site's policy (None: only the run's own budget applies).
        ledger: The site's privacy ledger.
        config: The run config received from the coordinator.
        privacy: The run's accountant (restored), or None without DP.
        run: The run name (ledger key).
        server_round: The coordinator's round number.
        run_id: Flower's run id (recorded in the ledger).

    Returns:
        The decision; ``refusal`` is None when the site trains.
    """
    reason = request_refusal(policy, config) or _rounds_refusal(policy, ledger, run, server_round)
    if reason is None and privacy is not None and (delta_reason := delta_refusal(policy, privacy)) is not None:
        return Admission(delta_reason)  # before any epsilon is computed at that delta
    if reason is None and privacy is None:
        ledger.reserve(run, epsilon=0.0, delta=0.0, dp=False, run_id=run_id)
        return Admission(None)
    if reason is not None:
        if privacy is None:
            return Admission(reason)
        before = privacy.epsilon_spent()
        life_before, _ = ledger.lifetime_after(run, run_epsilon=before, delta=privacy.delta)
        return Admission(reason, before, before, life_before, life_before)
    reason, numbers = _privacy_refusal(policy, ledger, run, privacy)
    if reason is None:
        ledger.reserve(run, epsilon=float(numbers.run_epsilon_after), delta=privacy.delta, run_id=run_id)
    return Admission(reason, numbers.run_epsilon_before, numbers.run_epsilon_after,
                     numbers.lifetime_epsilon_before, numbers.lifetime_epsilon_after, numbers.lifetime_delta_after)
