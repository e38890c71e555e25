"""Privacy accounting for one site over a whole federated run.

A site's differential-privacy guarantee covers *every* noisy step it ever takes on
its data, across all rounds. :class:`SitePrivacy` therefore owns one Opacus
accountant for the whole run; its history is carried between rounds (and between
processes, since a Flower ClientApp may be started fresh every round) through
:meth:`SitePrivacy.state_dict` / :meth:`SitePrivacy.load_state_dict`, which use
only flat, Flower-``ConfigRecord``-friendly values.

Definitions used throughout (documented once here):

* sample rate ``q = min(batch_size, n) / n`` (``n`` = site training examples): the
  Poisson inclusion probability of each example in each step.
* steps per round ``T = ceil(local_epochs * n / min(batch_size, n))``, i.e.
  ``ceil(local_epochs / q)``, computed with a ``1e-9`` slack so that floating-point
  rounding (``0.3 * 10 / 1 = 3.0000000000000004``) does not add a step.
* The noise multiplier ``sigma`` is fixed for the whole run: either the configured
  ``noise_multiplier`` (> 0), or computed once so that ``planned_rounds * T`` steps
  spend at most ``target_epsilon`` at ``target_delta``.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from typing import TYPE_CHECKING, Any, Mapping

from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

from federation.config.schema import PrivacyConfig
from federation.privacy.calibration import calibrate_noise_after, calibrate_noise_rdp
from federation.privacy.rdp_cache import rdp_epsilon

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

logger = logging.getLogger(__name__)

STATE_FORMAT = "medfed-privacy-v1"
"""Value of the ``format`` key of :meth:`SitePrivacy.state_dict`."""

BUDGET_SLACK = 1e-6
"""Relative slack on ``target_epsilon`` in :meth:`SitePrivacy.check_round`."""

_STEP_SLACK = 1e-9

StateValue = float | int | str | list[float] | list[int]
HistoryEntry = tuple[float, float, int]


class PrivacyBudgetExhausted(Exception):
    """A round was refused because it would spend more than the site's budget.

    Attributes:
        reason: Human-readable explanation naming the epsilon spent so far, the epsilon
            after the refused round, and the budget (target epsilon and delta).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PrivacyStateError(ValueError):
    """A stored privacy state does not match this site's configuration or is malformed."""


