"""A hospital site's own state, read for its operator: privacy ledger, audit log, policy budget.

Reads only ``<state dir>/<site>/ledger.json`` and ``audit.jsonl`` (and the policy
file the operator names); it never contacts the coordinator. The audit log is
followed like a run's records (:class:`dashboard.records.JsonlTail`: appended bytes
only, a torn last line waits), and the ledger is parsed again only when it changes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.audit import AUDIT_FILE, RunAudit, summarize_audit
from client.ledger import LEDGER_FILE, LedgerError, PrivacyLedger
from dashboard.records import JsonlTail

logger = logging.getLogger(__name__)

#: The audit fields the dashboard uses (the rest of each line -- the whole run config -- is not kept).
AUDIT_FIELDS = ("time", "unix", "site", "run_name", "run_id", "round", "event", "refused", "error",
                "epsilon_after", "delta", "lifetime_epsilon_after")


@dataclass(frozen=True)
class Budget:
    """The policy's lifetime budget (None: no policy given)."""

    epsilon: float
    delta: float
    source: str


class ProjectedTail(JsonlTail):
    """A :class:`JsonlTail` that keeps only :data:`AUDIT_FIELDS` of each line."""

    def _parse(self, line: bytes) -> dict[str, Any] | None:
        row = super()._parse(line)
        return None if row is None else {k: row[k] for k in AUDIT_FIELDS if k in row}


class SiteFolder:
    """One site's folder (``<state dir>/<site name>``).

    Args:
        path: The folder holding ``ledger.json`` and/or ``audit.jsonl``.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self.audit = ProjectedTail(self.path / AUDIT_FILE)
        self._ledger: PrivacyLedger | None = None
        self._ledger_stamp: tuple[int, int, int] | None = None
        self.ledger_error: str | None = None

    def refresh(self) -> None:
        """Read appended audit lines; parse the ledger again if it changed."""
        self.audit.refresh()
        try:
            stat = (self.path / LEDGER_FILE).stat()
        except FileNotFoundError:
            self._ledger, self._ledger_stamp = None, None
            return
        stamp = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if stamp == self._ledger_stamp:
            return
        self._ledger_stamp = stamp
        try:
            self._ledger, self.ledger_error = PrivacyLedger.open(self.path), None
        except LedgerError as err:
            self._ledger, self.ledger_error = None, str(err)

    @property
    def ledger(self) -> PrivacyLedger | None:
        """The parsed ledger (None when missing or unreadable; see :attr:`ledger_error`)."""
        return self._ledger

    def audit_summary(self) -> tuple[list[RunAudit], list[dict[str, Any]]]:
        """Per-run totals and the refusals and errors, from the audit lines read so far."""
        return summarize_audit(self.audit.rows)

    def lifetime_curve(self) -> list[tuple[float, float]]:
        """``(request number, lifetime ε after it)`` for every audit line that records it."""
        return [(i, float(e["lifetime_epsilon_after"])) for i, e in enumerate(self.audit.rows, start=1)
                if isinstance(e.get("lifetime_epsilon_after"), (int, float))]

    def version(self) -> str:
        """Changes whenever the page would."""
        return f"{self.audit.offset}.{self._ledger_stamp}"


def find_site_folders(state_dir: Path) -> list[Path]:
    """The site folders of a state dir: the dir itself if it holds a ledger or audit log, else its sub-folders."""
    if (state_dir / LEDGER_FILE).is_file() or (state_dir / AUDIT_FILE).is_file():
        return [state_dir]
    try:
        entries = sorted(os.scandir(state_dir), key=lambda e: e.name)
    except OSError:
        return []
    return [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)
            and ((Path(e.path) / LEDGER_FILE).is_file() or (Path(e.path) / AUDIT_FILE).is_file())]


class SiteState:
    """Every site folder under a state dir, with the policy budget.

    Args:
        state_dir: The node config's ``state-dir`` (or one site's folder in it).
        budget: The policy's lifetime budget, if a policy was given.
    """

    def __init__(self, state_dir: Path, *, budget: Budget | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.budget = budget
        self.sites: dict[str, SiteFolder] = {}

    def refresh(self) -> list[SiteFolder]:
        """Look for site folders (new ones appear on a site's first request) and read what changed."""
        for path in find_site_folders(self.state_dir):
            self.sites.setdefault(path.name, SiteFolder(path))
        for site in self.sites.values():
            site.refresh()
        return list(self.sites.values())

    def version(self) -> str:
        """Changes whenever the page would."""
        return "|".join(f"{name}:{site.version()}" for name, site in sorted(self.sites.items()))


def load_budget(policy: Path | None) -> Budget | None:
    """The lifetime budget of the site policy at ``policy`` (None without one).

    Raises:
        client.policy.PolicyError: The policy file is invalid (the error names the key).
    """
    if policy is None:
        return None
    from client.policy import load_policy  # noqa: PLC0415

    parsed = load_policy(policy)
    return Budget(epsilon=parsed.lifetime_epsilon, delta=parsed.lifetime_delta, source=str(policy))
