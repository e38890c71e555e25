"""Results of one round of local training and of one evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Every metric a site may send after training (its reply's MetricRecord names), declared once:
#: ``num-examples`` (the FedAvg weight), ``train-loss``, ``epsilon``, ``delta``,
#: ``noise-multiplier``, ``steps``, ``seconds``.
TRAIN_METRICS: tuple[str, ...] = (
    "num-examples", "train-loss", "epsilon", "delta", "noise-multiplier", "steps", "seconds",
)
#: Train metrics computed from the training data with no DP noise and outside the
#: epsilon accounting: a real site training with DP never sends them.
UNPRIVATIZED_TRAIN_METRICS: frozenset[str] = frozenset({"train-loss"})


@dataclass(frozen=True)
class TrainResult:
    """What one site's local training round produced (besides the weights).

    Attributes:
        num_examples: Training examples at the site (the FedAvg weight).
        loss: Mean training loss of the round, weighted by batch size; NaN if every
            batch was empty. Under DP this value is *not* privatized: it is an exact
            statistic of the training data (see :data:`UNPRIVATIZED_TRAIN_METRICS`).
        steps: Optimizer steps taken (under DP, including noise-only steps).
        epsilon: Epsilon spent by the site over the whole run after this round
            (0.0 when DP is off).
        delta: The delta epsilon is reported at (0.0 when DP is off).
        noise_multiplier: DP-SGD noise multiplier (0.0 when DP is off).
        seconds: Wall-clock seconds of the round.
    """

    num_examples: int
    loss: float
    steps: int
    epsilon: float
    delta: float
    noise_multiplier: float
    seconds: float

    def metrics(self, *, unprivatized: bool = True) -> dict[str, float]:
        """The round's metrics as floats under their :data:`TRAIN_METRICS` names (a site's reply).

        Args:
            unprivatized: Include :data:`UNPRIVATIZED_TRAIN_METRICS` (the exact training
                loss). A real site training with DP passes False: the loss is an
                un-noised, unaccounted statistic of its patients' data.
        """
        values = {
            "num-examples": float(self.num_examples),
            "train-loss": float(self.loss),
            "epsilon": float(self.epsilon),
            "delta": float(self.delta),
            "noise-multiplier": float(self.noise_multiplier),
            "steps": float(self.steps),
            "seconds": float(self.seconds),
        }
        if not unprivatized:
            values = {name: value for name, value in values.items() if name not in UNPRIVATIZED_TRAIN_METRICS}
        return values


@dataclass(frozen=True, eq=False)
class EvalResult:
    """Evaluation of a model on a dataset (``eq=False``: it holds NumPy arrays).

    Attributes:
        num_examples: Examples evaluated.
        loss: Mean cross-entropy.
        auc: ROC AUC (one-vs-rest macro for more than two classes; NaN if undefined).
        accuracy: Fraction of arg-max predictions equal to the label.
        probs: Softmax probabilities, shape ``(num_examples, num_classes)``.
        labels: Integer labels, shape ``(num_examples,)``.
    """

    num_examples: int
    loss: float
    auc: float
    accuracy: float
    probs: np.ndarray
    labels: np.ndarray

    def metrics(self) -> dict[str, float]:
        """Return ``{"loss", "auc", "accuracy"}`` as floats."""
        return {"loss": float(self.loss), "auc": float(self.auc), "accuracy": float(self.accuracy)}
