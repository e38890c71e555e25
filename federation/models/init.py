"""Start a network from pretrained weights (``model.init``) and say exactly what was loaded.

``model.init`` names one of:

* a torch ``state_dict`` file (``.pt``/``.pth``), or a checkpoint holding one under
  ``state_dict``, ``model``, ``model_state_dict`` or ``network`` (MONAI's
  ``CheckpointSaver`` and bundles, Lightning, torchvision hub files); Opacus'
  ``_module.`` and DataParallel's ``module.`` prefixes are stripped;
* a medfed run directory (its ``export/model_state.pt``), e.g. a ``medfed pretrain``
  output or another federation;
* ``imagenet``: the torchvision ImageNet weights of the chosen net (``densenet121``
  through MONAI's key mapping, ``resnet18`` mapped onto medfed's ResNet). They are
  read from torch's hub cache; a machine offline gets an error naming the URL to
  download and the file to put it in.

Tensors are matched by name and shape: the ones that match are loaded, the others
keep their fresh initialisation and are reported (a head with another number of
classes is *re-initialised*, and said so). A file that matches no tensor at all is an
error, never a silent random start. Only the coordinator loads weights: they travel
to the sites as round 0's global model.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from federation.config.loading import ConfigError
from federation.hashing import sha256_file

logger = logging.getLogger(__name__)

IMAGENET = "imagenet"
"""The ``model.init`` value that asks for ImageNet weights."""
RUN_EXPORT = Path("export") / "model_state.pt"
"""Where a medfed run directory keeps its exported weights."""
_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "network", "net")
_PREFIXES = ("_module.", "module.")

#: ImageNet weights per model name: torchvision's URL (the file name is torch hub's cache name).
IMAGENET_URLS = {
    "densenet121": "https://download.pytorch.org/models/densenet121-a639ec97.pth",
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
}


@dataclass
class InitReport:
    """What loading ``model.init`` did (written to the run directory and the model card)."""

    source: str
    path: str
    sha256: str
    origin: str
    loaded: list[str] = field(default_factory=list)
    mismatched: dict[str, str] = field(default_factory=dict)  # name -> "file shape vs model shape"
    unused: list[str] = field(default_factory=list)  # in the file, not in the model
    missing: list[str] = field(default_factory=list)  # in the model, not in the file: fresh initialisation

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (tensor names of the partial lists, counts of all)."""
        data = asdict(self)
        data["counts"] = {k: len(data[k]) for k in ("loaded", "mismatched", "unused", "missing")}
        return data

    def describe(self) -> str:
        """One log line: counts, and the re-initialised tensors."""
        text = (f"model.init {self.source!r} ({self.origin}, sha256 {self.sha256[:12]}): {len(self.loaded)} tensors "
                f"loaded, {len(self.mismatched)} shape-mismatched, {len(self.unused)} unused, "
                f"{len(self.missing)} not in the file")
        if self.mismatched:
            text += "; re-initialised (shape differs): " + ", ".join(
                f"{k} ({v})" for k, v in list(self.mismatched.items())[:6])
        return text



def hub_dir() -> Path:
    """torch hub's checkpoint cache (``$TORCH_HOME/hub/checkpoints``), where ImageNet weights are looked for."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _init_error(message: str) -> ConfigError:
    return ConfigError([f"model.init: {message}"], source="model config")


def resolve_init_path(source: str, *, model_name: str) -> tuple[Path, str]:
    """Return ``(file, origin)`` for a ``model.init`` value (``origin``: file, run, imagenet).

    Raises:
        ConfigError: Nothing at the path, a run directory without an export, or
            ImageNet weights that are not on this machine and cannot be downloaded.
    """
    if source.strip().lower() == IMAGENET:
        return _imagenet_file(model_name), IMAGENET
    path = Path(source).expanduser()
    if path.is_dir():
        export = path / RUN_EXPORT
        if not export.is_file():
            raise _init_error(f"{path} is a folder without {RUN_EXPORT}: name a medfed run directory whose run "
                              "finished (or medfed pretrain's output), or a state_dict file")
        return export, "run"
    if not path.is_file():
        raise _init_error(f"no file or run directory at {path}")
    return path, "run" if path.parent.name == RUN_EXPORT.parent.name else "file"


def _imagenet_file(model_name: str) -> Path:
    """The cached ImageNet file of ``model_name``, downloaded by torch hub when this machine is online."""
    url = IMAGENET_URLS.get(model_name)
    if url is None:
        raise _init_error(f"no ImageNet weights for model.name={model_name!r}; ImageNet weights exist for "
                          f"{', '.join(sorted(IMAGENET_URLS))} (or give a weights file / run directory)")
    target = hub_dir() / os.path.basename(url)
    if target.is_file():
        return target
    try:
        torch.hub.download_url_to_file(url, str(target), progress=False)
    except Exception as err:  # noqa: BLE001 - offline machines fail in many ways (DNS, proxy, TLS)
        raise _init_error(
            f"ImageNet weights of {model_name} are not on this machine and could not be downloaded "
            f"({type(err).__name__}). "
            f"Download {url} on a machine with internet access and put it at {target} "
            f"(or set TORCH_HOME), then run again"
        ) from None
    return target


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state_dict (or a checkpoint holding one) as ``name -> tensor``, wrapper prefixes stripped.

    Raises:
        ConfigError: Not a torch file, or no tensors in it.
    """
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and format errors alike
        raise _init_error(f"{path} is not a torch weights file ({type(err).__name__}: {err})") from None
    for _ in range(2):  # a checkpoint may nest the state_dict one level down
        if isinstance(raw, Mapping):
            nested = next((raw[k] for k in _NESTED_KEYS if isinstance(raw.get(k), Mapping)), None)
            if nested is not None and not any(isinstance(v, torch.Tensor) for v in raw.values()):
                raw = nested
    if not isinstance(raw, Mapping):
        raise _init_error(f"{path} holds a {type(raw).__name__}, not a state_dict")
    state = {}
    for key, value in raw.items():
        if isinstance(value, torch.Tensor):
            name = str(key)
            for prefix in _PREFIXES:
                while name.startswith(prefix):
                    name = name[len(prefix):]
            state[name] = value
    if not state:
        raise _init_error(f"{path} holds no tensors")
    return state


