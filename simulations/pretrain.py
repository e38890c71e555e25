"""``medfed pretrain``: train centrally, without DP, on the data declared public, and write an init file.

The public slice is ``data.public_fraction`` of the pooled training images, held out
of every site (:mod:`federation.data.public`). The model has the federation's
architecture (``model.*``, BatchNorm conversion included), and the output folder
has a run directory's layout for ``model.init``::

    <out>/export/model_state.pt   the weights (model.init=<out>)
    <out>/pretrain.json           what was trained on, for how long, and its test metrics

Then ``medfed simulate --set data.public_fraction=<same> --set model.init=<out>``
fine-tunes it in the federation (with DP when ``privacy.enabled``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from federation.config import ConfigError, ExperimentConfig
from federation.console import console

if TYPE_CHECKING:  # torch, MONAI: loaded by the command that trains, not by every medfed command
    import torch

logger = logging.getLogger(__name__)

PRETRAIN_FILE = "pretrain.json"


def pretrain(config: ExperimentConfig, *, out_dir: Path, epochs: float) -> Path:
    """Train ``config``'s model on its public slice for ``epochs`` passes (no DP) and write ``out_dir``.

    Args:
        config: The federation's config (``data.public_fraction`` > 0; ``train.*`` but
            ``local_epochs`` apply; privacy is ignored: the data are public).
        out_dir: Folder to write (created; an existing export is refused).
        epochs: Passes over the public slice.

    Returns:
        The weights file (``<out_dir>/export/model_state.pt``).

    Raises:
        ValueError: No public data, or ``out_dir`` already holds an export.
    """
    import torch  # noqa: PLC0415

    from federation.data import dataset_info  # noqa: PLC0415
    from federation.data.public import load_public  # noqa: PLC0415
    from federation.models import build_model  # noqa: PLC0415
    from federation.models.init import RUN_EXPORT, sha256_file  # noqa: PLC0415
    from federation.training import select_device, train_local  # noqa: PLC0415

    target = out_dir / RUN_EXPORT
    if target.exists():
        raise ValueError(f"{target} exists; choose another --out folder")
    public = load_public(config.data, seed=config.seed)
    info = dataset_info(config.data, seed=config.seed)
    torch.manual_seed(config.seed)
    model = build_model(config.model, in_channels=info.in_channels, num_classes=info.num_classes,
                        spatial_dims=info.spatial_dims, dp=False, task=config.data.task)
    train = config.train.model_copy(update={"local_epochs": float(epochs), "local_steps": 0})
    device = select_device(train.device)
    started = time.perf_counter()
    result = train_local(model=model, dataset=public, config=train, privacy=None, seed=config.seed, device=device,
                         task=config.data.task)
    metrics = _evaluate(config, model, device)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, target)
    facts: dict[str, Any] = {
        "dataset": config.data.dataset, "public_fraction": config.data.public_fraction, "public_examples": len(public),
        "model": config.model.model_dump(), "train": train.model_dump(), "epochs": epochs, "steps": result.steps,
        "loss": result.loss, "seconds": time.perf_counter() - started, "seed": config.seed,
        "central_test": metrics, "sha256": sha256_file(target),
    }
    (out_dir / PRETRAIN_FILE).write_text(json.dumps(facts, indent=2, default=str))
    logger.info("pretrained on %d public examples: %s -> %s", len(public), metrics, target)
    return target


def _evaluate(config: ExperimentConfig, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
    """The pooled test split's metrics (the coordinator's central evaluation)."""
    from federation.data import load_central_test  # noqa: PLC0415
    from federation.tasks import get_task  # noqa: PLC0415

    test = load_central_test(config.data, seed=config.seed)
    return get_task(config.data.task).evaluate(model=model, dataset=test, device=device)


def pretrain_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for the init file (then model.init=<this folder>).")],
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="Preset YAML file or name.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a key (repeatable).")] = None,
    epochs: Annotated[float, typer.Option("--epochs", help="Passes over the public slice.")] = 5.0,
) -> None:
    """Train centrally without DP on the public slice (data.public_fraction) and write an init file."""
    from simulations.harness import resolve_config  # noqa: PLC0415

    try:
        resolved = resolve_config(config_path=config, overrides=set_ or [])
        path = pretrain(resolved, out_dir=out, epochs=epochs)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(code=2) from None
    facts = json.loads((out / PRETRAIN_FILE).read_text())
    console.print(f"pretrained on {facts['public_examples']} public images: {facts['central_test']}\n"
                  f"init file: {path}\nuse: --set data.public_fraction={resolved.data.public_fraction} "
                  f"--set model.init={out}")


def register_pretrain_command(app: typer.Typer) -> None:
    """Add ``medfed pretrain`` to the main app."""
    app.command("pretrain")(pretrain_command)
