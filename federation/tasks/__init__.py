"""Learning tasks (``data.task``): what a batch's target is, the loss, and the metrics a site computes.

Every layer asks the task instead of branching on it: the data layer for the
targets a site trains on (:meth:`Task.targets`), local training for the loss
(:meth:`Task.loss`, :meth:`Task.per_sample_loss` under DP-SGD), a site for its
evaluation aggregates and their names (:meth:`Task.site_metrics`,
:meth:`Task.metric_names`, which the outbound guard whitelists), the coordinator
for central evaluation and the headline metric of summaries and reports
(:meth:`Task.evaluate`, :attr:`Task.headline`).

Built in: ``classification`` (one label per image, cross-entropy, AUC) and
``segmentation`` (one label per pixel/voxel, MONAI DiceCELoss, Dice). The
registry is light: looking a name up imports nothing heavy, building the task
does (torch, MONAI).

Example::

    from federation.tasks import get_task
    task = get_task(config.data.task)
    losses = task.per_sample_loss(logits, targets)   # (B,)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from federation.config.schema import ExperimentConfig
    from federation.tasks.base import Task

_BUILTIN = {
    "classification": "federation.tasks.classification:ClassificationTask",
    "segmentation": "federation.tasks.segmentation:SegmentationTask",
}
_BUILTIN_HEADLINES = {"classification": "auc", "segmentation": "dice"}
_registered: dict[str, Task] = {}


def available_tasks() -> list[str]:
    """The task names ``data.task`` accepts, sorted."""
    return sorted({*_BUILTIN, *_registered})


def register_task(task: Task, *, replace: bool = False) -> None:
    """Register a :class:`~federation.tasks.base.Task` under ``task.name``.

    Raises:
        ValueError: The name is empty or taken (and ``replace`` is false).
    """
    if not task.name:
        raise ValueError("a task needs a non-empty name")
    if task.name in available_tasks() and not replace:
        raise ValueError(f"task {task.name!r} is already registered; pass replace=True to override it")
    _registered[task.name] = task


def check_task_name(name: str) -> str:
    """Return ``name`` if it is a task, else raise ValueError listing the valid names (imports nothing)."""
    if name not in _BUILTIN and name not in _registered:
        raise ValueError(f"unknown task {name!r} (data.task); available: {', '.join(available_tasks())}")
    return name


def headline_metric(name: str) -> str:
    """The metric that ranks rounds and runs of task ``name`` (``auc``, ``dice``), without building the task.

    Raises:
        ValueError: Unknown name; the message lists the valid ones.
    """
    check_task_name(name)
    return _registered[name].headline if name in _registered else _BUILTIN_HEADLINES[name]


def task_problems(config: ExperimentConfig) -> list[str]:
    """Where ``data.task`` disagrees with the dataset (``data.dataset``) or network (``model.name``) it names.

    Each problem names both keys and what would fit; unknown names give no problem here
    (the name checks report them). Loads the registries (torch, MONAI).
    """
    from federation.data.registry import available_datasets, check_dataset_task  # noqa: PLC0415
    from federation.models.registry import available_models, model_tasks  # noqa: PLC0415

    task, problems = config.data.task, []
    if config.data.dataset in available_datasets():
        try:
            check_dataset_task(config.data)
        except ValueError as err:
            problems.append(str(err))
    model = config.model.name
    if model in available_models() and task not in model_tasks(model):
        fits = [n for n in available_models() if task in model_tasks(n)]
        problems.append(f"model.name={model!r} serves data.task {', '.join(model_tasks(model))}; got "
                        f"data.task={task!r} (models for {task}: {', '.join(fits) or 'none'})")
    return problems


def get_task(name: str) -> Task:
    """The task called ``name`` (built on first use, then shared).

    Raises:
        ValueError: Unknown name; the message lists the valid ones.
    """
    check_task_name(name)
    if name not in _registered:
        module, attr = _BUILTIN[name].split(":")
        _registered[name] = getattr(importlib.import_module(module), attr)()
    return _registered[name]


__all__ = ["available_tasks", "check_task_name", "get_task", "headline_metric", "register_task", "task_problems"]
