"""Local training and evaluation on tiny synthetic data, with and without DP-SGD."""

from __future__ import annotations

import platform
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import federation.training.device as device_module
import federation.training.local as local_module
from federation.config.schema import PrivacyConfig, TrainConfig
from federation.privacy import PrivacyBudgetExhausted, SitePrivacy, epsilon_for
from federation.training import (
    EvalResult,
    TrainResult,
    evaluate,
    model_state,
    seed_everything,
    select_device,
    train_local,
)

pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off")

CPU = torch.device("cpu")


def _dataset(n: int = 64, *, seed: int = 0, shift: float = 1.5) -> TensorDataset:
    """``n`` 1x8x8 images; the label shifts the top half up or down (learnable signal)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=generator)
    images = torch.randn(n, 1, 8, 8, generator=generator)
    images[:, :, :4] += shift * (2 * labels.float() - 1)[:, None, None, None]
    return TensorDataset(images, labels)


def _model(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 2),
    )


def _config(**overrides: object) -> TrainConfig:
    values = {"local_epochs": 1.0, "batch_size": 16, "lr": 0.1, "device": "cpu", "num_threads": 2}
    values.update(overrides)
    return TrainConfig(**values)


def _privacy(n: int, *, batch_size: int = 16, rounds: int = 3, **privacy: object) -> SitePrivacy:
    values: dict[str, object] = {"noise_multiplier": 0.5, "target_epsilon": 100.0}
    values.update(privacy)
    return SitePrivacy(config=PrivacyConfig(**values), num_examples=n, batch_size=batch_size,
                       local_epochs=1.0, planned_rounds=rounds)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5)


# ------------------------------------------------------------------ non-private
def test_plain_training_learns_and_reports() -> None:
    dataset, model = _dataset(), _model()
    before = evaluate(model=model, dataset=dataset).loss
    results = [train_local(model=model, dataset=dataset, config=_config(), privacy=None, seed=r, device=CPU)
               for r in range(3)]
    assert results[-1].loss < results[0].loss
    assert evaluate(model=model, dataset=dataset).loss < before
    first = results[0]
    assert isinstance(first, TrainResult)
    assert (first.num_examples, first.steps) == (64, 4)
    assert (first.epsilon, first.delta, first.noise_multiplier) == (0.0, 0.0, 0.0)
    assert first.seconds > 0
    assert list(first.metrics()) == ["num-examples", "train-loss", "epsilon", "delta", "noise-multiplier", "steps",
                                     "seconds"]
    assert list(first.metrics(unprivatized=False)) == ["num-examples", "epsilon", "delta", "noise-multiplier",
                                                       "steps", "seconds"]


def test_fractional_epochs_set_the_step_count() -> None:
    result = train_local(model=_model(), dataset=_dataset(), config=_config(local_epochs=0.5),
                         privacy=None, seed=0, device=CPU)
    assert result.steps == 2


def test_same_seed_same_weights_without_dp() -> None:
    dataset = _dataset()
    runs = []
    for seed in (7, 7, 8):
        model = _model()
        train_local(model=model, dataset=dataset, config=_config(), privacy=None, seed=seed, device=CPU)
        runs.append(model_state(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_batchnorm_trains_without_dp_despite_a_one_sample_tail() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    result = train_local(model=model, dataset=_dataset(17), config=_config(), privacy=None, seed=0, device=CPU)
    assert result.steps == 2


# ------------------------------------------------------------------ private
def test_private_training_learns_and_accounts_every_step() -> None:
    dataset, model = _dataset(), _model()
    original = model
    privacy = _privacy(64)
    start = _weights(model)
    results = []
    for round_number in range(3):
        result = train_local(model=model, dataset=dataset, config=_config(), privacy=privacy,
                             seed=round_number, device=CPU, noise_source="seeded")
        results.append(result)
        true_steps = (round_number + 1) * privacy.steps_per_round
        assert result.steps == privacy.steps_per_round == 4
        assert result.epsilon == privacy.epsilon_spent()
        assert result.epsilon == pytest.approx(
            epsilon_for(noise_multiplier=0.5, sample_rate=0.25, steps=true_steps, delta=1e-5), rel=1e-12
        )
        assert (result.delta, result.noise_multiplier) == (1e-5, 0.5)
    assert privacy.history == [(0.5, 0.25, 12)]
    assert results[-1].loss < results[0].loss
    assert results[0].epsilon < results[1].epsilon < results[2].epsilon

    assert model is original
    assert _distance(start, _weights(model)) > 0
    assert not any("_module." in key for key in model.state_dict())
    assert not any("_module." in key for key in model_state(model))
    assert set(model_state(model)) == set(_model().state_dict())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_same_seed_same_weights_with_seeded_dp_only() -> None:
    dataset = _dataset()
    runs = []
    for seed, source in ((3, "seeded"), (3, "seeded"), (4, "seeded"), (3, "secure"), (3, "secure")):
        model = _model()
        train_local(model=model, dataset=dataset, config=_config(), privacy=_privacy(64), seed=seed, device=CPU,
                    noise_source=source)
        runs.append(model_state(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    for other in runs[2:]:  # another seed, or the secure default (a real site): other noise, whatever the seed
        assert any(not torch.equal(runs[0][k], other[k]) for k in runs[0])
    assert any(not torch.equal(runs[3][k], runs[4][k]) for k in runs[3])
    with pytest.raises(ValueError, match="unknown noise_source 'config'; valid: secure, seeded"):
        train_local(model=_model(), dataset=dataset, config=_config(), privacy=_privacy(64), seed=3, device=CPU,
                    noise_source="config")


@pytest.mark.parametrize("mode", ["hooks", "ew", "functorch"])
def test_empty_poisson_batches_are_noise_only_steps(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """16 examples at q = 1/16: about a third of the 16 batches are empty."""
    empty = []
    real_step = local_module.noise_only_step

    def counting_step(optimizer: torch.optim.Optimizer) -> None:
        empty.append(1)
        real_step(optimizer)

    monkeypatch.setattr(local_module, "noise_only_step", counting_step)
    dataset = _dataset(16)
    privacy = _privacy(16, batch_size=1, noise_multiplier=1.0, grad_sample_mode=mode)
    result = train_local(model=_model(), dataset=dataset, config=_config(batch_size=1),
                         privacy=privacy, seed=0, device=CPU, noise_source="seeded")
    assert empty, "expected at least one empty Poisson batch"
    assert result.steps == 16
    assert privacy.history == [(1.0, 1 / 16, 16)]
    assert result.epsilon == pytest.approx(2.7636246529241077, rel=1e-6)  # pinned: sigma 1, q 1/16, 16 steps


def test_dict_items_and_column_labels_under_dp() -> None:
    class DictDataset(Dataset):
        def __init__(self, base: TensorDataset) -> None:
            self.base = base

        def __len__(self) -> int:
            return len(self.base)

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            image, label = self.base[index]
            return {"image": image, "label": label.reshape(1)}  # (1,) labels collate to (N, 1)

    dataset = DictDataset(_dataset(8))
    result = train_local(model=_model(), dataset=dataset, config=_config(batch_size=1),
                         privacy=_privacy(8, batch_size=1), seed=0, device=CPU)
    assert result.steps == 8
    assert evaluate(model=_model(), dataset=dataset).num_examples == 8


def test_exhausted_budget_refuses_before_training() -> None:
    dataset, model = _dataset(), _model()
    privacy = _privacy(64, target_epsilon=0.5)
    start = _weights(model)
    with pytest.raises(PrivacyBudgetExhausted, match="target_epsilon=0.5"):
        train_local(model=model, dataset=dataset, config=_config(), privacy=privacy, seed=0, device=CPU)
    assert privacy.total_steps == 0
    assert _distance(start, _weights(model)) == 0


def test_privacy_must_match_the_dataset_and_model() -> None:
    with pytest.raises(ValueError, match="32 examples"):
        train_local(model=_model(), dataset=_dataset(), config=_config(), privacy=_privacy(32), seed=0, device=CPU)
    torch.manual_seed(0)
    batchnorm = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="BatchNorm"):
        train_local(model=batchnorm, dataset=_dataset(), config=_config(), privacy=_privacy(64), seed=0, device=CPU)


# ------------------------------------------------------------------ FedProx
@pytest.mark.parametrize("private", [False, True])
def test_fedprox_huge_mu_stays_at_the_global_weights(private: bool) -> None:
    dataset = _dataset()
    privacy = _privacy(64) if private else None
    model = _model()
    start = _weights(model)
    train_local(model=model, dataset=dataset, config=_config(), privacy=privacy, seed=0,
                proximal_mu=1e6, device=CPU)
    assert _distance(start, _weights(model)) < 1e-6


def test_fedprox_moderate_mu_pulls_towards_the_global_weights() -> None:
    dataset = _dataset()
    moved = {}
    for mu in (0.0, 2.0):
        model = _model()
        start = _weights(model)
        train_local(model=model, dataset=dataset, config=_config(), privacy=None, seed=0,
                    proximal_mu=mu, device=CPU)
        moved[mu] = _distance(start, _weights(model))
    assert 0 < moved[2.0] < moved[0.0]


# ------------------------------------------------------------------ evaluation
def test_evaluate_separable_set_has_auc_one() -> None:
    dataset = _dataset(40, shift=3.0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    with torch.no_grad():
        direction = torch.zeros(64)
        direction[:32] = 1.0  # the top half of the image carries the label
        model[1].weight.copy_(torch.stack([-direction, direction]))
        model[1].bias.zero_()
    model.train()
    result = evaluate(model=model, dataset=dataset, batch_size=16)
    assert isinstance(result, EvalResult)
    assert result.auc == pytest.approx(1.0)
    assert result.accuracy == pytest.approx(1.0)
    assert result.num_examples == 40
    assert result.probs.shape == (40, 2)
    assert result.probs.sum(axis=1) == pytest.approx(1.0, abs=1e-5)
    assert (result.labels == dataset.tensors[1].numpy()).all()
    assert set(result.metrics()) == {"loss", "auc", "accuracy"}
    assert model.training  # mode restored


def test_evaluate_rejects_empty_data() -> None:
    empty = TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        evaluate(model=_model(), dataset=empty)


# ------------------------------------------------------------------ device and seeding
def test_select_device() -> None:
    assert select_device("cpu") == CPU
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            select_device("cuda")


def test_tune_cpu_allocator_sets_both_glibc_thresholds_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(device_module, "_allocator_tuned", None)
    monkeypatch.setattr(device_module, "_mallopt", lambda parameter, value: calls.append((parameter, value)) or True)
    assert device_module.tune_cpu_allocator() and device_module.tune_cpu_allocator()
    assert calls == [(-3, 256 << 20), (-1, 1 << 30)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


def test_tune_cpu_allocator_is_a_no_op_off_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module, "_allocator_tuned", None)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert device_module.tune_cpu_allocator() is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds exist in glibc only")
def test_glibc_accepts_the_thresholds() -> None:
    assert device_module._mallopt(-3, device_module.MALLOC_MMAP_THRESHOLD)
    assert device_module._mallopt(-1, device_module.MALLOC_TRIM_THRESHOLD)


def test_train_local_on_cpu_tunes_the_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(local_module, "tune_cpu_allocator", lambda: calls.append(1) or True)
    train_local(model=_model(), dataset=_dataset(16), config=TrainConfig(batch_size=8, local_epochs=1), privacy=None,
                seed=0, device=CPU)
    assert calls == [1]


def test_seed_everything_is_reproducible() -> None:
    seed_everything(123)
    first = torch.rand(3)
    seed_everything(123)
    assert torch.equal(first, torch.rand(3))
