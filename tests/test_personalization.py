"""Personalization (issue 21): FedBN-style local norm layers stay at the site, checked by its outbound guard."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.guard import EVALUATE_METRICS, OutboundViolation
from client.personal import LOCAL_NORM_FILE, PERSONAL_METRICS, check_local_kept, keep_local_norm, release_personal
from client.site import SiteSettings
from federation.config.schema import ModelConfig
from federation.models import build_model
from federation.models.convert import norm_state_names


def _settings(tmp_path: Path) -> SiteSettings:
    return SiteSettings(name="site-1", site_index=0, num_sites=2, data_dir=str(tmp_path), state_dir=tmp_path / "s",
                        run_name="r")


def test_norm_layers_are_saved_at_the_site_and_replaced_by_the_global_values(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=4), in_channels=1, num_classes=2, dp=True)
    global_weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # "trained"
    local = {k: v.clone() for k, v in model.state_dict().items()}
    settings = _settings(tmp_path)
    reply = keep_local_norm(model, settings=settings, local=local, global_weights=global_weights)
    names = norm_state_names(model)
    saved = torch.load(settings.run_state_dir / LOCAL_NORM_FILE, weights_only=True)
    assert sorted(saved) == names and all(torch.equal(saved[n], local[n]) for n in names)
    assert all(torch.equal(reply[n], global_weights[n]) for n in names)
    assert torch.equal(reply["classifier.weight"], local["classifier.weight"])  # the rest is aggregated
    check_local_kept(reply, global_weights=global_weights, settings=settings)
    with pytest.raises(OutboundViolation, match="local norm-layer tensors would leave the site"):
        check_local_kept(local, global_weights=global_weights, settings=settings)


def test_a_real_site_with_local_norm_never_sends_its_norm_layers_and_reports_personal_metrics(real_site) -> None:
    overrides = ("train.local_norm=true",)
    run_config = real_site.run_config(*overrides)
    sent = real_site.weights(run_config)
    reply = real_site.train(*overrides, weights=sent)
    assert not reply.has_error()
    arrays = reply.content["arrays"].to_torch_state_dict()
    kept = torch.load(real_site.state_dir / real_site.name / "runs" / "r" / LOCAL_NORM_FILE, weights_only=True)
    assert kept and all(torch.equal(arrays[n], sent[n]) for n in kept)  # what left is what arrived
    assert any(not torch.equal(kept[n], sent[n]) for n in kept)  # the site's own values did train
    assert not torch.equal(arrays["classifier.weight"], sent["classifier.weight"])
    evaluation = real_site.evaluate(*overrides, weights=arrays)
    metrics = evaluation.content["metrics"]
    assert "personal-loss" in metrics and metrics["personal-loss"] != metrics["loss"]


def test_personal_metrics_are_whitelisted_and_follow_the_disclosure_rules() -> None:
    assert set(PERSONAL_METRICS) <= EVALUATE_METRICS
    personal = {"personal-loss": 0.5, "personal-auc": 0.8, "personal-accuracy": 0.9}
    assert release_personal(personal, released={"auc": 0.7}, num_examples=100, min_count=5) == personal
    assert release_personal(personal, released={}, num_examples=20, min_count=5) == {"personal-loss": 0.5}


def test_fine_tuning_after_federation_spends_accounted_epsilon_and_stays_at_the_site(real_site) -> None:
    import json

    from client.ledger import PrivacyLedger
    from client.personal import PERSONAL_MODEL_FILE

    overrides = ("train.finetune_rounds=1",)  # server.rounds=1: the evaluation of round 1 fine-tunes
    trained = real_site.train(*overrides).content["arrays"].to_torch_state_dict()
    run_dir = real_site.state_dir / real_site.name / "runs" / "r"
    after_training = json.loads((run_dir / "privacy.json").read_text())
    charged = PrivacyLedger.open(real_site.state_dir / real_site.name).spent_epsilon()
    evaluation = real_site.evaluate(*overrides, weights=trained, server_round=1)
    metrics = evaluation.content["metrics"]
    assert "personal-loss" in metrics and metrics["personal-loss"] != metrics["loss"]
    assert (run_dir / PERSONAL_MODEL_FILE).is_file()
    assert json.loads((run_dir / "privacy.json").read_text()) != after_training  # its steps were accounted
    assert PrivacyLedger.open(real_site.state_dir / real_site.name).spent_epsilon() > charged > 0  # and charged


def test_the_baselines_table_gains_the_personalized_row(tmp_path: Path) -> None:
    import json

    from simulations.baselines import MethodResult, baselines_markdown, personalized_result
    from simulations.harness import resolve_config

    config = resolve_config(overrides=["data.num_sites=2", "strategy.min_sites=2", "train.local_norm=true"])
    site = {"accuracy": 0.7, "auc": 0.8, "loss": 0.5, "personal-accuracy": 0.75, "personal-auc": 0.85,
            "personal-loss": 0.45}
    (tmp_path / "summary.json").write_text(json.dumps({"final_site_evaluate": {"site-1": site, "site-2": {
        **site, "personal-accuracy": 0.65}}}))
    result = personalized_result(tmp_path, config)
    assert result.method == "FedBN" and result.mean_over_sites("accuracy") == pytest.approx(0.7)
    assert result.per_site["site-1"] == {"accuracy": 0.75, "auc": 0.85, "loss": 0.45}
    federated = MethodResult(method="federated", per_site={"site-1": {"accuracy": 0.7, "auc": 0.8, "loss": 0.5},
                                                            "site-2": {"accuracy": 0.7, "auc": 0.8, "loss": 0.5}},
                             overall={"accuracy": 0.7, "auc": 0.8, "loss": 0.5})
    table = baselines_markdown([federated, result], sites=["site-1", "site-2"])
    assert "| FedBN | 0.750 | 0.650 | 0.700 | n/a |" in table
    fine_tuned = config.model_copy(update={"train": config.train.model_copy(update={"finetune_rounds": 1})})
    assert personalized_result(tmp_path, fine_tuned).method == "federated + fine-tuned"
    (tmp_path / "summary.json").write_text(json.dumps({"final_site_evaluate": {"site-1": site}}))
    assert personalized_result(tmp_path, config) is None  # not every site reported one


def test_a_segmentation_site_reports_its_personalized_dice_through_the_guard(tmp_path: Path) -> None:
    """FedBN for segmentation: with its own norm layers the site reports personal-loss and personal-dice too."""
    from client.guard import check_reply, evaluate_metrics
    from client.site import evaluate_round
    from federation.config import load_config
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    config = load_config(None, ["data.dataset=synthetic_seg", "data.task=segmentation", "data.num_samples=120",
                                "data.image_size=16", "model.name=unet", "model.width=4", "data.num_sites=2",
                                "train.local_norm=true", "privacy.enabled=false"])
    settings = SiteSettings(name="site-1", site_index=0, num_sites=2, data_dir=str(tmp_path), state_dir=tmp_path / "s",
                            run_name="r", simulated=True)
    torch.manual_seed(0)
    model = build_model(config.model, in_channels=1, num_classes=2, dp=True, task="segmentation")
    global_weights = {k: v.clone() for k, v in model.state_dict().items()}
    before = evaluate_round(config=config, settings=settings, global_weights=global_weights)
    assert "dice" in before and not any(k.startswith("personal-") for k in before)  # no personal model yet
    local = {k: v.clone() for k, v in global_weights.items()}
    for name in norm_state_names(model):
        if name.endswith("weight"):
            local[name] = local[name] * 0.5  # the site's "own" norm layers
    keep_local_norm(model, settings=settings, local=local, global_weights=global_weights)
    after = evaluate_round(config=config, settings=settings, global_weights=global_weights)
    assert {k: v for k, v in after.items() if not k.startswith("personal-")} == before  # the global model's, unchanged
    assert set(after) - set(before) == {"personal-loss", "personal-dice"}
    assert after["personal-loss"] != after["loss"]
    content = RecordDict({"site": ConfigRecord({"name": "site-1"}), "metrics": MetricRecord(after)})
    check_reply(content, allowed_metrics=evaluate_metrics("segmentation"))


def test_no_personal_dice_leaves_where_the_global_dice_was_withheld(tmp_path: Path) -> None:
    """A coordinator turning personalization on learns nothing the site's floor withheld from the global metrics."""
    from client.personal import personal_task_metrics
    from federation.config import load_config

    config = load_config(None, ["data.dataset=synthetic_seg", "data.task=segmentation", "model.name=unet",
                                "model.width=4", "train.local_norm=true"])
    settings = SiteSettings(name="site-1", site_index=0, num_sites=2, data_dir=str(tmp_path), state_dir=tmp_path / "s",
                            run_name="r")
    model = build_model(config.model, in_channels=1, num_classes=2, dp=True, task="segmentation")
    keep_local_norm(model, settings=settings, local=model.state_dict(), global_weights=model.state_dict())
    assert (settings.run_state_dir / LOCAL_NORM_FILE).is_file()  # the site has a personal model to evaluate
    assert personal_task_metrics(model, data=None, config=config, released={"loss": 0.3, "dice-n": 3.0},  # type: ignore[arg-type]
                                 global_weights=model.state_dict(), settings=settings) == {}
