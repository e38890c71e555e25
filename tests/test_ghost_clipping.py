"""medfed's ghost clipping (grad_sample_mode="ghost"): norms, clipped gradients, training, accounting.

References: per-sample gradients from Opacus' hooks mode (``GradSampleModule``) and,
for padding modes Opacus' conv grad sampler ignores, from one autograd call per
sample. Maths is checked in float64 to 1e-9 relative error.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet
from opacus.accountants import RDPAccountant
from opacus.grad_sample import GradSampleHooksFastGradientClipping, GradSampleModule
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

import federation.privacy.fast_clipping.norms as norms_module
from federation.config.schema import ModelConfig, PrivacyConfig, TrainConfig
from federation.models import build_model
from federation.models.resnet import BasicBlock
from federation.privacy import SitePrivacy, epsilon_for
from federation.privacy.engine import (
    clipped_backward,
    make_private,
    noise_only_step,
    unwrap_model,
    uses_clipped_backward,
)
from federation.privacy.fast_clipping import (
    GhostClippingModule,
    conv_norm_sample,
    select_grad_sample_mode,
    stock_norm_samplers,
    uncovered_layers,
)
from federation.privacy.fast_clipping.norms import (
    norm_layer_grad_samples,
    norm_layer_norm_sample,
    saved_group_norm_stats,
)
from federation.training import train_local

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
    pytest.mark.filterwarnings("ignore:Using a non-full backward hook"),
    pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel lengths"),
]

F64 = torch.float64
RTOL = 1e-9


def _autograd_per_sample(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample gradients of ``sum(module(x_i) * grad_out_i)``, one autograd call per sample."""
    params = [p for p in module.parameters() if p.requires_grad]
    rows = [torch.autograd.grad((module(x[i:i + 1]) * grad_out[i:i + 1]).sum(), params) for i in range(len(x))]
    return [torch.stack(per_param) for per_param in zip(*rows)]


def _opacus_per_sample(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample gradients from Opacus' hooks mode (the reference implementation)."""
    gsm = GradSampleModule(module, loss_reduction="sum")
    (gsm(x) * grad_out).sum().backward()
    samples = [p.grad_sample.detach().clone() for p in module.parameters() if p.requires_grad]
    gsm.to_standard_module()
    module.zero_grad(set_to_none=True)
    return samples


def _norm(samples: torch.Tensor) -> torch.Tensor:
    return samples.reshape(samples.shape[0], -1).norm(dim=1)


CONVS = {
    "2d-plain": (lambda: nn.Conv2d(4, 6, 3, padding=1), (5, 4, 9, 9)),
    "2d-stride-dilation-groups": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), (5, 4, 11, 10)),
    "2d-rect-kernel-no-bias": (lambda: nn.Conv2d(3, 8, (1, 3), stride=(2, 1), padding=(0, 1), bias=False), (4, 3, 7, 6)),
    "2d-wide-small-map": (lambda: nn.Conv2d(8, 72, 3), (4, 8, 4, 4)),  # T=4: auto picks the ghost norm
    "2d-depthwise": (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), (4, 6, 5, 5)),
    "1d": (lambda: nn.Conv1d(3, 6, 5, stride=2, padding=1, dilation=2, groups=3), (5, 3, 20)),
    "3d": (lambda: nn.Conv3d(2, 4, 3, stride=(1, 2, 1), padding=1, dilation=(1, 1, 2)), (3, 2, 6, 7, 8)),
}
ODD_PADDING = {
    "2d-same-even-kernel-reflect": (lambda: nn.Conv2d(4, 8, (2, 3), padding="same", padding_mode="reflect", groups=4),
                                    (5, 4, 9, 9)),
    "3d-same-circular": (lambda: nn.Conv3d(2, 4, 2, padding="same", padding_mode="circular"), (3, 2, 5, 5, 5)),
    "2d-valid-replicate": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="replicate"), (3, 2, 6, 6)),
}


def _conv_case(case: tuple) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    build, shape = case
    torch.manual_seed(0)
    layer = build().to(F64)
    x = torch.randn(shape, dtype=F64)
    grad_out = torch.randn_like(layer(x))
    return layer, x, grad_out


