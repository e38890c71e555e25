"""Site-side differential privacy: DP-SGD with Opacus and run-long privacy accounting.

One :class:`SitePrivacy` per site holds the accountant for the *whole* federated run.
Its state travels between rounds through :meth:`SitePrivacy.state_dict` /
:meth:`SitePrivacy.load_state_dict` (flat values that fit a Flower ``ConfigRecord``),
so a site process started fresh every round still reports the cumulative epsilon.

Example::

    from federation.privacy import PrivacyBudgetExhausted, SitePrivacy

    privacy = SitePrivacy(config=cfg.privacy, num_examples=len(train_set),
                          batch_size=cfg.train.batch_size,
                          local_epochs=cfg.train.local_epochs,
                          planned_rounds=cfg.server.rounds)
    privacy.load_state_dict(stored_state)       # when a previous round stored one
    try:
        privacy.check_round()
    except PrivacyBudgetExhausted as stop:
        ...                                     # report stop.reason, do not train
"""

from federation.privacy.budget import (
    STATE_FORMAT,
    PrivacyBudgetExhausted,
    PrivacyStateError,
    SitePrivacy,
    epsilon_for,
    local_steps,
    sample_rate_for,
)
from federation.privacy.engine import (
    EmptyBatch,
    clipped_backward,
    is_empty_batch,
    noise_only_step,
    strip_module_prefix,
    unwrap_model,
    uses_clipped_backward,
)

__all__ = [
    "STATE_FORMAT",
    "EmptyBatch",
    "PrivacyBudgetExhausted",
    "PrivacyStateError",
    "SitePrivacy",
    "clipped_backward",
    "epsilon_for",
    "is_empty_batch",
    "local_steps",
    "noise_only_step",
    "sample_rate_for",
    "strip_module_prefix",
    "unwrap_model",
    "uses_clipped_backward",
]
