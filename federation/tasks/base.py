"""The :class:`Task` interface every layer asks instead of branching on ``data.task``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from federation.config.schema import ExperimentConfig
    from federation.data.sites import SiteData


class Task(ABC):
    """What a model learns, how it is trained and scored, and what a site may report about it.

    Attributes:
        name: The ``data.task`` value.
        headline: The metric that ranks rounds and runs (``auc``, ``dice``): summaries
            report ``best_global_<headline>``, plots and tables show it first.
        clinical_reports: Whether the research report (:mod:`simulations.research_report`:
            scenario, sites, participation, the headline and the baselines' metrics per site)
            applies to its runs; where not, it is skipped with
            :attr:`reports_skipped_reason` (recorded, not a failure). The layers above
            keep each task's own report parts in registries keyed by the task's name: the
            clinical report (``server.clinical_report.CLINICAL_REPORTS``), the model card
            (``server.model_card.TASK_CARDS``), the simulation gallery
            (``simulations.gallery.GALLERIES``) and the baselines' metrics
            (``simulations.baselines.COMPARED``); a new task adds an entry to each.
    """

    name: ClassVar[str] = ""
    headline: ClassVar[str] = ""
    clinical_reports: ClassVar[bool] = False

    @property
    def reports_skipped_reason(self) -> str | None:
        """Why the classification reports are skipped for this task's runs (None: they are written)."""
        if self.clinical_reports:
            return None
        return f"not adapted to data.task={self.name} yet (it assumes a classifier's class probabilities)"

    @abstractmethod
    def targets(self, *, labels: np.ndarray, masks: np.ndarray | None) -> np.ndarray:
        """The training/evaluation target of each sample, given its label and (if any) its mask.

        Args:
            labels: Case labels ``(N,)`` (for segmentation datasets: a stratum, see
                :class:`federation.data.DatasetSplits`).
            masks: Label maps ``(N, *spatial)``, or ``None`` when the dataset has none.

        Raises:
            ValueError: The dataset has no target of this task.
        """

    @abstractmethod
    def per_sample_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One loss per sample, ``(B,)`` (what DP-SGD clips per sample); its mean is :meth:`loss`."""

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss (what non-private training back-propagates)."""
        return self.per_sample_loss(logits, targets).mean()

    @abstractmethod
    def evaluate(
        self, *, model: nn.Module, dataset: Dataset, batch_size: int = 256, device: torch.device | None = None
    ) -> dict[str, float]:
        """Global metrics of ``model`` on ``dataset`` (the coordinator's central evaluation): loss and the headline."""

    def site_metrics(
        self, *, model: nn.Module, data: SiteData, config: ExperimentConfig, device: torch.device | None = None
    ) -> dict[str, float] | None:
        """The aggregates a site sends about ``model`` on its own test split (names in :meth:`metric_names`).

        ``None`` (the default): the site runs its clinical evaluation of a classifier
        (``client.site``: intervals, calibration, subgroups under its disclosure rules).
        """
        del model, data, config, device
        return None

    @abstractmethod
    def metric_names(self) -> frozenset[str]:
        """Every name :meth:`site_metrics` can produce (a finite list the site's guard whitelists)."""
