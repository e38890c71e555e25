"""Transfer learning (issue 21): model.init loading, BatchNorm made DP-compatible, init in the model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from federation.config import ConfigError
from federation.config.schema import ModelConfig
from federation.models import build_model
from federation.models.convert import FrozenBatchNorm, convert_batchnorm, norm_state_names
from federation.models.init import _torchvision_key, load_init, read_state_dict


def _cnn(num_classes: int = 2, *, seed: int = 0, **model: object) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(name="cnn", width=4, **model), in_channels=1, num_classes=num_classes, dp=False)


def test_a_state_dict_file_loads_every_tensor_and_gives_the_same_outputs(tmp_path: Path) -> None:
    source = _cnn(seed=1)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    target = _cnn(seed=2)
    report = load_init(target, source=str(tmp_path / "w.pt"), model_name="cnn")
    x = torch.rand(3, 1, 16, 16)
    assert torch.equal(source.eval()(x), target.eval()(x))
    assert report.origin == "file" and report.mismatched == {} and report.missing == [] and report.unused == []
    assert len(report.loaded) == len(source.state_dict())
    assert report.sha256 == __import__("hashlib").sha256((tmp_path / "w.pt").read_bytes()).hexdigest()


def test_a_head_with_other_classes_is_reinitialised_and_reported(tmp_path: Path) -> None:
    torch.save(_cnn(num_classes=3, seed=1).state_dict(), tmp_path / "w3.pt")
    fresh = _cnn(seed=2)
    head_before = fresh.classifier.weight.detach().clone()
    report = load_init(fresh, source=str(tmp_path / "w3.pt"), model_name="cnn")
    assert sorted(report.mismatched) == ["classifier.bias", "classifier.weight"]
    assert report.mismatched["classifier.weight"] == "(3, 16) in the file, (2, 16) in the model"
    assert torch.equal(fresh.classifier.weight, head_before)  # kept its fresh initialisation
    assert report.as_dict()["counts"] == {"loaded": len(fresh.state_dict()) - 2, "mismatched": 2, "unused": 0,
                                          "missing": 0}


def test_a_file_that_matches_nothing_is_an_error(tmp_path: Path) -> None:
    torch.save({"foo.weight": torch.ones(3)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="no tensor of .*other.pt fits model.name='cnn'"):
        load_init(_cnn(), source=str(tmp_path / "other.pt"), model_name="cnn")
    with pytest.raises(ConfigError, match="no file or run directory at"):
        load_init(_cnn(), source=str(tmp_path / "absent.pt"), model_name="cnn")
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(ConfigError, match="without export/model_state.pt"):
        load_init(_cnn(), source=str(tmp_path / "empty-run"), model_name="cnn")


def test_checkpoints_and_run_directories_are_read(tmp_path: Path) -> None:
    source = _cnn(seed=3)
    wrapped = {f"_module.{k}": v for k, v in source.state_dict().items()}  # Opacus prefix, MONAI-style nesting
    torch.save({"model": wrapped, "optimizer": {"state": {}}, "epoch": 4}, tmp_path / "ckpt.pt")
    assert set(read_state_dict(tmp_path / "ckpt.pt")) == set(source.state_dict())
    (tmp_path / "run" / "export").mkdir(parents=True)
    torch.save(source.state_dict(), tmp_path / "run" / "export" / "model_state.pt")
    target = _cnn(seed=4)
    report = load_init(target, source=str(tmp_path / "run"), model_name="cnn")
    assert report.origin == "run" and report.path.endswith("export/model_state.pt")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


def test_imagenet_offline_says_which_file_to_download_and_where(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    model = build_model(ModelConfig(name="resnet10"), in_channels=1, num_classes=2, dp=False)
    with pytest.raises(ConfigError, match="no ImageNet weights for model.name='resnet10'"):
        load_init(model, source="imagenet", model_name="resnet10")
    with pytest.raises(ConfigError) as err:
        load_init(model, source="imagenet", model_name="densenet121")
    message = str(err.value)
    assert "https://download.pytorch.org/models/densenet121-a639ec97.pth" in message
    assert str(tmp_path / "hub" / "checkpoints" / "densenet121-a639ec97.pth") in message


def test_torchvision_names_map_onto_medfeds_resnet18_and_densenet() -> None:
    own = set(build_model(ModelConfig(name="resnet18", norm="batch"), in_channels=3, num_classes=2,
                          dp=False).state_dict())
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.conv2.weight", "layer2.0.bn1.bias",
                "layer3.0.downsample.0.weight", "layer4.1.bn2.weight", "fc.bias"):
        assert _torchvision_key(key, model_name="resnet18") in own, key
    dense = set(build_model(ModelConfig(name="densenet121", norm="batch"), in_channels=3, num_classes=2,
                            dp=False).state_dict())
    for key in ("features.denseblock1.denselayer1.norm.1.running_mean", "features.conv0.weight",
                "features.transition1.norm.weight", "features.norm5.bias", "classifier.weight"):
        assert _torchvision_key(key, model_name="densenet121") in dense, key
    assert _torchvision_key("classifier.weight", model_name="densenet121") == "class_layers.out.weight"


def _with_statistics(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine (as a pretrained net has)."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            c = module.num_features
            module.running_mean.copy_(torch.randn(c, generator=generator))
            module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            with torch.no_grad():
                module.weight.copy_(torch.randn(c, generator=generator))
                module.bias.copy_(torch.randn(c, generator=generator))
    return model


@pytest.mark.parametrize(("name", "spatial_dims", "side"), [("resnet10", 2, 16), ("cnn", 3, 8), ("unet", 2, 16)])
def test_frozen_batchnorm_gives_the_batchnorm_outputs_and_passes_opacus(name: str, spatial_dims: int,
                                                                       side: int) -> None:
    torch.manual_seed(0)
    bn = _with_statistics(build_model(ModelConfig(name=name, norm="batch", width=4), in_channels=1, num_classes=2,
                                      spatial_dims=spatial_dims, dp=False)).eval()
    state = bn.state_dict()
    frozen = build_model(ModelConfig(name=name, norm="batch", batchnorm="frozen", width=4), in_channels=1,
                         num_classes=2, spatial_dims=spatial_dims, dp=True)  # validated by Opacus inside
    report_unused = set(state) - set(frozen.state_dict())
    assert report_unused == {k for k in state if k.endswith("num_batches_tracked")}  # BN names are kept
    frozen.load_state_dict({k: v for k, v in state.items() if k in frozen.state_dict()})
    x = torch.rand(2, 1, *(side,) * spatial_dims)
    torch.testing.assert_close(frozen.train()(x), bn(x), atol=1e-5, rtol=0)  # the same in training mode too
    assert ModuleValidator.validate(frozen, strict=False) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in frozen.modules())


def test_group_mode_keeps_the_affine_and_passes_opacus() -> None:
    bn = _with_statistics(build_model(ModelConfig(name="cnn", norm="batch", width=4), in_channels=1,
                                      num_classes=2, dp=False))
    first = bn.features[0].adn.N
    group = convert_batchnorm(bn, mode="group")
    converted = group.features[0].adn.N
    assert isinstance(converted, nn.GroupNorm) and torch.equal(converted.weight, first.weight)
    assert ModuleValidator.validate(group, strict=False) == []
    with pytest.raises(ValueError, match="valid: keep, frozen, group"):
        convert_batchnorm(bn, mode="fold")


def test_frozen_batchnorm_trains_nothing_and_fedbn_finds_its_state() -> None:
    model = build_model(ModelConfig(name="cnn", norm="batch", batchnorm="frozen", width=4), in_channels=1,
                        num_classes=2, dp=True)
    assert all(not isinstance(m, FrozenBatchNorm) or not list(m.parameters()) for m in model.modules())
    names = norm_state_names(model)
    assert "features.0.adn.N.running_var" in names and len(names) == 6 * 4


def test_batchnorm_under_dp_is_refused_unless_converted() -> None:
    from simulations.harness import resolve_config

    with pytest.raises(ConfigError, match="model.batchnorm=frozen"):
        resolve_config(overrides=["model.norm=batch"])
    assert resolve_config(overrides=["model.norm=batch", "model.batchnorm=frozen"]).model.batchnorm == "frozen"


def test_the_coordinator_loads_init_and_records_it_for_the_model_card(tmp_path: Path) -> None:
    from server.app import INIT_FILE, _initial_model
    from server.model_card import _init_facts
    from server.run_dir import RunDirectory
    from simulations.harness import resolve_config

    overrides = ["data.num_samples=64", "model.width=4", f"server.out_dir={tmp_path}", "server.run_name=a"]
    source = _initial_model(resolve_config(overrides=[*overrides, "seed=5"]))
    torch.save(source.state_dict(), tmp_path / "init.pt")
    config = resolve_config(overrides=[*overrides, f"model.init={tmp_path / 'init.pt'}"])
    run = RunDirectory.create(config)
    model = _initial_model(config, run)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), model.state_dict().values()))
    facts = _init_facts(run.path)
    assert json.loads((run.path / INIT_FILE).read_text())["sha256"] == facts["sha256"]
    assert facts["origin"] == "file" and facts["counts"]["loaded"] == len(model.state_dict())


@pytest.mark.integration
def test_round_zero_from_a_runs_export_evaluates_as_that_runs_final_round(tmp_path: Path) -> None:
    """A tiny federation, then its export as model.init: the coordinator's round-0 evaluation equals its last."""
    from flwr.app import ArrayRecord

    from server.app import _central_evaluation, _initial_model
    from server.run_dir import read_jsonl
    from simulations.harness import resolve_config, simulate

    tiny = ["data.num_sites=2", "data.num_samples=96", "model.width=4", "train.batch_size=16", "server.rounds=1",
            "strategy.min_sites=2", "privacy.enabled=false", f"server.out_dir={tmp_path}"]
    run_dir = simulate(resolve_config(overrides=[*tiny, "server.run_name=source"]))
    final = read_jsonl(run_dir / "rounds.jsonl")[-1]["global"]
    config = resolve_config(overrides=[*tiny, "server.run_name=again", f"model.init={run_dir}"])
    model = _initial_model(config)
    assert read_jsonl(run_dir / "rounds.jsonl")[0]["global"] != final  # round 1 did change the model
    round_zero = _central_evaluation(config, model).result(0, ArrayRecord(model.state_dict()))
    assert round_zero == pytest.approx(final, abs=1e-9) and final["auc"] > 0


