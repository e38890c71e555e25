"""A site's local schedule: a fixed number of steps per round (``train.local_steps``).

FLamby-style protocols give every site the same number of local updates per
round whatever its size (100 batches of 4 on Fed-Heart-Disease). The training
loop and the privacy accountant count work in epochs
(``steps = ceil(local_epochs * n / min(b, n))``), so a step count is turned into
the site's own ``local_epochs = steps * min(b, n) / n``, which gives exactly that
many steps in both (their 1e-9 slack absorbs the rounding).
"""

from __future__ import annotations

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


def with_site_schedule(config: ExperimentConfig, *, num_examples: int) -> ExperimentConfig:
    """``config`` with its ``train`` section replaced by :func:`site_train_config`."""
    train = site_train_config(config.train, num_examples=num_examples)
    return config if train is config.train else config.model_copy(update={"train": train})