@pytest.mark.parametrize("method", ["ghost", "unfold", "kernel", "auto"])
@pytest.mark.parametrize("name", list(CONVS))
def test_conv_norms_equal_opacus_per_sample_gradient_norms(name: str, method: str) -> None:
    layer, x, grad_out = _conv_case(CONVS[name])
    expected = _opacus_per_sample(layer, x, grad_out)
    assert all(torch.allclose(e, a, rtol=RTOL, atol=1e-12)
               for e, a in zip(expected, _autograd_per_sample(layer, x, grad_out)))
    got = conv_norm_sample(layer, [x], grad_out, method=method)
    params = [p for p in layer.parameters() if p.requires_grad]
    assert set(got) == set(params)
    for param, samples in zip(params, expected):
        torch.testing.assert_close(got[param], _norm(samples), rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("method", ["ghost", "unfold", "kernel", "auto"])
@pytest.mark.parametrize("name", list(ODD_PADDING))
def test_conv_norms_honour_padding_modes(name: str, method: str) -> None:
    """reflect/circular/replicate and asymmetric 'same' padding (Opacus 1.6's hooks mode pads with zeros here)."""
    layer, x, grad_out = _conv_case(ODD_PADDING[name])
    expected = _autograd_per_sample(layer, x, grad_out)
    got = conv_norm_sample(layer, [x], grad_out, method=method)
    for param, samples in zip(layer.parameters(), expected):
        torch.testing.assert_close(got[param], _norm(samples), rtol=RTOL, atol=1e-12)


def test_conv_norm_sample_rejects_unknown_method() -> None:
    layer, x, grad_out = _conv_case(CONVS["2d-plain"])
    with pytest.raises(ValueError, match="unknown conv norm method 'fast'"):
        conv_norm_sample(layer, [x], grad_out, method="fast")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("layer", "sampler", "shape"),
    [
        (nn.GroupNorm(2, 6), norm_layer_norm_sample, (4, 6, 5, 5)),
        (nn.GroupNorm(3, 6), norm_layer_norm_sample, (4, 6, 7)),
        (nn.InstanceNorm2d(5, affine=True), norm_layer_norm_sample, (4, 5, 6, 6)),
        (nn.InstanceNorm3d(3, affine=True), norm_layer_norm_sample, (4, 3, 4, 4, 4)),
    ],
)
def test_normalization_norms_equal_opacus(layer: nn.Module, sampler, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    layer = layer.to(F64)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    x = torch.randn(shape, dtype=F64)
    grad_out = torch.randn_like(layer(x))
    expected = _opacus_per_sample(layer, x, grad_out)
    got = sampler(layer, [x], grad_out)
    for param, samples in zip(layer.parameters(), expected):
        torch.testing.assert_close(got[param], _norm(samples), rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize(
    ("layer", "shape", "frozen_bias"),
    [
        (nn.GroupNorm(4, 8), (5, 8, 6, 7), False),
        (nn.GroupNorm(1, 3), (4, 3, 9), True),  # one group (LayerNorm-like), bias frozen
        (nn.InstanceNorm3d(2, affine=True), (3, 2, 3, 4, 5), False),
    ],
)
def test_norm_layer_grad_samples_equal_opacus_per_sample_gradients(
    layer: nn.Module, shape: tuple[int, ...], frozen_bias: bool
) -> None:
    torch.manual_seed(1)
    layer = layer.to(F64)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    layer.bias.requires_grad_(not frozen_bias)
    x = torch.randn(shape, dtype=F64) * 3 + 2  # far from zero mean: no cancellation shortcut hides errors
    grad_out = torch.randn_like(layer(x))
    expected = _opacus_per_sample(layer, x, grad_out)
    got = norm_layer_grad_samples(layer, [x], grad_out)
    trainable = [p for p in layer.parameters() if p.requires_grad]
    assert list(got) == trainable
    for param, samples in zip(trainable, expected):
        torch.testing.assert_close(got[param], samples, rtol=RTOL, atol=1e-12)
    empty = norm_layer_grad_samples(layer, [x[:0]], grad_out[:0])
    assert all(v.shape == (0, shape[1]) for v in empty.values())
    # GroupNorm: the same from the statistics its forward saved (InstanceNorm has none to offer).
    stats = saved_group_norm_stats(layer(x))
    assert (stats is None) == isinstance(layer, nn.InstanceNorm3d)
    if stats is not None:
        from_saved = norm_layer_grad_samples(layer, [x], grad_out, stats=stats)
        for param, samples in zip(trainable, expected):
            torch.testing.assert_close(from_saved[param], samples, rtol=RTOL, atol=1e-12)


def test_norm_samplers_are_registered_with_opacus_and_stock_ones_can_be_restored() -> None:
    registry = GradSampleHooksFastGradientClipping.NORM_SAMPLERS
    medfed_types = {nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
                    nn.InstanceNorm3d}
    assert medfed_types <= set(registry)
    with stock_norm_samplers():
        assert not medfed_types & set(registry)
        assert nn.Linear in registry and nn.Embedding in registry
    assert medfed_types <= set(registry)


# ------------------------------------------------------------------ whole models
def _ghost_path_net() -> nn.Module:
    """Covers every book-keeping branch: materialized convs (kernel and unfold), ghost-normed convs
    with and without bias, group and instance norm, a linear head."""
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.GroupNorm(2, 6), nn.ReLU(),
        nn.Conv2d(6, 72, 3, stride=2, padding=1, bias=False), nn.InstanceNorm2d(72, affine=True), nn.ReLU(),
        nn.Conv2d(72, 80, 3, stride=2, padding=1), nn.ReLU(),        # 2x2 output: ghost norm, bias kept
        nn.Conv2d(80, 80, 2, padding="same", bias=False), nn.ReLU(),  # ghost norm, asymmetric padding
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(80, 3),
    )


def _tiny_resnet() -> nn.Module:
    """medfed's ResNet basic blocks (identity and projection shortcuts) at small widths."""
    blocks = [
        BasicBlock(spatial_dims=2, in_channels=4, out_channels=4, stride=1, norm="group"),
        BasicBlock(spatial_dims=2, in_channels=4, out_channels=8, stride=2, norm="group"),
    ]
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.GroupNorm(2, 4), *blocks,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def _tiny_densenet() -> nn.Module:
    """MONAI's DenseNet (concatenating dense blocks, transitions) at small widths, group norm."""
    return DenseNet(spatial_dims=2, in_channels=1, out_channels=2, init_features=8, growth_rate=4,
                    block_config=(2, 2), bn_size=2, act=("relu", {"inplace": False}), norm=("group", {"num_groups": 2}))


MODELS = {
    "ghost-path-net": (_ghost_path_net, (6, 2, 8, 8), 3),
    "cnn": (lambda: build_model(ModelConfig(name="cnn", width=4), in_channels=1, num_classes=2, dp=True),
            (6, 1, 12, 12), 2),
    "cnn-instance-norm": (lambda: build_model(ModelConfig(name="cnn", width=4, norm="instance"), in_channels=2,
                                              num_classes=2, dp=True), (5, 2, 10, 10), 2),
    "tiny-resnet": (_tiny_resnet, (4, 1, 8, 8), 3),
    "tiny-densenet": (_tiny_densenet, (4, 1, 16, 16), 2),
}


def _model_case(name: str, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    build, shape, classes = MODELS[name]
    torch.manual_seed(0)
    model = build().to(dtype)
    x = torch.randn(shape, dtype=dtype)
    y = torch.randint(0, classes, (shape[0],))
    return model, x, y


def _reference_clipping(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, max_grad_norm: float | None):
    """Opacus hooks mode: per-sample norms and the clipped per-sample gradient sum (Opacus' clip factor)."""
    gsm = GradSampleModule(model)
    F.cross_entropy(gsm(x), y).backward()
    samples = [p.grad_sample.detach().clone() for p in model.parameters()]
    gsm.to_standard_module()
    model.zero_grad(set_to_none=True)
    norms = torch.stack([_norm(s) for s in samples]).norm(dim=0)
    bound = float(norms.median()) if max_grad_norm is None else max_grad_norm
    coef = (bound / (norms + 1e-6)).clamp(max=1.0)
    return norms, bound, [torch.tensordot(coef, s, dims=1) for s in samples]


@pytest.mark.parametrize(
    ("name", "input_requires_grad"), [(name, False) for name in MODELS] + [("ghost-path-net", True)]
)
def test_model_norms_and_clipped_gradient_equal_opacus_hooks(name: str, input_requires_grad: bool) -> None:
    """float64, clip bound = median norm so that half the samples are clipped.

    With an input that needs no gradient the norm pass stops at the first layer's
    output; with one that does (no such layer) it is a full backward: same result.
    """
    model, x, y = _model_case(name, F64)
    norms, bound, expected = _reference_clipping(model, x, y, max_grad_norm=None)
    ghost = GhostClippingModule(model, max_grad_norm=bound)
    inputs = x.clone().requires_grad_(input_requires_grad)
    coef = ghost.clipped_backward(F.cross_entropy(ghost(inputs), y, reduction="none"))
    torch.testing.assert_close(ghost.per_sample_gradient_norms, norms, rtol=RTOL, atol=1e-12)
    assert 0 < int((coef < 1).sum()) < len(x)
    for param, clipped in zip(model.parameters(), expected):
        torch.testing.assert_close(param.grad, clipped, rtol=RTOL, atol=1e-12)
    ghost.to_standard_module()
    assert not any(hasattr(p, "_norm_sample") or hasattr(p, "grad_sample") for p in model.parameters())


class _ConvBackwardLog(TorchDispatchMode):
    """Records ``(input shape, output_mask)`` of every ``aten.convolution_backward`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[tuple[int, ...], list[bool]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.calls.append((tuple(args[1].shape), list(args[10])))
        return func(*args, **(kwargs or {}))


def test_norm_pass_skips_the_first_layer_backward_and_every_batched_weight_gradient() -> None:
    """The default CNN: autograd back-propagates input gradients through every conv but the first, nothing else."""
    model, x, y = _model_case("cnn", torch.float32)
    conv_inputs: list[tuple[int, ...]] = []
    for layer in model.modules():
        if isinstance(layer, nn.Conv2d):
            layer.register_forward_hook(lambda _layer, args, _out: conv_inputs.append(tuple(args[0].shape)))
    ghost = GhostClippingModule(model, max_grad_norm=1.0)
    losses = F.cross_entropy(ghost(x), y, reduction="none")
    with _ConvBackwardLog() as log:
        ghost.clipped_backward(losses)
    batched = [(shape, mask) for shape, mask in log.calls if shape[0] == len(x)]
    # One input-gradient call per conv except the first; no batched weight gradient (the
    # per-sample ones fold the batch into the channels: leading dimension 1).
    assert len(conv_inputs) == 6 and conv_inputs[0][1] == 1
    assert sorted(batched) == sorted((shape, [True, False, False]) for shape in conv_inputs[1:])
    assert all(shape[0] == 1 and mask == [False, True, False] for shape, mask in log.calls if shape[0] != len(x))
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("input_requires_grad", [False, True])
def test_parameter_off_the_input_path_still_gets_its_clipped_gradient(input_requires_grad: bool) -> None:
    """A layer fed a constant (its input needs no gradient) is a first layer too: the norm pass stops at its output.

    With a batch that requires gradients the pass goes to the batch *and* that output.
    """

    class WithConstantBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 2)
            self.offset = nn.Linear(1, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x) + self.offset(torch.ones(x.shape[0], 1, dtype=x.dtype))

    torch.manual_seed(0)
    model = WithConstantBranch().to(F64)
    x, y = torch.randn(4, 4, dtype=F64), torch.tensor([0, 1, 0, 1])
    norms, bound, expected = _reference_clipping(model, x, y, max_grad_norm=None)
    ghost = GhostClippingModule(model, max_grad_norm=bound)
    inputs = x.clone().requires_grad_(input_requires_grad)
    ghost.clipped_backward(F.cross_entropy(ghost(inputs), y, reduction="none"))
    torch.testing.assert_close(ghost.per_sample_gradient_norms, norms, rtol=RTOL, atol=1e-12)
    for param, clipped in zip(model.parameters(), expected):
        torch.testing.assert_close(param.grad, clipped, rtol=RTOL, atol=1e-12)


def test_plain_backward_gives_the_same_clipped_gradient() -> None:
    """Code that calls loss.backward() on the wrapped model still gets clipped gradients (autograd callback)."""
    model, x, y = _model_case("ghost-path-net", F64)
    norms, bound, expected = _reference_clipping(model, x, y, max_grad_norm=None)
    ghost = GhostClippingModule(model, max_grad_norm=bound)
    for _ in range(2):  # p.grad is overwritten by each pass, not accumulated
        F.cross_entropy(ghost(x), y).backward()
        for param, clipped in zip(model.parameters(), expected):
            torch.testing.assert_close(param.grad, clipped, rtol=RTOL, atol=1e-12)
    assert 0 < int((ghost.last_clipping_coef < 1).sum()) < len(x)


# ------------------------------------------------------------------ product integration
def _dp_step(mode: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One make_private step at noise 0 (the clipped mean gradient, applied with plain SGD)."""
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    dp_model, optimizer, _ = make_private(
        accountant=RDPAccountant(), model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=loader, num_examples=len(x), sample_rate=1.0, noise_multiplier=0.0, max_grad_norm=0.05,
        grad_sample_mode=mode, seed=0,
    )
    assert uses_clipped_backward(dp_model) == (mode == "ghost")
    optimizer.zero_grad(set_to_none=True)
    clipped_backward(dp_model, F.cross_entropy(dp_model(x), y, reduction="none"))
    optimizer.step()
    unwrap_model(dp_model)


@pytest.mark.parametrize("name", ["cnn", "tiny-resnet"])
def test_ghost_step_equals_hooks_step_without_noise(name: str) -> None:
    model, x, y = _model_case(name, torch.float32)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    _dp_step("hooks", model, x, y)
    after_hooks = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(start)
    _dp_step("ghost", model, x, y)
    moved = sum(float((after_hooks[k] - start[k]).abs().sum()) for k in start)
    assert moved > 0
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, after_hooks[key], rtol=1e-4, atol=1e-6)


def test_auto_mode_picks_ghost_for_covered_models_and_hooks_otherwise() -> None:
    for name in ("cnn", "resnet18", "densenet121"):
        model = build_model(ModelConfig(name=name), in_channels=1, num_classes=2, dp=True)
        assert uncovered_layers(model) == []
        assert select_grad_sample_mode(model) == "ghost"
    other = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    assert uncovered_layers(other) == ["1 (LayerNorm)"]
    assert select_grad_sample_mode(other) == "hooks"
    assert PrivacyConfig().grad_sample_mode == "auto"


def test_auto_mode_on_cuda_keeps_ghost_for_shallow_nets_and_hooks_for_densenet() -> None:
    picks = {name: select_grad_sample_mode(build_model(ModelConfig(name=name), in_channels=1, num_classes=2, dp=True),
                                           device="cuda") for name in ("cnn", "resnet18", "densenet121")}
    assert picks == {"cnn": "ghost", "resnet18": "ghost", "densenet121": "hooks"}


def _data(n: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (n,), generator=generator)
    images = torch.randn(n, 1, 8, 8, generator=generator)
    images[:, :, :4] += 1.5 * (2 * labels.float() - 1)[:, None, None, None]
    return TensorDataset(images, labels)


def _net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, 2))


