"""The site's audit log: one JSON line per request it handled, kept on its own disk.

``<state dir>/audit.jsonl`` records, for every train or evaluate request: the time,
the run (Flower run id and run name) and round, what was requested (every run-config
key and value, and the message's config record), what was sent back (array names,
shapes and dtypes, metric names and values, the refusal reason), the epsilon before
and after (of the run and over the site's lifetime), and refusals and errors with
their reasons. The log stays at the site; it may name local paths (it records the
run config), which is why none of it is ever sent.

:func:`summarize_audit` and :func:`render_audit` turn it into the tables of
``medfed site audit``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from rich.console import Group
from rich.table import Table

logger = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def describe_config(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """Config keys and values as JSON-ready data (bytes shown by size only)."""
    return {str(k): _jsonable(v) for k, v in (record or {}).items()}


def describe_sent(content: RecordDict | None) -> dict[str, Any]:
    """What a reply carries: array names/shapes/dtypes, metric values, site name, refusal."""
    sent: dict[str, Any] = {"arrays": [], "metrics": {}}
    for key, record in (content or RecordDict()).items():
        if isinstance(record, ArrayRecord):
            sent["arrays"] = [
                {"name": name, "shape": list(arr.shape), "dtype": str(arr.dtype)} for name, arr in record.items()
            ]
        elif isinstance(record, MetricRecord):
            sent["metrics"] = {k: _jsonable(v) for k, v in record.items()}
        elif isinstance(record, ConfigRecord):
            sent[key] = describe_config(record)
    return sent


class AuditLog:
    """Append-only JSON-lines audit log in a site's state directory.

    Args:
        state_dir: The site's disk (``audit.jsonl`` is written there).
        durable: ``fsync`` every entry, so that it survives a power cut (a real site). A
            simulated site's log is only flushed to the operating system: the fsync cost
            8 ms a message on the dev box, a third of a secure-aggregation stage.
    """

    def __init__(self, state_dir: str | os.PathLike[str], *, durable: bool = True) -> None:
        self.path = Path(state_dir) / AUDIT_FILE
        self.durable = durable

    def append(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """Write one entry (``time``/``unix`` are added) and flush it (to disk when durable); returns its data."""
        now = time.time()
        line = {"time": dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat(), "unix": now, **entry}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line, default=str) + "\n")
            handle.flush()
            if self.durable:
                os.fsync(handle.fileno())
        return line


def read_audit(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All entries of an audit log; a torn last line (crash while writing) is skipped with a warning.

    Raises:
        ValueError: A line other than the last is not JSON (naming file and line).
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    entries = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            entries.append(json.loads(text))
        except ValueError as err:
            if number == len(lines):
                logger.warning("%s: last line %d is incomplete and skipped", path, number)
                continue
            raise ValueError(f"{path}: line {number} is not JSON ({err})") from None
    return entries


@dataclass
class RunAudit:
    """One site's participation in one run, summed from its audit entries."""

    site: str
    run_name: str
    run_ids: set[int] = field(default_factory=set)
    rounds_trained: int = 0
    rounds_evaluated: int = 0
    refusals: int = 0
    errors: int = 0
    epsilon: float | None = None
    delta: float | None = None
    lifetime_epsilon: float | None = None
    first: str = ""
    last: str = ""


def summarize_audit(entries: Iterable[Mapping[str, Any]]) -> tuple[list[RunAudit], list[dict[str, Any]]]:
    """Per (site, run) totals, and the refusals and errors one by one (in log order)."""
    runs: dict[tuple[str, str], RunAudit] = {}
    incidents: list[dict[str, Any]] = []
    for e in entries:
        key = (str(e.get("site", "?")), str(e.get("run_name", "?")))
        run = runs.setdefault(key, RunAudit(site=key[0], run_name=key[1], first=str(e.get("time", ""))))
        run.last = str(e.get("time", ""))
        if e.get("run_id") is not None:
            run.run_ids.add(int(e["run_id"]))
        if e.get("refused"):
            run.refusals += 1
            incidents.append({**_where(e), "kind": "refused", "reason": e["refused"]})
        elif e.get("event") == "error":
            run.errors += 1
            incidents.append({**_where(e), "kind": "error", "reason": e.get("error", "")})
        elif e.get("event") == "train":
            run.rounds_trained += 1
        elif e.get("event") == "evaluate":
            run.rounds_evaluated += 1
        if e.get("epsilon_after") is not None:
            run.epsilon = max(run.epsilon or 0.0, float(e["epsilon_after"]))
        if e.get("delta") is not None:
            run.delta = float(e["delta"])
        if e.get("lifetime_epsilon_after") is not None:
            run.lifetime_epsilon = float(e["lifetime_epsilon_after"])
    return list(runs.values()), incidents


def _where(e: Mapping[str, Any]) -> dict[str, Any]:
    return {"time": e.get("time", ""), "site": e.get("site", "?"), "run_name": e.get("run_name", "?"),
            "round": e.get("round"), "event": e.get("event", "?")}


def _eps(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def render_audit(runs: list[RunAudit], incidents: list[dict[str, Any]], *, max_incidents: int = 50) -> Group:
    """Rich tables: one row per site and run, then refusals and errors."""
    table = Table(title="Site audit: runs")
    for column in ("site", "run", "trained", "evaluated", "refused", "errors", "ε run", "δ", "ε lifetime", "last"):
        table.add_column(column, justify="right" if column in ("trained", "evaluated", "refused", "errors") else "left")
    for r in runs:
        table.add_row(r.site, r.run_name, str(r.rounds_trained), str(r.rounds_evaluated), str(r.refusals),
                      str(r.errors), _eps(r.epsilon), "-" if r.delta is None else f"{r.delta:g}",
                      _eps(r.lifetime_epsilon), r.last[:19])
    parts: list[Any] = [table]
    if incidents:
        shown = incidents[-max_incidents:]
        more = f", last {len(shown)} shown" if len(shown) < len(incidents) else ""
        title = f"Refusals and errors ({len(incidents)}{more})"
        detail = Table(title=title)
        for column in ("time", "site", "run", "round", "event", "kind", "reason"):
            detail.add_column(column, overflow="fold")
        for i in shown:
            detail.add_row(str(i["time"])[:19], str(i["site"]), str(i["run_name"]), str(i["round"]),
                           str(i["event"]), str(i["kind"]), str(i["reason"]))
        parts.append(detail)
    return Group(*parts)