_DENSE = re.compile(r"^(.*denselayer\d+)(\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
_RESNET_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.(conv|bn)([12])\.(.+)$")
_RESNET_DOWN = re.compile(r"^layer(\d)\.(\d+)\.downsample\.([01])\.(.+)$")


def _torchvision_key(key: str, *, model_name: str) -> str:
    """Rename a torchvision key to medfed's name for the same tensor (unchanged when no rule applies)."""
    if model_name == "densenet121":  # MONAI's DenseNet: as monai.networks.nets.densenet._load_state_dict
        match = _DENSE.match(key)
        if match:
            return f"{match[1]}.layers{match[2]}{match[3]}"
        return "class_layers.out." + key.split(".", 1)[1] if key.startswith("classifier.") else key
    if model_name == "resnet18":  # medfed's ResNet: MONAI Convolution blocks (conv, adn.N)
        if key.startswith(("conv1.", "bn1.")):
            part, rest = key.split(".", 1)
            return f"stem.conv.{rest}" if part == "conv1" else f"stem.adn.N.{rest}"
        match = _RESNET_BLOCK.match(key)
        if match:
            layer, block, kind, idx, rest = match.groups()
            return f"layer{layer}.{block}.conv{idx}." + ("conv." if kind == "conv" else "adn.N.") + rest
        match = _RESNET_DOWN.match(key)
        if match:
            layer, block, idx, rest = match.groups()
            return f"layer{layer}.{block}.shortcut." + ("conv." if idx == "0" else "adn.N.") + rest
    return key


def _rename(state: Mapping[str, torch.Tensor], *, model: nn.Module, model_name: str) -> dict[str, torch.Tensor]:
    """torchvision names mapped onto the model's when that makes more of them match."""
    own = set(model.state_dict())
    renamed = {_torchvision_key(k, model_name=model_name): v for k, v in state.items()}
    return renamed if len(own & set(renamed)) > len(own & set(state)) else dict(state)


def load_init(model: nn.Module, *, source: str, model_name: str) -> InitReport:
    """Load ``model.init`` = ``source`` into ``model`` in place and report what happened.

    Args:
        model: A freshly built network (its fresh values stay where nothing matches).
        source: The ``model.init`` value.
        model_name: ``model.name`` (key mapping and ImageNet weights).

    Returns:
        The :class:`InitReport` (also logged; a re-initialised tensor is a warning).

    Raises:
        ConfigError: No weights at ``source`` or not a weights file (see
            :func:`resolve_init_path`), or not one tensor of the file fits the model.
    """
    path, origin = resolve_init_path(source, model_name=model_name)
    state = _rename(read_state_dict(path), model=model, model_name=model_name)
    own = model.state_dict()
    report = InitReport(source=source, path=str(path.resolve()), sha256=sha256_file(path), origin=origin)
    matched: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name not in own:
            report.unused.append(name)
        elif tuple(tensor.shape) != tuple(own[name].shape):
            report.mismatched[name] = f"{tuple(tensor.shape)} in the file, {tuple(own[name].shape)} in the model"
        else:
            matched[name] = tensor.to(own[name].dtype)
    report.loaded = sorted(matched)
    report.missing = sorted(set(own) - set(state))
    if not [n for n in matched if not n.endswith("num_batches_tracked")]:
        raise _init_error(
            f"no tensor of {path} fits model.name={model_name!r} with this config (unused: "
            f"{', '.join(report.unused[:5]) or 'none'}; shape-mismatched: "
            f"{', '.join(list(report.mismatched)[:5]) or 'none'}); "
            "check model.name, model.width and model.norm against the run that wrote it")
    model.load_state_dict(matched, strict=False)
    (logger.warning if report.mismatched or report.missing else logger.info)("%s", report.describe())
    return report
