"""The cached RDP epsilon equals Opacus' RDP accountant bit for bit, and is reused."""

from __future__ import annotations

import warnings

import pytest
from opacus.accountants import RDPAccountant

from federation.config.schema import PrivacyConfig
from federation.privacy import SitePrivacy, epsilon_for
from federation.privacy.rdp_cache import rdp_epsilon, rdp_per_step


def _opacus(history: list[tuple[float, float, int]], delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta))


@pytest.mark.parametrize(
    "history, delta",
    [
        ([(0.979, 32 / 120, 4)], 1e-5),
        ([(1.1, 0.01, 1)], 1e-5),
        ([(1.1, 0.01, 2500)], 1e-6),
        ([(0.6, 0.5, 7), (0.9, 0.25, 13)], 1e-3),  # mixed history: summed curves
        ([(3.0, 1.0, 10)], 1e-5),  # q = 1: the closed form
        ([(0.979, 32 / 120, 4), (0.979, 32 / 120, 8)], 1e-5),  # unmerged equal entries
    ],
)
def test_rdp_epsilon_equals_opacus_exactly(history: list[tuple[float, float, int]], delta: float) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rdp_epsilon(history, delta=delta) == _opacus(history, delta)


def test_one_step_curve_is_computed_once_per_noise_and_rate() -> None:
    rdp_per_step.cache_clear()
    for steps in (1, 5, 17, 300):
        rdp_epsilon([(1.3, 0.05, steps)], delta=1e-5)
    info = rdp_per_step.cache_info()
    assert (info.misses, info.hits) == (1, 3)
    assert rdp_epsilon([], delta=1e-5) == 0.0


def test_site_privacy_and_epsilon_for_use_the_same_numbers_as_opacus() -> None:
    config = PrivacyConfig(noise_multiplier=1.2)
    privacy = SitePrivacy(config=config, num_examples=200, batch_size=20, local_epochs=1.0, planned_rounds=5)
    privacy.record_steps(30)
    expected = _opacus([(1.2, 0.1, 30)], 1e-5)
    assert privacy.epsilon_spent() == expected
    assert privacy.epsilon_after(10) == _opacus([(1.2, 0.1, 40)], 1e-5)
    assert epsilon_for(noise_multiplier=1.2, sample_rate=0.1, steps=30, delta=1e-5) == expected