def _dp_round(model: nn.Module, *, trainable: str, mode: str) -> float:
    from torch.utils.data import TensorDataset

    from federation.config.schema import PrivacyConfig, TrainConfig
    from federation.privacy import SitePrivacy
    from federation.training import train_local

    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(40, 1, 12, 12, generator=generator),
                         torch.randint(0, 2, (40,), generator=generator))
    privacy = SitePrivacy(config=PrivacyConfig(noise_multiplier=0.8, target_epsilon=100.0, grad_sample_mode=mode),
                          num_examples=40, batch_size=10, local_epochs=1.0, planned_rounds=2)
    train_local(model=model, dataset=data, config=TrainConfig(batch_size=10, trainable=trainable, device="cpu"),
                privacy=privacy, seed=3, noise_source="seeded")
    return privacy.epsilon_spent()


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_frozen_parameters_are_unchanged_after_a_dp_round_and_epsilon_is_the_same(mode: str) -> None:
    model = _cnn(seed=1)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    eps_head = _dp_round(model, trainable="head", mode=mode)
    after = model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["classifier.bias", "classifier.weight"]  # the noise reached the head only
    eps_all = _dp_round(_cnn(seed=1), trainable="all", mode=mode)
    assert eps_head == eps_all > 0  # the same accountant inputs: sigma, q, steps


