"""MONAI's BasicUNet and SegResNet as registered segmentation models: DP-valid, fully covered by fast clipping."""

from __future__ import annotations

import pytest
import torch

from federation.config import ConfigError
from federation.config.schema import ModelConfig
from federation.models import available_models, build_model, min_input_size
from federation.tasks import get_task

F64 = torch.float64


@pytest.mark.parametrize(("name", "spatial_dims", "side"),
                         [("basic_unet", 2, 16), ("basic_unet", 3, 16), ("segresnet", 2, 8), ("segresnet", 3, 8)])
def test_ghost_clipping_equals_opacus_per_sample_gradients(name: str, spatial_dims: int, side: int) -> None:
    """No transposed convolution (upsampling is conv + interpolation): every layer covered, equal to Opacus' hooks."""
    from seg_clipping import assert_clipping_matches_opacus

    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, width=2, norm="group"), in_channels=1, num_classes=3,
                        spatial_dims=spatial_dims, dp=True, task="segmentation").to(F64)
    assert not any(isinstance(m, torch.nn.modules.conv._ConvTransposeNd) for m in model.modules())
    shape = (3, 1, *((side,) * spatial_dims))
    x, y = torch.randn(shape, dtype=F64), torch.randint(0, 3, (3, *shape[2:]))
    assert_clipping_matches_opacus(model, x, y)


def test_registered_by_name_for_segmentation_only_with_dp_norms() -> None:
    assert {"basic_unet", "segresnet"} <= set(available_models())
    assert (min_input_size("basic_unet", norm="group"), min_input_size("basic_unet", norm="instance")) == (16, 32)
    assert (min_input_size("segresnet", norm="group"), min_input_size("segresnet", norm="instance")) == (8, 16)
    for name in ("basic_unet", "segresnet"):
        model = build_model(ModelConfig(name=name, width=4, norm="instance"), in_channels=1, num_classes=3,
                            spatial_dims=3, dp=True, task="segmentation")
        assert model(torch.zeros(1, 1, 40, 56, 40)).shape == (1, 3, 40, 56, 40)  # the hippo preset's volumes
        assert not any(getattr(m, "inplace", False) for m in model.modules())
        with pytest.raises(ConfigError, match=f"{name}' does not serve data.task='classification'"):
            build_model(ModelConfig(name=name, width=4), in_channels=1, num_classes=2, dp=False,
                        task="classification")
        with pytest.raises(ConfigError, match="cannot be used with differential privacy"):
            build_model(ModelConfig(name=name, width=4, norm="batch"), in_channels=1, num_classes=2, dp=True,
                        task="segmentation")


def test_per_sample_conv_gradients_of_large_volumes_equal_autograd_per_sample() -> None:
    """3-D outputs of >= 32^3 positions take the per-sample kernel loop: gradients equal autograd's, per sample."""
    from federation.privacy.fast_clipping.norms import KERNEL_LOOP_MIN_POSITIONS, conv_weight_norms

    torch.manual_seed(0)
    layer = torch.nn.Conv3d(2, 3, 3, padding=1).to(F64)
    x = torch.randn(2, 2, 32, 32, 32, dtype=F64)
    g = torch.randn(2, 3, 32 * 32 * 32, dtype=F64)
    assert g.shape[-1] >= KERNEL_LOOP_MIN_POSITIONS
    norms, grads = conv_weight_norms(layer, x, g, method="kernel", keep=True)
    for i in range(2):
        (grad,) = torch.autograd.grad(layer(x[i:i + 1]), layer.weight, g[i].reshape(1, 3, 32, 32, 32))
        torch.testing.assert_close(grads[i], grad, rtol=1e-10, atol=1e-10)
        assert norms[i].item() == pytest.approx(grad.norm().item(), rel=1e-12)
