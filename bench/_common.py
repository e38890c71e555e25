"""Shared helpers of the bench scripts: machine description, statistics, memory of a process tree.

Nothing here imports medfed, torch or flwr, so the helpers cost nothing to import.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def package_versions(names: Iterable[str] = ("torch", "flwr", "ray", "opacus", "monai", "numpy")) -> dict[str, str]:
    """Installed versions of the packages that matter for the numbers."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "-"
    return versions


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return float("nan")


def machine() -> dict[str, Any]:
    """CPU, cores, memory, load, Python and package versions of this machine, now."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(_memory_gb(), 1),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        **package_versions(),
    }


def loadavg() -> float:
    """The 1-minute load average (other users of a shared machine show up here)."""
    return round(os.getloadavg()[0], 2)


@dataclass
class Stats:
    """Median and range of repeated measurements."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def low(self) -> float:
        return min(self.samples)

    @property
    def high(self) -> float:
        return max(self.samples)

    def fmt(self, unit: str = "s", digits: int = 2) -> str:
        """``median unit (min–max, n=k)``."""
        return f"{self.median:.{digits}f} {unit} ({self.low:.{digits}f}–{self.high:.{digits}f}, n={len(self.samples)})"

    def as_dict(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.low, "max": self.high, "samples": self.samples}


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> Stats:
    """Per-repeat ratios (repeats paired in the order they ran, so both saw the same load)."""
    return Stats([a / b for a, b in zip(numerator, denominator)])


# ----------------------------------------------------------------------------- memory


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return children


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (Ray's raylet, GCS and worker processes included)."""
    children = _children_map()
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _kb(path: str, key: str) -> int:
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_memory(root: int) -> tuple[int, int, int]:
    """``(rss_bytes, pss_bytes, processes)`` summed over the process tree of ``root``.

    RSS counts pages shared between processes (libraries, Ray's object store) once
    per process, so it overstates; PSS splits shared pages between their users and
    adds up to the memory really used.
    """
    rss = pss = 0
    pids = process_tree(root)
    for pid in pids:
        rss += _kb(f"/proc/{pid}/status", "VmRSS:")
        pss += _kb(f"/proc/{pid}/smaps_rollup", "Pss:")
    return rss * 1024, pss * 1024, len(pids)


@dataclass
class TreeMemorySampler:
    """Samples the memory of a process tree in a background thread; keeps the peaks."""

    root: int
    interval: float = 0.25
    peak_rss: int = 0
    peak_pss: int = 0
    peak_processes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _sample(self) -> None:
        rss, pss, count = tree_memory(self.root)
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_processes = max(self.peak_processes, count)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> TreeMemorySampler:
        self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._sample()


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) so it measures from now; False where Linux refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_now() -> int:
    """This process's resident set, bytes."""
    return _kb("/proc/self/status", "VmRSS:") * 1024


def peak_rss() -> int:
    """This process's peak resident set since start or :func:`reset_peak_rss`, bytes."""
    return _kb("/proc/self/status", "VmHWM:") * 1024


def timed(fn, *args, **kwargs) -> tuple[float, Any]:
    """``(seconds, result)`` of one call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def write_json(path: str | os.PathLike[str] | None, payload: dict[str, Any]) -> None:
    """Write the results as JSON (to ``path``, or nowhere when None)."""
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, default=float) + "\n")


def say(*parts: object) -> None:
    """Print a line of bench output at once (bench scripts report on stdout)."""
    print(*parts, flush=True)
    sys.stdout.flush()


def run_fresh_python(args: Sequence[str], *, repo: Path, env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run ``python ARGS`` in a fresh interpreter with ``repo`` first on the import path, from ``repo``.

    Returns:
        Wall seconds, CPU seconds (user + system of the child: hardly affected by
        other load) and its stdout.

    Raises:
        SystemExit: The command failed (the end of its stderr is shown).
    """
    path = os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": path}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=repo, env=full_env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"python {' '.join(args)[:200]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, done.stdout
