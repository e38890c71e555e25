"""Which end-of-run outputs of a run were written, and which failed and why.

Every writer of an end-of-run output (the export, the clinical report, the model
card, and in a simulation the plots, research report and Grad-CAM gallery) runs
through :meth:`RunOutputs.produce`. A writer that raises does not stop the others
and loses nothing already on disk (checkpoints, ``rounds.jsonl``, ledgers): its
failure and reason are recorded in ``outputs.json`` in the run directory, next to
the outputs that were written. The ServerApp may run in another process than the
command that started it, so the command reads this file back
(:meth:`RunOutputs.load`) to name only files that exist and to exit non-zero
naming every output that could not be written.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

OUTPUTS_FILE = "outputs.json"

#: What a writer may return: one path, several, or None (nothing to write, e.g. no checkpoint yet).
Written = Path | Sequence[Path] | None


class RunOutputs:
    """The record of a run's end-of-run outputs, kept in ``<run>/outputs.json``.

    ``entries`` maps an output's name (``"clinical report"``) to
    ``{"ok": True, "paths": [...]}`` (paths relative to the run directory) or
    ``{"ok": False, "reason": "..."}``. Producing an output again replaces its entry.
    """

    def __init__(self, run_dir: str | os.PathLike[str], entries: dict[str, dict[str, Any]] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.entries: dict[str, dict[str, Any]] = dict(entries or {})

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> RunOutputs:
        """The record as last saved in ``run_dir`` (empty when none was saved)."""
        path = Path(run_dir) / OUTPUTS_FILE
        try:
            entries = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except ValueError as err:
            logger.warning("%s is not JSON (%s); starting a new record of the run's outputs", path, err)
            entries = {}
        return cls(run_dir, entries if isinstance(entries, dict) else {})

    def produce(self, name: str, write: Callable[[], Written]) -> list[Path]:
        """Run one output's writer, record its result and save the record.

        Args:
            name: The output's name, as the command will announce it.
            write: Writes the output; returns the path(s) written (None: nothing to write).

        Returns:
            The paths written that exist (empty when the writer failed or wrote nothing).
        """
        try:
            result = write()
        except Exception as err:  # noqa: BLE001 - recorded with its reason; the other outputs still get written
            logger.error("could not write the %s of run %s: %s", name, self.run_dir, _reason(err),
                         exc_info=logger.isEnabledFor(logging.DEBUG))
            self.fail(name, _reason(err))
            return []
        paths = [result] if isinstance(result, Path) else list(result or [])
        missing = [p for p in paths if not Path(p).exists()]
        if missing:
            self.fail(name, f"its writer returned {', '.join(map(str, missing))}, which does not exist")
            return []
        self.entries[name] = {"ok": True, "paths": [self._relative(p) for p in paths]}
        self.save()
        return paths

    def skip(self, name: str, reason: str) -> None:
        """Record that output ``name`` does not apply to this run, and why (logged; not a failure)."""
        logger.info("%s of run %s skipped: %s", name, self.run_dir, reason)
        self.entries[name] = {"ok": True, "paths": [], "skipped": reason}
        self.save()

    def fail(self, name: str, reason: str) -> None:
        """Record that output ``name`` could not be written, and why."""
        self.entries[name] = {"ok": False, "reason": reason}
        self.save()

    def written(self) -> dict[str, list[Path]]:
        """Output name -> its files that exist now (outputs with nothing written are left out)."""
        out = {}
        for name, entry in self.entries.items():
            paths = [self.run_dir / p for p in entry.get("paths", []) if entry.get("ok")]
            paths = [p for p in paths if p.exists()]
            if paths:
                out[name] = paths
        return out

    def failures(self) -> dict[str, str]:
        """Output name -> why it could not be written."""
        return {name: str(e.get("reason")) for name, e in self.entries.items() if not e.get("ok")}

    def failure_message(self) -> str | None:
        """One line naming every output that failed and why (None when none failed)."""
        failed = self.failures()
        if not failed:
            return None
        listed = "; ".join(f"{name}: {reason}" for name, reason in failed.items())
        return (f"run {self.run_dir}: could not write {listed}. The run's records (checkpoints, rounds.jsonl, "
                f"ledgers) are kept; fix the cause and rewrite them with `medfed clinical-report {self.run_dir}` "
                f"(export, clinical report, model card) or `medfed report {self.run_dir}` (research report).")

    def save(self) -> Path:
        """Write ``outputs.json`` atomically."""
        path = self.run_dir / OUTPUTS_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.entries, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
        return path

    def _relative(self, path: Path) -> str:
        try:
            return str(Path(path).resolve().relative_to(self.run_dir.resolve()))
        except ValueError:
            return str(Path(path).resolve())


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else 'no message'}"
