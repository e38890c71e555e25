"""``medfed site check --pacs``: the cohort a site's PACS gives, before any training.

Retrieves the cohort into the site's cache (:func:`federation.data.dicom.pacs.sync_cohort`),
assembles every series as a volume (:mod:`federation.data.dicom.series`) to set broken
ones aside with their reason, and runs the folder checks (:func:`check_site`) on the cache.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rich.console import Group
from rich.table import Table

from federation.data.dicom.index import scan_files
from federation.data.dicom.pacs import LABELS, PacsConfig, SyncResult, sync_cohort
from federation.data.dicom.report import SiteReport
from federation.data.dicom.series import SeriesProblem, read_series


@dataclass
class CohortReport:
    """The cohort: retrieval counts, series set aside with reasons, and the folder check of the cache."""

    sync: SyncResult
    problems: list[SeriesProblem]
    site: SiteReport | None

    @property
    def usable_series(self) -> int:
        """Labelled series not set aside."""
        return len(self.sync.series) - len({p.series_instance_uid for p in self.problems})

    def to_dict(self) -> dict:
        """JSON-ready summary (UIDs, counts and reasons; no patient data)."""
        return {
            "pacs": str(self.sync.cache_dir), "series": len(self.sync.series),
            "modalities": dict(Counter(s.modality for s in self.sync.series)),
            "fetched": self.sync.fetched, "reused": self.sync.reused, "removed": self.sync.removed,
            "unlabelled_series": [s.series_instance_uid for s in self.sync.unlabelled],
            "set_aside": [{"series_instance_uid": p.series_instance_uid, "reason": p.reason, "detail": p.detail}
                          for p in self.problems],
            "site": self.site.to_dict() if self.site is not None else None,
        }


def check_pacs_cohort(config: PacsConfig, *, cache_dir: str | os.PathLike[str], decode: bool = True) -> CohortReport:
    """Retrieve and check the cohort of ``config`` in ``cache_dir``.

    Raises:
        PacsError: The PACS is unreachable, refuses the credentials or answers with an error.
    """
    from federation.data.dicom.loader import check_site  # noqa: PLC0415 - torch only when used

    sync = sync_cohort(config, cache_dir=cache_dir)
    root = sync.cache_dir
    files = [path for _, path, _ in scan_files(root)]
    _, problems = read_series(files, root=root)
    site = check_site(root, root / LABELS, decode=decode) if sync.series else None
    return CohortReport(sync=sync, problems=problems, site=site)


def render_cohort(report: CohortReport, *, url: str) -> Group:
    """Rich tables: series per modality, every series with its status, unlabelled series."""
    sync = report.sync
    bad = {p.series_instance_uid: p for p in report.problems}
    counts = Table(title=f"cohort from PACS {url} (cache {sync.cache_dir})")
    for column in ("modality", "series", "instances", "set aside"):
        counts.add_column(column)
    for modality, n in sorted(Counter(s.modality for s in sync.series).items()):
        of = [s for s in sync.series if s.modality == modality]
        counts.add_row(modality, str(n), str(sum(s.instances for s in of)),
                       str(sum(1 for s in of if s.series_instance_uid in bad)))
    rows = Table(title=f"series: {report.usable_series} usable, {len(bad)} set aside; instances "
                       f"{sync.fetched} fetched, {sync.reused} already cached, {sync.removed} removed")
    for column in ("series instance UID", "modality", "description", "instances", "status"):
        rows.add_column(column, overflow="fold")
    for s in sync.series:
        problem = bad.get(s.series_instance_uid)
        status = "ok" if problem is None else f"[red]set aside[/] {problem.reason}: {problem.detail}"
        rows.add_row(s.series_instance_uid, s.modality, s.description, str(s.instances), status)
    parts: list = [counts, rows]
    if sync.unlabelled:
        parts.append(f"{len(sync.unlabelled)} cohort series without a label (not retrieved): "
                     + ", ".join(s.series_instance_uid for s in sync.unlabelled[:10]))
    return Group(*parts)


def default_cache_dir(config: PacsConfig, cache_dir: Path | None) -> Path:
    """The cohort cache: the option, else the config's ``cache_dir``; one of them is required."""
    if cache_dir is not None:
        return cache_dir
    if config.cache_dir:
        return Path(config.cache_dir).expanduser()
    raise ValueError(f"{config.source}: set cache_dir (a folder inside the site's state-dir or data-dir) "
                     "or pass --pacs-cache")