def test_trainable_forms_select_the_expected_parameters() -> None:
    from federation.training.trainable import stages, trainable_names

    cnn = _cnn()
    assert stages(cnn) == [f"features.{i}" for i in range(6)]
    assert trainable_names(cnn, "last-1") == [n for n, _ in cnn.named_parameters()
                                             if n.startswith(("features.5.", "classifier."))]
    assert trainable_names(cnn, "classifier.*, features.0.*") == [
        "features.0.conv.weight", "features.0.adn.N.weight", "features.0.adn.N.bias",
        "classifier.weight", "classifier.bias"]
    resnet = build_model(ModelConfig(name="resnet10"), in_channels=1, num_classes=2, dp=False)
    assert stages(resnet) == ["stem", "layer1", "layer2", "layer3", "layer4"]
    unet = build_model(ModelConfig(name="unet", width=4), in_channels=1, num_classes=2, dp=False)
    assert trainable_names(unet, "head") == ["model.2.1.conv.weight", "model.2.1.conv.bias"]
    with pytest.raises(ConfigError, match="this model has 6 stages"):
        trainable_names(cnn, "last-9")
    with pytest.raises(ConfigError, match="matches no parameter"):
        trainable_names(cnn, "decoder.*")


def test_the_public_slice_is_held_out_of_every_site_and_pretrain_writes_an_init(tmp_path: Path) -> None:
    from federation.data import load_dataset
    from federation.data.public import load_public
    from simulations.harness import resolve_config
    from simulations.pretrain import PRETRAIN_FILE, pretrain

    config = resolve_config(overrides=["data.num_samples=120", "data.public_fraction=0.25", "model.width=4",
                                       "train.batch_size=16"])
    public = load_public(config.data, seed=config.seed)
    private = load_dataset(config.data, seed=config.seed)
    full = load_dataset(config.data.model_copy(update={"public_fraction": 0.0}), seed=config.seed)
    assert len(public) == round(0.25 * len(full.train_labels)) and len(public) + len(private.train_labels) == \
        len(full.train_labels)
    seen = {row.tobytes() for row in private.train_images}
    assert not any(img.numpy().tobytes() in seen for img, _ in public)  # no site holds a public image
    path = pretrain(config, out_dir=tmp_path / "pre", epochs=1)
    facts = json.loads((tmp_path / "pre" / PRETRAIN_FILE).read_text())
    assert facts["public_examples"] == len(public) and set(facts["central_test"]) >= {"auc", "loss"}
    model = _cnn()
    report = load_init(model, source=str(tmp_path / "pre"), model_name="cnn")
    assert report.path == str(path.resolve()) and report.mismatched == {} and report.missing == []
    with pytest.raises(ValueError, match="exists; choose another --out"):
        pretrain(config, out_dir=tmp_path / "pre", epochs=1)