def sample_rate_for(*, num_examples: int, batch_size: int) -> float:
    """Return the Poisson sample rate ``q = min(batch_size, n) / n``.

    Args:
        num_examples: Number of training examples at the site (``n`` > 0).
        batch_size: Expected batch size (> 0).

    Returns:
        The sample rate, in ``(0, 1]``.

    Raises:
        ValueError: If either argument is not positive.
    """
    if num_examples <= 0:
        raise ValueError(f"num_examples must be > 0, got {num_examples}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    return min(batch_size, num_examples) / num_examples


def local_steps(*, num_examples: int, batch_size: int, local_epochs: float) -> int:
    """Return the optimizer steps of one round: ``ceil(local_epochs * n / min(b, n))``.

    This equals ``ceil(local_epochs / q)`` for ``q`` from :func:`sample_rate_for`, and
    is used for both private and non-private training so that one round means the
    same amount of work either way. At least one step is always taken.

    Args:
        num_examples: Number of training examples at the site.
        batch_size: Expected batch size.
        local_epochs: Passes over the data per round (may be fractional, > 0).

    Returns:
        The number of steps per round (>= 1).

    Raises:
        ValueError: If an argument is not positive.
    """
    if local_epochs <= 0:
        raise ValueError(f"local_epochs must be > 0, got {local_epochs}")
    sample_rate_for(num_examples=num_examples, batch_size=batch_size)  # validates
    exact = local_epochs * num_examples / min(batch_size, num_examples)
    return max(1, math.ceil(exact - _STEP_SLACK))


def _new_accountant(mechanism: str) -> IAccountant:
    """Create an Opacus accountant, keeping the GDP 'experimental' warning out of stderr."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="GDP accounting is experimental")
        return create_accountant(mechanism=mechanism)


def _history_epsilon(history: list[HistoryEntry], *, delta: float, mechanism: str) -> float:
    """Epsilon of a (noise, rate, steps) history under ``mechanism``; 0.0 when empty."""
    if not history:
        return 0.0
    return _cached_epsilon(tuple(history), float(delta), mechanism)


@functools.lru_cache(maxsize=256)
def _cached_epsilon(history: tuple[HistoryEntry, ...], delta: float, mechanism: str) -> float:
    """Memoized Opacus epsilon (RDP with fractional orders costs ~0.5 s per call on CPU).

    Each round asks for the epsilon before and after it, and the next round's
    "before" is this round's "after", so caching halves the accounting work.
    RDP reuses each (sigma, q) pair's one-step curve (:mod:`federation.privacy.rdp_cache`,
    bit-identical to Opacus), so a new step count costs milliseconds.
    """
    if mechanism == "rdp":
        return rdp_epsilon(history, delta=delta)
    accountant = _new_accountant(mechanism)
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


def _merged(history: list[HistoryEntry], entry: HistoryEntry, *, mechanism: str) -> list[HistoryEntry]:
    """Return ``history`` with ``entry`` appended, merged into the last entry like Opacus does.

    Raises:
        PrivacyStateError: For the GDP accountant, which cannot compose different
            (noise, rate) pairs.
    """
    noise, rate, steps = entry
    if history and history[-1][0] == noise and history[-1][1] == rate:
        last = history[-1]
        return [*history[:-1], (last[0], last[1], last[2] + steps)]
    if history and mechanism == "gdp":
        raise PrivacyStateError("the gdp accountant needs one constant noise multiplier and sample rate")
    return [*history, (noise, rate, steps)]


def epsilon_for(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Return the epsilon of ``steps`` Poisson-subsampled Gaussian steps (pure function).

    Args:
        noise_multiplier: Noise standard deviation divided by the clipping bound.
        sample_rate: Poisson inclusion probability per step.
        steps: Number of noisy steps (0 gives 0.0).
        delta: Target delta.
        accountant: Opacus accounting mechanism: ``"rdp"``, ``"prv"`` or ``"gdp"``.

    Returns:
        The epsilon spent, as computed by the Opacus accountant.

    Raises:
        ValueError: On a negative step count.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if steps == 0:
        return 0.0
    history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return _history_epsilon(history, delta=delta, mechanism=accountant)


@functools.lru_cache(maxsize=64)
def _calibrated_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, mechanism: str) -> float:
    """Opacus' ``get_noise_multiplier`` for ``steps`` steps (memoized: sites of a simulation share it).

    RDP goes through :func:`~federation.privacy.calibration.calibrate_noise_rdp`: the
    same search and the same result, 4-9x faster.
    """
    if mechanism == "rdp":
        return calibrate_noise_rdp(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="GDP accounting is experimental")
        # The binary search probes huge sigmas whose best RDP order is the largest one.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=mechanism,
        )
    return float(sigma)


class SitePrivacy:
    """One site's DP-SGD parameters and privacy accountant for a whole federated run.

    Create it once per site process, load the state carried from the previous round
    (if any) with :meth:`load_state_dict`, call :meth:`check_round` before training,
    train through :meth:`make_private` (or :func:`federation.training.train_local`),
    then persist :meth:`state_dict` for the next round.

    Example::

        privacy = SitePrivacy(config=cfg.privacy, num_examples=len(train_set),
                              batch_size=cfg.train.batch_size,
                              local_epochs=cfg.train.local_epochs,
                              planned_rounds=cfg.server.rounds)
        if "privacy" in context.state:                      # carried from the last round
            privacy.load_state_dict(dict(context.state["privacy"]))
        result = train_local(model=model, dataset=train_set, config=cfg.train,
                             privacy=privacy, seed=seed)
        context.state["privacy"] = ConfigRecord(privacy.state_dict())
    """

    def __init__(
        self,
        *,
        config: PrivacyConfig,
        num_examples: int,
        batch_size: int,
        local_epochs: float,
        planned_rounds: int,
    ) -> None:
        """Set up the accountant; the noise multiplier is resolved lazily (see class doc).

        Args:
            config: The privacy section of the experiment config (``enabled`` must be true).
            num_examples: Training examples at this site.
            batch_size: Expected (Poisson) batch size.
            local_epochs: Passes over the data per round (may be fractional).
            planned_rounds: Rounds the budget is planned for (target-epsilon mode).

        Raises:
            ValueError: If privacy is disabled in ``config`` or an argument is invalid.
        """
        if not config.enabled:
            raise ValueError("privacy.enabled is false: train with privacy=None instead of a SitePrivacy")
        if planned_rounds < 1:
            raise ValueError(f"planned_rounds must be >= 1, got {planned_rounds}")
        self._config = config
        self._num_examples = int(num_examples)
        self._batch_size = int(batch_size)
        self._local_epochs = float(local_epochs)
        self._planned_rounds = int(planned_rounds)
        self._sample_rate = sample_rate_for(num_examples=num_examples, batch_size=batch_size)
        self._steps_per_round = local_steps(
            num_examples=num_examples, batch_size=batch_size, local_epochs=local_epochs
        )
        self._noise: float | None = float(config.noise_multiplier) if config.noise_multiplier > 0 else None
        self._stored_noise: float | None = None  # the noise of a restored state (load_state_dict)
        self._accountant = _new_accountant(config.accountant)
        if config.accountant == "gdp":
            logger.warning("gdp accounting is experimental in Opacus and can underestimate epsilon")

    # ----------------------------------------------------------------- properties
    @property
    def config(self) -> PrivacyConfig:
        """The privacy configuration this site was built from."""
        return self._config

    @property
    def accountant(self) -> IAccountant:
        """The Opacus accountant holding the whole run's history (shared with the engine)."""
        return self._accountant

    @property
    def delta(self) -> float:
        """The target delta every epsilon is reported at."""
        return float(self._config.target_delta)

    @property
    def target_epsilon(self) -> float:
        """The site's epsilon budget for the whole run."""
        return float(self._config.target_epsilon)

    @property
    def sample_rate(self) -> float:
        """Poisson sample rate ``q`` (see module doc)."""
        return self._sample_rate

    @property
    def steps_per_round(self) -> int:
        """Noisy steps one round takes (see module doc)."""
        return self._steps_per_round

    @property
    def num_examples(self) -> int:
        """Training examples at this site."""
        return self._num_examples

    @property
    def batch_size(self) -> int:
        """Expected batch size."""
        return self._batch_size

    @property
    def local_epochs(self) -> float:
        """Passes over the data per round."""
        return self._local_epochs

    @property
    def planned_rounds(self) -> int:
        """Rounds the budget was planned for."""
        return self._planned_rounds

    @property
    def noise_multiplier(self) -> float:
        """Noise multiplier sigma, fixed for the run (computed on first use in target mode)."""
        if self._noise is None:
            self._noise = self._calibrate_noise()
        return self._noise

    @property
    def history(self) -> list[HistoryEntry]:
        """A copy of the accountant history: ``(noise_multiplier, sample_rate, steps)`` tuples."""
        return [(float(n), float(q), int(s)) for n, q, s in self._accountant.history]

    @property
    def total_steps(self) -> int:
        """Noisy steps taken so far in the whole run."""
        return sum(steps for _, _, steps in self._accountant.history)

    # ----------------------------------------------------------------- accounting
    def _calibrate_noise(self) -> float:
        """Smallest sigma (Opacus binary search) with eps(planned steps) <= target.

        A run whose budget was changed on resume (:meth:`load_state_dict`) calibrates
        only its remaining planned steps, composed with the accountant's history, so
        that the whole run stays within the new target.
        """
        steps = self._planned_rounds * self._steps_per_round
        if self.history:
            remaining = steps - self.total_steps
            try:
                sigma = calibrate_noise_after(
                    history=self.history, target_epsilon=self.target_epsilon, delta=self.delta,
                    sample_rate=self._sample_rate, steps=remaining, accountant=self._config.accountant,
                )
            except ValueError as impossible:  # budget spent: keep the run's noise, check_round refuses
                logger.warning("no noise fits the changed budget (%s); keeping %g", impossible, self._stored_noise)
                return float(self._stored_noise)
            logger.info(
                "noise multiplier %.6g for the remaining %d steps: the run's epsilon %.4f so far stays within "
                "%g (delta=%g) over %d rounds", sigma, remaining, self.epsilon_spent(), self.target_epsilon,
                self.delta, self._planned_rounds,
            )
            return sigma
        sigma = _calibrated_noise(
            self.target_epsilon, self.delta, self._sample_rate, steps, self._config.accountant
        )
        logger.info(
            "noise multiplier %.6g for (eps=%g, delta=%g) over %d rounds x %d steps at q=%.6g",
            sigma, self.target_epsilon, self.delta, self._planned_rounds, self._steps_per_round,
            self._sample_rate,
        )
        return sigma

    def epsilon_spent(self) -> float:
        """Return the epsilon spent so far over the whole run (0.0 before any step)."""
        return _history_epsilon(self.history, delta=self.delta, mechanism=self._config.accountant)

    def epsilon_after(self, steps: int) -> float:
        """Return the epsilon after ``steps`` more noisy steps, without changing state.

        Args:
            steps: Additional steps at this site's noise multiplier and sample rate.

        Raises:
            ValueError: On a negative step count.
        """
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        history = self.history
        if steps:
            history = _merged(
                history, (self.noise_multiplier, self._sample_rate, int(steps)),
                mechanism=self._config.accountant,
            )
        return _history_epsilon(history, delta=self.delta, mechanism=self._config.accountant)

    def check_round(self) -> None:
        """Refuse a round that would take the site past its epsilon budget.

        Raises:
            PrivacyBudgetExhausted: If ``epsilon_after(steps_per_round)`` exceeds
                ``target_epsilon * (1 + 1e-6)``. Nothing is spent in that case.
        """
        spent = self.epsilon_spent()
        after = self.epsilon_after(self._steps_per_round)
        if after > self.target_epsilon * (1.0 + BUDGET_SLACK):
            raise PrivacyBudgetExhausted(
                f"privacy budget exhausted: epsilon spent {spent:.4f}, another round of "
                f"{self._steps_per_round} steps would reach {after:.4f}, budget is "
                f"target_epsilon={self.target_epsilon:g} at delta={self.delta:g} "
                f"({self._config.accountant} accountant, noise_multiplier={self.noise_multiplier:.4g})"
            )

    def record_steps(self, steps: int) -> None:
        """Append ``steps`` noisy steps at this site's (sigma, q) to the accountant history.

        Use this only for steps taken outside :meth:`make_private` (whose optimizer
        records its own steps). Consecutive entries with equal (sigma, q) are merged.

        Args:
            steps: Number of noisy steps taken (0 is a no-op).

        Raises:
            ValueError: On a negative step count.
        """
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if steps == 0:
            return
        self._accountant.history = _merged(
            self.history, (self.noise_multiplier, self._sample_rate, int(steps)),
            mechanism=self._config.accountant,
        )

    # ----------------------------------------------------------------- training
    def make_private(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        seed: int | None = None,
    ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
        """Wrap training objects for DP-SGD accounted by this site's accountant.

        See :func:`federation.privacy.engine.make_private` for the details (Poisson
        sampling at exactly :attr:`sample_rate`, fixed :attr:`noise_multiplier`,
        ``config.max_grad_norm`` clipping, ``config.grad_sample_mode``). Every noisy
        optimizer step, including noise-only steps on empty batches, is recorded in
        this site's accountant.

        Args:
            model: The model to train (moved to its device already). It is wrapped,
                not copied: its parameters receive the updates.
            optimizer: An optimizer over ``model``'s parameters.
            data_loader: A loader over the site's training set (its dataset,
                collate function and worker settings are reused).
            seed: ``None`` (default; what a real site must use): the Poisson
                sampler and the noise draw from secret generators seeded from the
                OS CSPRNG. An int makes them reproducible (simulation only).

        Returns:
            ``(dp_model, dp_optimizer, dp_data_loader)``. Undo the wrapping with
            :func:`federation.privacy.engine.unwrap_model` after training.

        Raises:
            ValueError: If the dataset size differs from ``num_examples`` or the
                model is not DP-compatible (e.g. it has BatchNorm).
        """
        from federation.privacy.engine import make_private

        return make_private(
            accountant=self._accountant,
            model=model,
            optimizer=optimizer,
            data_loader=data_loader,
            num_examples=self._num_examples,
            sample_rate=self._sample_rate,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=float(self._config.max_grad_norm),
            grad_sample_mode=self._config.grad_sample_mode,
            seed=seed,
        )

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, StateValue]:
        """Return the run-long privacy state as flat Flower-ConfigRecord-friendly values.

        Keys: ``format``, ``accountant``, ``noise_multiplier``, ``sample_rate``,
        ``delta``, ``target_epsilon``, ``steps_per_round``, ``total_steps``,
        ``epsilon`` (informational), and the accountant history as parallel lists
        ``history_noise`` (floats), ``history_rate`` (floats), ``history_steps`` (ints).
        """
        history = self.history
        return {
            "format": STATE_FORMAT,
            "accountant": self._config.accountant,
            "noise_multiplier": float(self.noise_multiplier),
            "sample_rate": float(self._sample_rate),
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "planned_rounds": int(self._planned_rounds),
            "steps_per_round": int(self._steps_per_round),
            "total_steps": int(self.total_steps),
            "epsilon": float(self.epsilon_spent()),
            "history_noise": [float(n) for n, _, _ in history],
            "history_rate": [float(q) for _, q, _ in history],
            "history_steps": [int(s) for _, _, s in history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state written by :meth:`state_dict` (e.g. in the previous round).

        The stored noise multiplier is adopted (in target-epsilon mode it is not
        recomputed, so it stays fixed for the run), unless the run's budget was changed
        on resume (``target_epsilon`` differs from the stored one, in target-epsilon
        mode, with planned steps left): then the noise of the remaining planned steps
        is calibrated from this history so that the whole run stays within the new
        target (an extended run: ``--set privacy.target_epsilon=12 --set server.rounds=12``).

        Args:
            state: A mapping with the keys of :meth:`state_dict`.

        Raises:
            PrivacyStateError: If the state is malformed, or was written with a
                different accountant, sample rate (dataset size / batch size), delta,
                or - when ``config.noise_multiplier > 0`` - a different noise multiplier.
        """
        _check_state_shape(state)
        self._check_state_matches(state)
        noise, rates, steps = state["history_noise"], state["history_rate"], state["history_steps"]
        history: list[HistoryEntry] = []
        for entry in zip(noise, rates, steps):
            history = _merged(
                history, (float(entry[0]), float(entry[1]), int(entry[2])), mechanism=self._config.accountant
            )
        self._accountant.history = history
        self._noise = self._stored_noise = float(state["noise_multiplier"])
        stored_target = float(state["target_epsilon"])
        if not math.isclose(stored_target, self.target_epsilon, rel_tol=1e-12):
            replan = self._config.noise_multiplier == 0 and self.total_steps < self._planned_rounds * self._steps_per_round
            logger.warning(
                "privacy target_epsilon changed from %g (stored) to %g (config)%s", stored_target, self.target_epsilon,
                ": the remaining planned steps get their noise calibrated from the accountant's history" if replan
                else "; the budget check uses the new target",
            )
            if replan:
                self._noise = None  # calibrated on first use (_calibrate_noise), composed with the history
        logger.debug("privacy state loaded: %d steps, epsilon %.4f", self.total_steps, self.epsilon_spent())

    def _check_state_matches(self, state: Mapping[str, Any]) -> None:
        """Raise PrivacyStateError when ``state`` belongs to a different configuration."""
        problems = []
        if state["accountant"] != self._config.accountant:
            problems.append(f"accountant {state['accountant']!r} (stored) vs {self._config.accountant!r} (config)")
        if not math.isclose(float(state["sample_rate"]), self._sample_rate, rel_tol=1e-12):
            problems.append(
                f"sample rate {float(state['sample_rate']):.6g} (stored) vs {self._sample_rate:.6g} "
                f"(batch_size {self._batch_size} / {self._num_examples} examples now)"
            )
        if not math.isclose(float(state["delta"]), self.delta, rel_tol=1e-12):
            problems.append(f"delta {float(state['delta']):g} (stored) vs {self.delta:g} (config)")
        stored_noise = float(state["noise_multiplier"])
        configured = float(self._config.noise_multiplier)
        if configured > 0 and not math.isclose(stored_noise, configured, rel_tol=1e-12):
            problems.append(f"noise_multiplier {stored_noise:g} (stored) vs {configured:g} (config)")
        if problems:
            raise PrivacyStateError("stored privacy state does not match this site: " + "; ".join(problems))


def _check_state_shape(state: Mapping[str, Any]) -> None:
    """Raise PrivacyStateError unless ``state`` has the keys and list shapes of a state_dict."""
    required = (
        "format", "accountant", "noise_multiplier", "sample_rate", "delta", "target_epsilon",
        "history_noise", "history_rate", "history_steps",
    )
    missing = [key for key in required if key not in state]
    if missing:
        raise PrivacyStateError(f"privacy state lacks keys {missing}")
    if state["format"] != STATE_FORMAT:
        raise PrivacyStateError(f"unknown privacy state format {state['format']!r} (expected {STATE_FORMAT!r})")
    lists = [list(state[k]) for k in ("history_noise", "history_rate", "history_steps")]
    if len({len(values) for values in lists}) != 1:
        raise PrivacyStateError(
            "privacy state history lists differ in length: "
            f"noise {len(lists[0])}, rate {len(lists[1])}, steps {len(lists[2])}"
        )
    if any(int(s) != s or s <= 0 for s in lists[2]):
        raise PrivacyStateError(f"privacy state history_steps must be positive integers, got {lists[2]}")
    if any(not 0.0 < float(q) <= 1.0 for q in lists[1]) or any(float(n) <= 0.0 for n in lists[0]):
        raise PrivacyStateError("privacy state history holds a sample rate outside (0, 1] or a noise <= 0")
