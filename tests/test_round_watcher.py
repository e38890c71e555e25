"""The harness' RoundWatcher: each round reported once, reading only what was appended."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from simulations.harness import RoundWatcher


def _line(round_number: int, **extra: object) -> str:
    return json.dumps({"round": round_number, **extra}) + "\n"


def _watch(path: Path) -> tuple[RoundWatcher, list[int]]:
    seen: list[int] = []
    return RoundWatcher(path, lambda row: seen.append(row["round"]), interval=3600.0), seen


def test_reports_appended_rounds_once_and_waits_for_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "rounds.jsonl"
    watcher, seen = _watch(path)
    with watcher:
        watcher.poll()  # no file yet
        path.write_text(_line(0) + _line(1))
        watcher.poll()
        assert seen == [0, 1]
        with open(path, "a") as handle:
            handle.write(_line(2) + _line(3)[:7])  # round 3 half written
        watcher.poll()
        assert seen == [0, 1, 2]
        with open(path, "a") as handle:
            handle.write(_line(3)[7:])
        watcher.poll()
        assert seen == [0, 1, 2, 3]
        watcher.poll()
        assert seen == [0, 1, 2, 3]
    assert seen == [0, 1, 2, 3]  # the final poll on exit adds nothing twice


def test_reads_only_the_bytes_appended_since_the_last_poll(tmp_path: Path, caplog) -> None:
    path = tmp_path / "rounds.jsonl"
    first = _line(0, sites={"site-1": "x" * 5000})
    path.write_text("")
    watcher, seen = _watch(path)
    with watcher:
        with open(path, "a") as handle:
            handle.write(first)
        watcher.poll()
        # scribble over what was consumed, in place (same file, same size): a watcher
        # that re-read the file would now hit a line that is not JSON
        with open(path, "r+b") as handle:
            handle.write(b"#" * (len(first) - 1))
        with open(path, "a") as handle:
            handle.write(_line(1))
        with caplog.at_level(logging.WARNING, logger="simulations.harness"):
            watcher.poll()
    assert seen == [0, 1]
    assert not caplog.records


def test_a_resumed_run_reports_only_rounds_after_its_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "rounds.jsonl"
    path.write_text("".join(_line(r) for r in range(6)))  # round 5 recorded, never checkpointed
    watcher, seen = _watch(path)
    with watcher:
        watcher.poll()
        assert seen == []  # history of the run being resumed
        replacement = tmp_path / "rounds.tmp"  # the run directory drops the unfinished round atomically
        replacement.write_text("".join(_line(r) for r in range(5)))
        os.replace(replacement, path)
        watcher.poll()
        assert seen == []
        with open(path, "a") as handle:
            handle.write(_line(5) + _line(6))
        watcher.poll()
    assert seen == [5, 6]


def test_a_line_that_is_not_json_is_skipped_with_a_warning(tmp_path: Path, caplog) -> None:
    path = tmp_path / "rounds.jsonl"
    watcher, seen = _watch(path)
    with watcher:
        path.write_text(_line(0) + "{not json\n" + _line(1))
        with caplog.at_level(logging.WARNING, logger="simulations.harness"):
            watcher.poll()
    assert seen == [0, 1]
    assert "rounds.jsonl: skipping a line that is not JSON" in caplog.text
