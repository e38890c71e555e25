"""Export a trained global model in a portable form, and load it back.

A run's ``export/`` folder holds:

* ``model_state.pt`` - the torch ``state_dict`` (for medfed: :func:`load_run_model`);
* ``model.pt2`` - a :func:`torch.export` program of the model *followed by softmax*,
  with a dynamic batch dimension: ``torch.export.load("model.pt2").module()(x)``
  maps ``float32 (N, C, S, S)`` (volumes ``(N, C, S, S, S)``) in ``[0, 1]`` to class probabilities ``(N, K)`` and
  needs nothing but torch (TorchScript is deprecated as of torch 2.10);
* ``model.json`` - classes, positive class and threshold, preprocessing, file
  checksums and the loading recipe.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from federation.inference.preprocess import Preprocessing
from federation.hashing import sha256_file

logger = logging.getLogger(__name__)

EXPORT_DIR = "export"
STATE_FILE = "model_state.pt"
PROGRAM_FILE = "model.pt2"
META_FILE = "model.json"
MAX_BATCH = 4096
LOAD_RECIPE = (
    "import torch; m = torch.export.load('model.pt2').module(); "
    "probs = m(x)  # x: float32 (N, C, S, S) in [0, 1], preprocessed as 'preprocessing' says"
)


class ProbabilityModel(nn.Module):
    """``softmax(model(x))``: what the exported program computes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(N, K)``."""
        return torch.softmax(self.model(x).float(), dim=1)


@dataclass(frozen=True)
class ExportedModel:
    """Paths of an export and its metadata."""

    directory: Path
    state: Path
    program: Path
    meta: dict[str, Any]



def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False))
    os.replace(tmp, path)


def export_model(
    *,
    model: nn.Module,
    preprocessing: Preprocessing,
    out_dir: str | os.PathLike[str],
    metadata: dict[str, Any] | None = None,
) -> ExportedModel:
    """Write ``model_state.pt``, ``model.pt2`` (torch.export, softmax output) and ``model.json``.

    Args:
        model: The trained classifier (logits out); it is put in eval mode.
        preprocessing: Input size, channels and DICOM reading settings.
        out_dir: The export folder (created).
        metadata: Extra JSON-able facts for ``model.json`` (classes, threshold, round, ...).

    Returns:
        The :class:`ExportedModel`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").eval()
    state = out / STATE_FILE
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, state)
    example = torch.rand(*preprocessing.input_shape(2), generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        program = torch.export.export(ProbabilityModel(model), (example,), dynamic_shapes=({0: batch},))
    program_path = out / PROGRAM_FILE
    torch.export.save(program, program_path)
    meta = {
        "format": "medfed-export-1",
        "program": PROGRAM_FILE,
        "state_dict": STATE_FILE,
        "input": {"shape": list(preprocessing.input_shape()), "dtype": "float32", "range": [0.0, 1.0]},
        "output": "softmax class probabilities, float32 (N, num_classes)",
        "load": LOAD_RECIPE,
        "preprocessing": preprocessing.to_dict(),
        **(metadata or {}),
        "sha256": {PROGRAM_FILE: sha256_file(program_path), STATE_FILE: sha256_file(state)},
        "torch": torch.__version__,
    }
    _atomic_json(out / META_FILE, meta)
    logger.info("exported the model to %s", out)
    return ExportedModel(directory=out, state=state, program=program_path, meta=meta)


def export_dir_of(path: str | os.PathLike[str]) -> Path:
    """The export folder for a run directory or an export folder itself.

    Raises:
        FileNotFoundError: Neither holds ``model.json``.
    """
    base = Path(path).expanduser()
    for candidate in (base, base / EXPORT_DIR):
        if (candidate / META_FILE).is_file():
            return candidate
    raise FileNotFoundError(
        f"--model {base}: no {EXPORT_DIR}/{META_FILE}; pass a finished run directory (runs/<name>) "
        "or its export folder"
    )


def read_export_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``model.json`` of a run directory or export folder."""
    return json.loads((export_dir_of(path) / META_FILE).read_text())


def load_exported(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Load the portable program (softmax output) and its metadata."""
    directory = export_dir_of(path)
    meta = json.loads((directory / META_FILE).read_text())
    module = torch.export.load(directory / meta.get("program", PROGRAM_FILE)).module()
    return module, meta


def load_run_model(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the exported model as a medfed ``nn.Module`` (logits out, eval mode), e.g. for Grad-CAM.

    Needs the run's ``config.yaml`` next to ``export/`` (the architecture comes from it).
    """
    from federation.config import load_config
    from federation.models import build_model

    directory = export_dir_of(path)
    meta = json.loads((directory / META_FILE).read_text())
    config_file = directory.parent / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: Grad-CAM needs the run's config to rebuild the network")
    config = load_config(config_file)
    prep = Preprocessing.from_dict(meta["preprocessing"])
    model = build_model(config.model, in_channels=prep.in_channels, num_classes=int(meta["num_classes"]),
                        spatial_dims=prep.spatial_dims, dp=False)
    model.load_state_dict(torch.load(directory / meta.get("state_dict", STATE_FILE), map_location="cpu"))
    return model.eval(), meta
