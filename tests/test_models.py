"""Tests for federation.models: registry, DP compatibility, shapes, determinism."""

from __future__ import annotations

import pytest
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from federation.config.schema import ModelConfig
from federation.models import (
    available_models,
    build_model,
    count_parameters,
    dp_problems,
    min_input_size,
    register_model,
)
from federation.models import registry as registry_module

BUILTIN = ["cnn", "densenet121", "resnet10", "resnet18"]
DP_NORMS = ["group", "instance"]


def _size(name: str) -> int:
    """Test image side: 28 px (MedMNIST), 32 px for DenseNet-121 (needs >= 29)."""
    return 32 if name == "densenet121" else 28


def _build(name: str = "cnn", *, norm: str = "group", dp: bool = True, seed: int = 0, **kw: object) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(name=name, norm=norm, **kw), in_channels=1, num_classes=3, dp=dp)


def test_builtin_models_registered() -> None:
    assert set(BUILTIN) <= set(available_models())
    assert available_models() == sorted(available_models())


@pytest.mark.parametrize("norm", DP_NORMS)
@pytest.mark.parametrize("name", BUILTIN)
def test_dp_model_validates_and_forwards(name: str, norm: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, norm=norm), in_channels=3, num_classes=4, dp=True)
    ModuleValidator.validate(model, strict=True)  # raises on any problem
    assert dp_problems(model) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0
    if name == "densenet121" and norm == "instance":
        return  # needs >= 61 px: shapes checked on the meta device in test_min_input_size_is_tight
    size = _size(name)
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 4)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("norm", DP_NORMS)
def test_cnn_3d(norm: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="cnn", norm=norm), in_channels=1, num_classes=2, spatial_dims=3, dp=True)
    out = model(torch.randn(2, 1, 16, 16, 16))
    assert out.shape == (2, 2)
    out.sum().backward()


def test_cnn_smallest_input() -> None:
    for norm in DP_NORMS:
        model = _build("cnn", norm=norm)
        assert min_input_size("cnn", norm=norm) == 8
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


@pytest.mark.parametrize("norm", DP_NORMS)
@pytest.mark.parametrize("name", BUILTIN)
def test_min_input_size_is_tight(name: str, norm: str) -> None:
    # Shapes only: the meta device runs every shape check without computing anything.
    with torch.device("meta"):
        model = build_model(ModelConfig(name=name, norm=norm), in_channels=1, num_classes=3, dp=True)
        size = min_input_size(name, norm=norm)
        assert size >= 8
        assert model(torch.empty(2, 1, size, size)).shape == (2, 3)
        if size > 8:  # below the 8-px floor nothing is promised
            with pytest.raises((RuntimeError, ValueError)):
                model(torch.empty(2, 1, size - 1, size - 1))


def test_densenet_rejects_28px() -> None:
    with torch.device("meta"):
        model = build_model(ModelConfig(name="densenet121"), in_channels=1, num_classes=3, dp=True)
        with pytest.raises(RuntimeError, match="too small"):
            model(torch.empty(2, 1, 28, 28))


def test_min_input_size_values() -> None:
    assert min_input_size("cnn") == 8
    assert min_input_size("densenet121") == 29
    assert min_input_size("densenet121", norm="instance") == 61
    assert min_input_size("resnet18") == 8
    with pytest.raises(ValueError, match=r"model\.name"):
        min_input_size("nope")


def test_batch_norm_refused_under_dp() -> None:
    with pytest.raises(ValueError, match=r"model\.norm.*'batch'.*'group' or 'instance'"):
        build_model(ModelConfig(norm="batch"), in_channels=1, num_classes=2, dp=True)


@pytest.mark.parametrize("name", BUILTIN)
def test_batch_norm_allowed_without_dp(name: str) -> None:
    model = _build(name, norm="batch", dp=False)
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert dp_problems(model)  # and it is reported as not DP-compatible


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"model\.name") as info:
        build_model(ModelConfig(name="vgg"), in_channels=1, num_classes=2, dp=False)
    message = str(info.value)
    assert "'vgg'" in message
    for name in BUILTIN:
        assert name in message


def test_bad_arguments_refused() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_model(ModelConfig(), in_channels=1, num_classes=1, dp=False)
    with pytest.raises(ValueError, match="spatial_dims"):
        build_model(ModelConfig(), in_channels=1, num_classes=2, spatial_dims=1, dp=False)


def test_registered_model_failing_dp_validation_is_refused() -> None:
    def bad_builder(*, config: ModelConfig, in_channels: int, num_classes: int, spatial_dims: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(in_channels, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, num_classes),
        )

    register_model("bad_for_dp", bad_builder)
    try:
        assert "bad_for_dp" in available_models()
        plain = build_model(ModelConfig(name="bad_for_dp"), in_channels=1, num_classes=2, dp=False)
        assert isinstance(plain, nn.Module)
        with pytest.raises(ValueError, match="not compatible with differential privacy") as info:
            build_model(ModelConfig(name="bad_for_dp"), in_channels=1, num_classes=2, dp=True)
        lines = str(info.value).splitlines()[1:]
        assert len(lines) == 2
        assert "BatchNorm" in lines[0]
        assert lines[0].endswith("[in: 1]")
        assert "in-place" in lines[1]
        assert lines[1].endswith("[in: 2]")
    finally:
        registry_module._REGISTRY.pop("bad_for_dp", None)


@pytest.mark.parametrize("name", BUILTIN)
def test_deterministic_init(name: str) -> None:
    a, b, c = _build(name, seed=7), _build(name, seed=7), _build(name, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_cnn_parameter_count() -> None:
    model = _build("cnn")
    n = count_parameters(model)
    assert 50_000 <= n <= 150_000
    assert count_parameters(_build("cnn", width=32)) > n
    for p in model.parameters():
        p.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 0
    assert count_parameters(model) == n


def test_resnet_parameter_counts() -> None:
    assert 11_000_000 < count_parameters(_build("resnet18")) < 11_400_000
    assert 4_800_000 < count_parameters(_build("resnet10")) < 5_000_000


@pytest.mark.parametrize("name", BUILTIN)
def test_dropout_before_classifier(name: str) -> None:
    model = _build(name, dropout=0.25)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.25]


def _dp_step(model: nn.Module, *, size: int = 28, mode: str = "hooks") -> None:
    """One DP-SGD step with Opacus on 8 random samples; checks per-sample grads and an update."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(8, 1, size, size), torch.randint(0, 3, (8,)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine(accountant="rdp")
    private_model, private_opt, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(data, batch_size=2),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
        grad_sample_mode=mode,
    )
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(iter(loader))
    private_opt.zero_grad()
    loss = nn.functional.cross_entropy(private_model(x), y)
    loss.backward()
    for p in model.parameters():
        assert p.grad_sample is not None
        assert p.grad_sample.shape == (x.shape[0], *p.shape)
    private_opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert engine.accountant.history[-1][2] == 1  # (noise, sample_rate, steps): one step recorded


@pytest.mark.parametrize("norm", DP_NORMS)
def test_opacus_step_cnn(norm: str) -> None:
    _dp_step(_build("cnn", norm=norm))


def test_opacus_step_cnn_expanded_weights() -> None:
    _dp_step(_build("cnn"), mode="ew")


def test_opacus_step_resnet18() -> None:
    _dp_step(_build("resnet18"), size=16)  # 16 px keeps the 11M-parameter step fast
