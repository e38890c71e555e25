"""Follow run directories while they are written: only appended bytes, only whole lines.

A run appends one JSON line per round to ``rounds.jsonl`` (and per site to
``sites.jsonl`` and ``privacy.jsonl``) and writes ``summary.json`` at the end
(``server/run_dir.py``). :class:`JsonlTail` keeps the byte offset it has read up to,
so a look at a run reads only what was appended since the last look, never the
whole file again; a line still being written waits for the next look, and a line
that is not JSON is skipped. A file that shrinks or is replaced (a resumed run
drops its unfinished rounds) is read again from its start.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from server.run_dir import CONFIG_FILE, PRIVACY_FILE, ROUNDS_FILE, SITES_FILE, SUMMARY_FILE

logger = logging.getLogger(__name__)

#: Run states shown on the runs list.
STATES = ("running", "stopped", "finished", "failed")
#: Headline metrics a run may declare in its summary (``headline_metric``).
HEADLINES = ("auc", "dice", "accuracy")
#: Seconds of silence beyond ``server.round_timeout`` after which an unfinished run counts as stopped.
STALE_MARGIN = 60.0
#: A sweep folder holds this file (``simulations/sweep_report.py``).
COMPARISON_CSV = "comparison.csv"
#: How deep below a root run and sweep folders are looked for.
MAX_DEPTH = 4
#: Folders inside a run that never hold runs.
_NOT_RUNS = frozenset({"checkpoints", "clinical", "export", "plots", "site-state", "tracking", "__pycache__"})


class JsonlTail:
    """The rows of one JSON-lines file, read incrementally.

    Args:
        path: The file (it may not exist yet).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        self.skipped = 0  # lines that were not JSON objects
        self._file: tuple[int, int] | None = None
        self._offset = 0
        self._lock = threading.Lock()

    def refresh(self) -> list[dict[str, Any]]:
        """Read the whole lines appended since the last call; returns the new rows."""
        with self._lock:
            try:
                stat = self.path.stat()
            except FileNotFoundError:
                return []
            identity = (stat.st_dev, stat.st_ino)
            if identity != self._file or stat.st_size < self._offset:
                self._file, self._offset, self.rows, self.skipped = identity, 0, [], 0
            if stat.st_size == self._offset:
                return []
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read(stat.st_size - self._offset)
            complete = chunk[: chunk.rfind(b"\n") + 1]
            self._offset += len(complete)
            new = [row for row in map(self._parse, complete.splitlines()) if row is not None]
            self.rows.extend(new)
            return new

    @property
    def offset(self) -> int:
        """Bytes consumed so far (whole lines only)."""
        return self._offset

    def _parse(self, line: bytes) -> dict[str, Any] | None:
        if not line.strip():
            return None
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            self.skipped += 1
            logger.warning("%s: skipping a line that is not a JSON object: %.80r", self.path, line)
            return None
        return row


