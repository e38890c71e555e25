"""The site's privacy ledger: the epsilon it has spent in every run, on its own disk.

One JSON file (``<state dir>/ledger.json``) maps each run (by run name, which stays
the same when a run is resumed) to the epsilon and delta its accountant reached,
the rounds trained and when. Before a round the site *reserves* the epsilon the
run will have after it; after training it *commits* the accountant's real value.
A crash mid-round therefore over-counts (the reservation stays), never under-counts.

Lifetime spending is basic composition over runs: the sum of every run's epsilon,
and the sum of the deltas of every run admitted to train with DP (whatever its
epsilon: an accountant can report epsilon <= 0 at a large delta, and the delta is
still spent). An accountant's epsilon below 0 is recorded as 0 ((eps, delta)-DP with
eps < 0 implies (0, delta)-DP).

Every write goes to a temporary file that replaces the ledger atomically, and only
after the new state has been checked to load back, so a bad value never reaches the
disk; a crash never leaves half a ledger. A ledger that cannot be read is an error
naming the file, never silently reset or overwritten (it is the record of privacy
already spent): the site refuses to train until its operator restores it.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

LEDGER_FILE = "ledger.json"
LEDGER_FORMAT = "medfed-ledger-v1"
#: Relative slack on the lifetime budget (same as the per-run budget check).
BUDGET_SLACK = 1e-6
#: Run names a ledger (and the site's disk) accepts: they become folder names.
RUN_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class LedgerError(RuntimeError):
    """The ledger file is unreadable or malformed (it is never reset silently)."""


def check_run_name(name: str) -> str:
    """Return ``name`` if it can key the ledger and name a folder, else raise ValueError."""
    if not RUN_NAME_PATTERN.match(name) or name in (".", ".."):
        raise ValueError(f"run name {name!r} must match {RUN_NAME_PATTERN.pattern}")
    return name


@dataclass
class RunEntry:
    """What one run has spent at this site.

    Attributes:
        epsilon: Committed epsilon of the run's accountant (after its last finished round).
        reserved: Epsilon reserved for a round in progress (0 when none).
        delta: The run's delta (``privacy.target_delta``); counted once the run trains with DP.
        dp: Whether the run trains with differential privacy.
        rounds: Rounds trained (committed).
        last_round: The coordinator's number of the last committed round.
        run_ids: Flower run ids seen for this run (a resumed run has several).
        started: Unix time of the first reservation.
        updated: Unix time of the last change.
    """

    epsilon: float = 0.0
    reserved: float = 0.0
    delta: float = 0.0
    dp: bool = True
    rounds: int = 0
    last_round: int = 0
    run_ids: list[int] = field(default_factory=list)
    started: float = 0.0
    updated: float = 0.0

    @property
    def charged_epsilon(self) -> float:
        """Epsilon counted against the lifetime budget: committed or reserved, whichever is larger."""
        return max(self.epsilon, self.reserved) if self.dp else 0.0

    @property
    def charged_delta(self) -> float:
        """Delta counted against the lifetime budget: every DP run's, whatever its epsilon."""
        return self.delta if self.dp else 0.0

    def problems(self) -> list[str]:
        """What makes this entry unfit for the ledger (empty when it is fine)."""
        found = []
        for name in ("epsilon", "reserved"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
                found.append(f"{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.delta, (int, float)) or isinstance(self.delta, bool) or not 0 <= self.delta < 1:
            found.append(f"delta must be in [0, 1), got {self.delta!r}")
        if not isinstance(self.dp, bool):
            found.append(f"dp must be true or false, got {self.dp!r}")
        for name in ("rounds", "last_round"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                found.append(f"{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.run_ids, list) or not all(isinstance(i, int) for i in self.run_ids):
            found.append(f"run_ids must be a list of integers, got {self.run_ids!r}")
        return found


class PrivacyLedger:
    """Epsilon and delta spent per run at one site, persisted in ``<state_dir>/ledger.json``.

    Args:
        path: The ledger file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.runs: dict[str, RunEntry] = {}

    @classmethod
    def open(cls, state_dir: str | os.PathLike[str]) -> PrivacyLedger:
        """Load the ledger of the site whose disk is ``state_dir`` (empty when new).

        Raises:
            LedgerError: The file exists but does not load; its message names the file
                and what to do. The file is left exactly as it is.
        """
        ledger = cls(Path(state_dir) / LEDGER_FILE)
        if ledger.path.exists():
            try:
                ledger.load_state_dict(json.loads(ledger.path.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
                raise LedgerError(
                    f"privacy ledger {ledger.path} is unreadable ({err}). It records the privacy budget "
                    "this site has spent, so medfed never resets or overwrites it: the site refuses to "
                    "train until the file is restored from backup or repaired by hand (`medfed site "
                    "audit` and audit.jsonl show what each run spent)"
                ) from err
        return ledger

    # ------------------------------------------------------------------ totals
    def spent_epsilon(self, *, exclude: str | None = None) -> float:
        """Lifetime epsilon charged over all runs (optionally without run ``exclude``)."""
        return math.fsum(e.charged_epsilon for name, e in self.runs.items() if name != exclude)

    def spent_delta(self, *, exclude: str | None = None) -> float:
        """Lifetime delta charged over all runs (optionally without run ``exclude``)."""
        return math.fsum(e.charged_delta for name, e in self.runs.items() if name != exclude)

    def lifetime_after(self, run: str, *, run_epsilon: float, delta: float) -> tuple[float, float]:
        """Lifetime (epsilon, delta) if DP run ``run``'s accountant reached ``run_epsilon`` (its delta counts always)."""
        eps = self.spent_epsilon(exclude=run) + _nonnegative(run_epsilon)
        dlt = self.spent_delta(exclude=run) + delta
        return eps, dlt

    @staticmethod
    def within(value: float, budget: float) -> bool:
        """``value <= budget`` up to :data:`BUDGET_SLACK` (a round that reaches the budget exactly is allowed)."""
        return value <= budget * (1.0 + BUDGET_SLACK)

    # ------------------------------------------------------------------ changes
    def _entry(self, run: str, *, run_id: int | None, dp: bool, delta: float) -> RunEntry:
        entry = self.runs.setdefault(check_run_name(run), RunEntry(started=time.time()))
        entry.dp, entry.delta = dp, float(delta) if dp else 0.0
        if run_id is not None and int(run_id) not in entry.run_ids:
            entry.run_ids.append(int(run_id))
        entry.updated = time.time()
        return entry

    def reserve(self, run: str, *, epsilon: float, delta: float, dp: bool = True, run_id: int | None = None) -> None:
        """Record, before training, the epsilon run ``run`` will have after this round; then save."""
        entry = self._entry(run, run_id=run_id, dp=dp, delta=delta)
        entry.reserved = _nonnegative(epsilon) if dp else 0.0
        self.save()

    def commit(
        self, run: str, *, epsilon: float, delta: float, server_round: int, dp: bool = True,
        run_id: int | None = None,
    ) -> None:
        """Record, after training, the run's accountant epsilon and one more round; then save."""
        entry = self._entry(run, run_id=run_id, dp=dp, delta=delta)
        entry.epsilon = _nonnegative(epsilon) if dp else 0.0
        entry.reserved = 0.0
        entry.rounds += 1
        entry.last_round = int(server_round)
        self.save()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state: ``format`` and ``runs`` (run name -> entry fields)."""
        return {"format": LEDGER_FORMAT, "runs": {name: asdict(e) for name, e in sorted(self.runs.items())}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Raises:
            ValueError: Unknown format or malformed entries.
        """
        if state.get("format") != LEDGER_FORMAT:
            raise ValueError(f"unknown ledger format {state.get('format')!r} (expected {LEDGER_FORMAT!r})")
        runs = {}
        for name, values in dict(state["runs"]).items():
            entry = RunEntry(**dict(values))
            problems = entry.problems()
            if problems:
                raise ValueError(f"run {name!r}: {'; '.join(problems)}")
            runs[str(name)] = entry
        self.runs = runs

    def save(self) -> None:
        """Write the ledger atomically (temporary file + rename, fsynced), once it is known to load back.

        Raises:
            LedgerError: The state would not load back (e.g. a NaN epsilon); nothing is written.
        """
        self._check_loads_back()
        text = json.dumps(self.state_dict(), indent=1, allow_nan=False)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".ledger-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _check_loads_back(self) -> None:
        """Raise :class:`LedgerError` unless the current state survives a JSON round trip."""
        try:
            PrivacyLedger(self.path).load_state_dict(json.loads(json.dumps(self.state_dict(), allow_nan=False)))
        except (ValueError, TypeError, KeyError) as err:
            raise LedgerError(
                f"refusing to write privacy ledger {self.path}: the new state would not load back ({err}); "
                "the file on disk is unchanged"
            ) from err


def _nonnegative(epsilon: float) -> float:
    """An accountant's epsilon as recorded: below 0 is 0 ((eps, delta)-DP with eps < 0 is (0, delta)-DP).

    NaN stays NaN (and is refused when saving).
    """
    value = float(epsilon)
    return 0.0 if value < 0 else value
