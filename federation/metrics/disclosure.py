"""Disclosure control of a site's evaluation numbers: no count of fewer than k patients leaves.

:func:`release_metrics` filters what :func:`federation.metrics.clinical.clinical_metrics`
(plus ``num-examples``/``accuracy``) computed, before the site sends it. The coordinator
chooses the model weights and the threshold, so it chooses which patients fall in a
"predicted positive" column or a reliability bin: every count of such a set is a count
of an arbitrary, attacker-defined group. The rule, with ``k = max(5, min_group_size)``:

* **a count and its complement**: a count ``c`` of a set of ``m`` patients (positives
  in a subgroup, true positives, positives in a reliability bin, positives above a ROC
  grid point, correct predictions) is released only when ``k <= c <= m - k``: a set of
  10 in which 0 or 10 are positive says as much about each member as a set of 1;
* **a confusion table** (site, or subgroup via its rates) is released only when each
  non-empty prediction column holds at least k positives and k negatives (an empty
  column says nothing about anyone); a suppressed table takes every rate derived from
  it (sensitivity, specificity, PPV, NPV, accuracy and their intervals, which give
  back their denominators) with it;
* **label counts**: ``n-pos`` (and everything that needs it: AUC, ROC grid, bin
  rates) only when the site has at least k positives and k negatives;
* **partitions** (reliability bins, subgroups of one attribute): what the released
  parts leave over, derived from the site's totals, must be 0 or at least k, else
  the smallest released part is suppressed too (secondary suppression).

What this cannot stop (the README says so): a coordinator that crafts weights can
still learn aggregates over sets of at least k patients of its choosing, and compare
evaluations of different weights; the site bounds that with a per-run evaluation
budget, a cache of identical requests and clinical settings fixed per run
(``client/evaluation.py``). The outbound guard (``client/clinical_guard.py``) checks
the same floors again, independently of this code.

A real site applies this to every evaluation reply. A simulated site does not (its
"patients" are the coordinator's own data, and research needs the exact numbers at
any size); it keeps the subgroup suppression of :mod:`federation.metrics.clinical`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

#: Never fewer than this many patients behind a released count, whatever the settings.
COUNT_FLOOR = 5
_OP_RATES = ("op-accuracy", "sensitivity", "specificity", "ppv", "npv")
_GROUP_TABLE_RATES = ("op-accuracy", "sensitivity", "specificity")
_SUFFIXES = ("", "-lo", "-hi")
_CELLS = ("tp", "fp", "fn", "tn")
_GROUP_N = re.compile(r"^grp-(?P<group>[a-z]+-[a-z0-9]+)-n$")
_BIN_N = re.compile(r"^rel-bin-(?P<bin>\d{2})-n$")

Cells = tuple[int, int, int, int]  # tp, fp, fn, tn


def count_ok(count: float, total: float, k: int) -> bool:
    """Whether ``count`` of a set of ``total`` may be released: ``k <= count <= total - k``."""
    return math.isfinite(count) and math.isfinite(total) and k <= count <= total - k


def table_ok(cells: Cells, k: int) -> bool:
    """Whether a confusion table (tp, fp, fn, tn) may be released: each non-empty column has >= k of each label."""
    tp, fp, fn, tn = cells
    return all(a + b == 0 or (a >= k and b >= k) for a, b in ((tp, fp), (fn, tn)))


def _finite(metrics: Mapping[str, float], name: str) -> float:
    value = metrics.get(name, math.nan)
    return float(value) if isinstance(value, (int, float)) else math.nan


def _count(value: float) -> int:
    """A count given back by ``rate x denominator`` (-1 when the rate is missing)."""
    return round(value) if math.isfinite(value) else -1


def _drop(out: dict[str, float], prefix: str, names: tuple[str, ...], suffixes: tuple[str, ...] = _SUFFIXES) -> None:
    for name in names:
        for suffix in suffixes:
            out.pop(f"{prefix}{name}{suffix}", None)


def _secondary(parts: dict[str, tuple[int, int]], *, total: int, inside: int, k: int) -> list[str]:
    """Parts ``{name: (size, count)}`` that stay released so that the rest's count is 0 or safe.

    ``inside`` is the count over all ``total`` samples; the rest (``total`` minus the
    released parts' sizes) must be empty or have ``count_ok(rest_count, rest_size)``.
    """
    released = sorted(parts, key=lambda name: (parts[name][0], name))
    while released:
        rest_n = total - sum(parts[name][0] for name in released)
        rest_c = inside - sum(parts[name][1] for name in released)
        if rest_n == 0 or count_ok(rest_c, rest_n, k):
            break
        released.pop(0)  # the smallest released part
    return released


def _released_sizes(sizes: dict[str, int], *, total: int, k: int) -> list[str]:
    """Partition parts whose sizes may be sent: 0 or >= k, and a hidden rest of 0 or >= k."""
    released = [name for name, size in sizes.items() if size == 0 or size >= k]
    while True:
        hidden = total - sum(sizes[name] for name in released)
        nonzero = [name for name in released if sizes[name] > 0]
        if hidden == 0 or hidden >= k or not nonzero:
            return released
        released.remove(min(nonzero, key=lambda name: (sizes[name], name)))


def _bins(out: dict[str, float], *, n: int, labels_ok: bool, k: int) -> None:
    """Reliability bins: sizes as a partition of the site, ``conf`` from k samples, ``obs`` as a count."""
    sizes = {m["bin"]: int(out[key]) for key in list(out) if (m := _BIN_N.match(key))}
    released = set(_released_sizes(sizes, total=n, k=k))
    positives = {b: _count(_finite(out, f"rel-bin-{b}-obs") * sizes[b]) for b in released if sizes[b] >= k}
    rates = {b: (sizes[b], c) for b, c in positives.items() if count_ok(c, sizes[b], k)}
    with_obs = set(_secondary(rates, total=n, inside=_count(_finite(out, "n-pos")), k=k)) if labels_ok else set()
    for b in sizes:
        if b not in released:
            out.pop(f"rel-bin-{b}-n", None)
        if b not in released or sizes[b] < k:
            out.pop(f"rel-bin-{b}-conf", None)
        if b not in with_obs:
            out.pop(f"rel-bin-{b}-obs", None)


def _group_cells(out: Mapping[str, float], group: str) -> Cells:
    n, pos = int(out[f"grp-{group}-n"]), _count(_finite(out, f"grp-{group}-n-pos"))
    tp = _count(_finite(out, f"grp-{group}-sensitivity") * pos)
    tn = _count(_finite(out, f"grp-{group}-specificity") * (n - pos))
    if tp < 0 or tn < 0:
        return -1, -1, -1, -1
    return tp, (n - pos) - tn, pos - tp, tn


def _groups(out: dict[str, float], *, n: int, pos: int, site: Cells | None, k: int) -> None:
    """Per attribute: group label counts and group tables, with secondary suppression against the site."""
    groups = [m["group"] for key in list(out) if (m := _GROUP_N.match(key))]
    for attribute in sorted({g.split("-")[0] for g in groups}):
        members = [g for g in groups if g.split("-")[0] == attribute]
        sizes = {g: (int(out[f"grp-{g}-n"]), _count(_finite(out, f"grp-{g}-n-pos"))) for g in members}
        keep: set[str] = set()
        if pos >= 0:  # the site's own label counts are released
            labelled = {g: size for g, size in sizes.items() if count_ok(size[1], size[0], k)}
            keep = set(_secondary(labelled, total=n, inside=pos, k=k))
        tables = {g: _group_cells(out, g) for g in keep}
        tables = {g: c for g, c in tables.items() if min(c) >= 0 and table_ok(c, k)}
        with_table: set[str] = set()
        if site is not None:
            with_table = set(tables)
            while with_table:
                rest = tuple(s - sum(tables[g][i] for g in with_table) for i, s in enumerate(site))
                if not any(rest) or table_ok(rest, k):  # type: ignore[arg-type]  # (4 cells)
                    break
                with_table.remove(min(with_table, key=lambda g: (sizes[g][0], g)))
        for g in members:
            if g not in keep:
                for key in [key for key in out if key.startswith(f"grp-{g}-") and key != f"grp-{g}-n"]:
                    del out[key]
            elif g not in with_table:
                _drop(out, f"grp-{g}-", _GROUP_TABLE_RATES)


def release_metrics(metrics: Mapping[str, float], *, num_examples: int, min_count: int) -> dict[str, float]:
    """The subset of a site's evaluation ``metrics`` that may leave it (rules in the module docstring).

    Args:
        metrics: ``clinical_metrics`` output, optionally with ``accuracy``/``auc``/``loss``.
        num_examples: Test samples the metrics describe.
        min_count: The site's smallest releasable count (raised to :data:`COUNT_FLOOR`).

    Returns:
        A new dict: ``metrics`` without every number that would describe fewer than k patients.
    """
    k = max(COUNT_FLOOR, int(min_count))
    out = dict(metrics)
    n = int(num_examples)
    pos = _finite(out, "n-pos")
    labels_ok = count_ok(pos, n, k)
    cells = tuple(int(_finite(out, c)) if math.isfinite(_finite(out, c)) else -1 for c in _CELLS)
    site_table = labels_ok and min(cells) >= 0 and table_ok(cells, k)  # type: ignore[arg-type]
    if "accuracy" in out and not count_ok(_count(_finite(out, "accuracy") * n), n, k):  # a count of correct ones
        del out["accuracy"]
    if not labels_ok:
        for key in ("n-pos", "auc"):
            out.pop(key, None)
        _drop(out, "", ("roc-auc",))
    if not site_table:
        _drop(out, "", _CELLS, ("",))
        _drop(out, "", _OP_RATES)
    for j in range(21):
        key = f"roc-tpr-{j:02d}"
        if key in out and not (labels_ok and (j == 20 or count_ok(round(_finite(out, key) * pos), pos, k))):
            del out[key]
    _bins(out, n=n, labels_ok=labels_ok, k=k)
    site_cells = cells if site_table else None
    _groups(out, n=n, pos=int(pos) if labels_ok else -1, site=site_cells, k=k)  # type: ignore[arg-type]
    return out
