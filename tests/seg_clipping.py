"""Pin medfed's fast per-sample clipping to Opacus' hooks on a segmentation model (shared by the segmentation tests)."""

from __future__ import annotations

import torch


def assert_clipping_matches_opacus(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Every layer covered; per-sample norms and the clipped gradient sum equal Opacus' per-sample gradients.

    ``model`` is a float64 DP-built segmentation net; the clipping bound is the median norm,
    so that some samples are clipped and some are not.
    """
    from opacus.grad_sample import GradSampleModule

    from federation.privacy.fast_clipping import GhostClippingModule, select_grad_sample_mode, uncovered_layers
    from federation.tasks import get_task

    task = get_task("segmentation")
    assert uncovered_layers(model) == [] and select_grad_sample_mode(model, device="cpu") == "ghost"
    gsm = GradSampleModule(model)
    task.loss(gsm(x), y).backward()
    samples = [p.grad_sample.detach().clone() for p in model.parameters()]
    gsm.to_standard_module()
    model.zero_grad(set_to_none=True)
    norms = torch.stack([s.flatten(1).norm(dim=1) for s in samples]).norm(dim=0)
    bound = float(norms.median())
    coef = (bound / (norms + 1e-6)).clamp(max=1.0)
    ghost = GhostClippingModule(model, max_grad_norm=bound)
    ghost.clipped_backward(task.per_sample_loss(ghost(x), y))
    torch.testing.assert_close(ghost.per_sample_gradient_norms, norms, rtol=1e-9, atol=1e-12)
    for param, sample in zip(model.parameters(), samples):
        torch.testing.assert_close(param.grad, torch.tensordot(coef, sample, dims=1), rtol=1e-9, atol=1e-12)
    ghost.to_standard_module()
