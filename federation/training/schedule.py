"""A site's local schedule: steps per round (``train.local_steps``) and the round's learning rate.

FLamby-style protocols give every site the same number of local updates per
round whatever its size (100 batches of 4 on Fed-Heart-Disease). The training
loop and the privacy accountant count work in epochs
(``steps = ceil(local_epochs * n / min(b, n))``), so a step count is turned into
the site's own ``local_epochs = steps * min(b, n) / n``, which gives exactly that
many steps in both (their 1e-9 slack absorbs the rounding).

``train.lr_schedule=cosine`` decays the local learning rate over the planned rounds,
from ``lr`` in round 1 to ``lr * lr_final`` in the last round (the server sends
each site the true round number, also after a resume). Every site computes the same
value from the run config, so nothing extra travels.
"""

from __future__ import annotations

import math

from federation.config import ExperimentConfig
from federation.config.schema import TrainConfig
from federation.privacy import local_steps


def site_train_config(train: TrainConfig, *, num_examples: int) -> TrainConfig:
    """The ``train`` section as one site of ``num_examples`` samples runs it.

    Args:
        train: The run's ``train`` section.
        num_examples: The site's training samples.

    Returns:
        ``train`` itself when ``local_steps`` is 0, else a copy whose
        ``local_epochs`` yields exactly ``local_steps`` steps at this site.

    Raises:
        ValueError: If ``num_examples`` is not positive.
    """
    if train.local_steps == 0:
        return train
    if num_examples < 1:
        raise ValueError(f"a site needs training samples to take train.local_steps steps, got {num_examples}")
    epochs = train.local_steps * min(train.batch_size, num_examples) / num_examples
    site = train.model_copy(update={"local_epochs": epochs})
    steps = local_steps(num_examples=num_examples, batch_size=train.batch_size, local_epochs=epochs)
    if steps != train.local_steps:  # pragma: no cover - guarded by the slack in local_steps
        raise RuntimeError(f"train.local_steps={train.local_steps} became {steps} steps for {num_examples} samples")
    return site


def round_learning_rate(train: TrainConfig, *, server_round: int, total_rounds: int) -> float:
    """The local learning rate of ``server_round`` (1-based) of ``total_rounds``.

    Args:
        train: The run's ``train`` section (``lr``, ``lr_schedule``, ``lr_final``).
        server_round: The round being trained; clamped to ``[1, total_rounds]``.
        total_rounds: Rounds planned for the run (``server.rounds``).

    Returns:
        ``lr`` for ``constant``; for ``cosine``
        ``lr * (f + (1 - f) * (1 + cos(pi * (r - 1) / (R - 1))) / 2)`` with ``f = lr_final``.
    """
    if train.lr_schedule == "constant" or total_rounds <= 1:
        return train.lr
    progress = (min(max(server_round, 1), total_rounds) - 1) / (total_rounds - 1)
    return train.lr * (train.lr_final + (1.0 - train.lr_final) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def with_site_schedule(config: ExperimentConfig, *, num_examples: int, server_round: int = 1) -> ExperimentConfig:
    """``config`` as one site trains ``server_round``: :func:`site_train_config` and the round's lr."""
    train = site_train_config(config.train, num_examples=num_examples)
    lr = round_learning_rate(config.train, server_round=server_round, total_rounds=config.server.rounds)
    if lr != train.lr:
        train = train.model_copy(update={"lr": lr})
    return config if train is config.train else config.model_copy(update={"train": train})