def _site(n: int, batch_size: int, mode: str) -> SitePrivacy:
    config = PrivacyConfig(noise_multiplier=1.0, target_epsilon=100.0, grad_sample_mode=mode)
    return SitePrivacy(config=config, num_examples=n, batch_size=batch_size, local_epochs=1.0, planned_rounds=3)


@pytest.mark.parametrize("mode", ["ghost", "auto"])
def test_train_local_with_ghost_accounts_exactly_like_hooks_including_empty_batches(mode: str) -> None:
    """16 examples at q = 1/16: some Poisson batches are empty and become noise-only steps."""
    config = TrainConfig(batch_size=1, lr=0.1, device="cpu", num_threads=2)
    results, sites = {}, {}
    for used in (mode, "hooks"):
        sites[used] = _site(16, 1, used)
        results[used] = train_local(model=_net(), dataset=_data(16), config=config, privacy=sites[used], seed=0,
                                    noise_source="seeded")
    assert sites[mode].history == sites["hooks"].history == [(1.0, 1 / 16, 16)]
    assert results[mode].steps == results["hooks"].steps == 16
    assert results[mode].epsilon == results["hooks"].epsilon == pytest.approx(2.7636246529241077, rel=1e-6)
    assert results[mode].epsilon == pytest.approx(
        epsilon_for(noise_multiplier=1.0, sample_rate=1 / 16, steps=16, delta=1e-5), rel=1e-12)
    assert results[mode].num_examples == 16


def test_train_local_ghost_learns_and_leaves_a_clean_model() -> None:
    dataset, model = _data(64), _net()
    privacy = _site(64, 16, "ghost")
    config = TrainConfig(batch_size=16, lr=0.1, device="cpu", num_threads=2)
    losses = [train_local(model=model, dataset=dataset, config=config, privacy=privacy, seed=r,
                          noise_source="seeded").loss for r in range(3)]
    assert losses[-1] < losses[0]
    assert privacy.history == [(1.0, 0.25, 12)]
    assert not any("_module." in key for key in model.state_dict())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert not any(hasattr(p, "_norm_sample") for p in model.parameters())


def test_noise_only_step_under_ghost_moves_weights_and_is_accounted() -> None:
    model = _net()
    accountant = RDPAccountant()
    dataset = _data(10)
    _, optimizer, _ = make_private(
        accountant=accountant, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(dataset, batch_size=2), num_examples=10, sample_rate=0.2, noise_multiplier=1.0,
        max_grad_norm=1.0, grad_sample_mode="ghost", seed=0,
    )
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        noise_only_step(optimizer)
    assert accountant.history == [(1.0, 0.2, 1)]
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