class CachedDocument:
    """A whole JSON or YAML file, parsed again only when its size or mtime changes.

    Args:
        path: The file.
        kind: ``"json"`` or ``"yaml"``.
    """

    def __init__(self, path: Path, *, kind: str) -> None:
        self.path = Path(path)
        self.kind = kind
        self._stamp: tuple[int, int, int] | None = None
        self._value: dict[str, Any] | None = None

    def get(self) -> dict[str, Any] | None:
        """The parsed mapping, or None when the file is missing or unreadable."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._value = None, None
            return None
        stamp = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if stamp != self._stamp:
            self._stamp, self._value = stamp, self._load()
        return self._value

    def _load(self) -> dict[str, Any] | None:
        try:
            text = self.path.read_text(encoding="utf-8")
            value = json.loads(text) if self.kind == "json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as err:
            logger.warning("%s: not readable yet (%s)", self.path, err)
            return None
        return value if isinstance(value, dict) else None


def number(value: Any) -> float | None:
    """``value`` as a finite float, else None (the records write NaN as null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


class RunRecords:
    """One run directory, followed incrementally.

    Args:
        path: The run directory.
        key: Its name in the dashboard's URLs.
    """

    def __init__(self, path: Path, *, key: str) -> None:
        self.path = Path(path)
        self.key = key
        self.rounds = JsonlTail(self.path / ROUNDS_FILE)
        self.sites = JsonlTail(self.path / SITES_FILE)
        self.privacy = JsonlTail(self.path / PRIVACY_FILE)
        self._config = CachedDocument(self.path / CONFIG_FILE, kind="yaml")
        self._summary = CachedDocument(self.path / SUMMARY_FILE, kind="json")

    def refresh(self) -> int:
        """Read what was appended to the run's records; returns the number of new round rows."""
        self.sites.refresh()
        self.privacy.refresh()
        return len(self.rounds.refresh())

    def config(self) -> dict[str, Any]:
        """The run's ``config.yaml`` (empty while unreadable)."""
        return self._config.get() or {}

    def summary(self) -> dict[str, Any] | None:
        """``summary.json``, or None while the run has not finished."""
        return self._summary.get()

    def setting(self, dotted: str, default: Any = None) -> Any:
        """A config value by its dotted key (``privacy.target_epsilon``)."""
        section, _, key = dotted.partition(".")
        return (self.config().get(section) or {}).get(key, default)

    def headline_metric(self) -> str:
        """``auc`` unless the summary names another (``dice`` for segmentation) or only Dice is recorded."""
        named = (self.summary() or {}).get("headline_metric")
        if named in HEADLINES:
            return str(named)
        evaluated = [row.get("global") or {} for row in self.rounds.rows]
        if any("dice" in g for g in evaluated) and not any("auc" in g for g in evaluated):
            return "dice"
        return "auc"

    def headline(self) -> float | None:
        """The run's headline metric: final global value (of the summary when finished)."""
        metric = self.headline_metric()
        final = (self.summary() or {}).get("final_global") or {}
        if number(final.get(metric)) is not None:
            return number(final[metric])
        for row in reversed(self.rounds.rows):
            value = number((row.get("global") or {}).get(metric))
            if value is not None:
                return value
        return None

    def state(self, *, now: float | None = None) -> str:
        """``finished``, ``failed`` (no round aggregated, or moved aside by a sweep), ``running`` or ``stopped``.

        An unfinished run is *running* while its records changed within
        ``server.round_timeout`` (+ :data:`STALE_MARGIN`) seconds, else *stopped*
        (interrupted; ``medfed simulate --resume`` continues it).
        """
        if ".failed-" in self.path.name:
            return "failed"
        summary = self.summary()
        if summary is not None:
            return "failed" if summary.get("rounds_completed") and not summary.get("rounds_aggregated") else "finished"
        timeout = number(self.setting("server.round_timeout")) or 3600.0
        return "running" if (now or time.time()) - self.last_change() <= timeout + STALE_MARGIN else "stopped"

    def last_change(self) -> float:
        """Unix time of the newest write to the run's records."""
        stamps = [0.0]
        for name in (CONFIG_FILE, ROUNDS_FILE, SITES_FILE, PRIVACY_FILE):
            try:
                stamps.append((self.path / name).stat().st_mtime)
            except FileNotFoundError:
                continue
        return max(stamps)

    def epsilon(self) -> dict[str, float]:
        """ε spent so far by each site (its newest privacy line)."""
        spent: dict[str, float] = {}
        for row in self.privacy.rows:
            value = number(row.get("epsilon"))
            if value is not None and isinstance(row.get("site"), str):
                spent[row["site"]] = value
        return spent

    def round_in_progress(self) -> dict[str, Any] | None:
        """Sites that replied in the round after the last recorded one (from ``sites.jsonl``), if any."""
        done = max((int(r.get("round", 0)) for r in self.rounds.rows), default=0)
        pending = [r for r in self.sites.rows if isinstance(r.get("round"), int) and r["round"] > done]
        if not pending:
            return None
        rnd = max(r["round"] for r in pending)
        phases: dict[str, list[str]] = {}
        for row in pending:
            if row["round"] == rnd:
                phases.setdefault(str(row.get("phase", "?")), []).append(str(row.get("site", "?")))
        return {"round": rnd, "phases": phases}

    def version(self) -> str:
        """Changes whenever something shown on the run page changes."""
        folders = []  # reports and plots appear after the summary: a new file changes its folder's mtime
        for folder in (self.path, self.path / "plots", self.path / "clinical"):
            try:
                folders.append(str(folder.stat().st_mtime_ns))
            except FileNotFoundError:
                folders.append("-")
        return f"{len(self.rounds.rows)}.{len(self.sites.rows)}.{len(self.privacy.rows)}.{self.state()}." + \
            ".".join(folders)


@dataclass
class Sweep:
    """A sweep folder (``comparison.csv``, ``plots/``, ``runs/``)."""

    path: Path
    key: str
    runs: list[str] = field(default_factory=list)  # keys of its runs


class RunIndex:
    """The runs and sweeps found under one or more root folders, looked for again every few seconds.

    Args:
        roots: Folders holding run directories (a root may itself be a run or a sweep).
        rescan_seconds: Minimum time between two searches of the roots.
    """

    def __init__(self, roots: Iterable[Path], *, rescan_seconds: float = 2.0) -> None:
        self.roots = [Path(r).resolve() for r in roots]
        self.rescan_seconds = rescan_seconds
        self.runs: dict[str, RunRecords] = {}
        self.sweeps: dict[str, Sweep] = {}
        self._scanned = -math.inf
        self._lock = threading.Lock()

    def scan(self, *, force: bool = False) -> None:
        """Look for new run and sweep folders (at most every ``rescan_seconds``)."""
        with self._lock:
            if not force and time.monotonic() - self._scanned < self.rescan_seconds:
                return
            self._scanned = time.monotonic()
            runs: dict[str, Path] = {}
            sweeps: dict[str, Path] = {}
            unique = len({r.name for r in self.roots}) == len(self.roots)
            for index, root in enumerate(self.roots):  # several roots: keys start with the root's name
                prefix = "" if len(self.roots) == 1 else (f"{root.name}/" if unique else f"{index}/")
                for kind, path in _find(root, depth=0):
                    rel = path.relative_to(root).as_posix() if path != root else root.name
                    (runs if kind == "run" else sweeps)[prefix + rel] = path
            self.runs = {key: self.runs.get(key) or RunRecords(path, key=key) for key, path in sorted(runs.items())}
            self.sweeps = {
                key: Sweep(path, key, [k for k, p in runs.items() if p.parent == path / "runs"])
                for key, path in sorted(sweeps.items())
            }

    def run(self, key: str) -> RunRecords | None:
        """The run called ``key`` (refreshed), or None."""
        self.scan()
        found = self.runs.get(key)
        if found is not None:
            found.refresh()
        return found

    def all_runs(self) -> list[RunRecords]:
        """Every run found, refreshed, newest change first."""
        self.scan()
        for run in self.runs.values():
            run.refresh()
        return sorted(self.runs.values(), key=lambda r: r.last_change(), reverse=True)


def _find(folder: Path, *, depth: int) -> Iterable[tuple[str, Path]]:
    """``("run", path)`` and ``("sweep", path)`` under ``folder`` (symbolic links are not followed)."""
    if (folder / CONFIG_FILE).is_file():
        yield "run", folder
        return
    if (folder / COMPARISON_CSV).is_file():
        yield "sweep", folder
    if depth >= MAX_DEPTH:
        return
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(".") or entry.name in _NOT_RUNS or not entry.is_dir(follow_symlinks=False):
            continue
        yield from _find(Path(entry.path), depth=depth + 1)
