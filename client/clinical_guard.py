"""The outbound whitelist of clinical metrics, and the subgroup-size check the guard applies.

The names are spelled out here, independent of the code that computes them
(:mod:`federation.metrics.clinical`), so that a change there cannot widen what a
site sends: a new metric needs a new entry here. The set is finite: at most 20
reliability bins, a 21-point ROC grid, and subgroups from a fixed vocabulary
(``sex-f``, ``sex-m``, ``sex-o``, ``age-0`` .. ``age-7``).

Beyond names, :func:`count_problems` re-checks from the reply alone that no number
describes fewer than 5 patients (or all but fewer than 5 of a set): the confusion
table and its rates, ``n-pos``, the ROC grid, reliability bins and subgroups, and
what released bins and subgroups leave over (the site's disclosure control,
:mod:`federation.metrics.disclosure`, applies the site's own, larger floor first).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

#: Fewer samples than this in a subgroup never leave a site, whatever the run config says
#: (``clinical.min_group_size`` may only raise it).
GROUP_SIZE_FLOOR = 5

_RATES = ("roc-auc", "op-accuracy", "sensitivity", "specificity", "ppv", "npv")
_GROUP_RATES = _RATES[:4]
_SUFFIXES = ("", "-lo", "-hi")
_GROUPS = ("sex-f", "sex-m", "sex-o", *(f"age-{k}" for k in range(8)))

#: Every clinical metric name a site may send after evaluation.
CLINICAL_METRICS = frozenset(
    {"threshold", "n-pos", "tp", "fp", "tn", "fn", "ece", "brier"}
    | {f"{rate}{suffix}" for rate in _RATES for suffix in _SUFFIXES}
    | {f"roc-tpr-{k:02d}" for k in range(21)}
    | {f"rel-bin-{b:02d}-{part}" for b in range(20) for part in ("n", "conf", "obs")}
    | {f"grp-{g}-{stat}" for g in _GROUPS for stat in ("n", "n-pos", "ece")}
    | {f"grp-{g}-{rate}{suffix}" for g in _GROUPS for rate in _GROUP_RATES for suffix in _SUFFIXES}
)

_GROUP_NAME = re.compile(r"^grp-(?P<group>sex-[fmo]|age-[0-7])-")
_BIN_NAME = re.compile(r"^rel-bin-(?P<bin>\d{2})-(conf|obs)$")


def group_size_problems(metrics: Mapping[str, object], *, floor: int = GROUP_SIZE_FLOOR) -> list[str]:
    """Why ``metrics`` would single out small groups (empty list: it would not).

    Every ``grp-<g>-*`` metric needs ``grp-<g>-n >= floor`` in the same record, and
    every reliability bin's ``conf``/``obs`` needs its ``rel-bin-XX-n >= floor``.

    Args:
        metrics: A MetricRecord's items.
        floor: Smallest group size allowed to leave.
    """
    problems = []
    for name in metrics:
        for pattern, size_key in ((_GROUP_NAME, "grp-{group}-n"), (_BIN_NAME, "rel-bin-{bin}-n")):
            match = pattern.match(name)
            if match is None:
                continue
            size = metrics.get(size_key.format(**match.groupdict()))
            if not isinstance(size, (int, float)) or math.isnan(size) or size < floor:
                problems.append(f"{name} describes a group of {size} (< {floor}) samples")
    return problems


_CELL_NAMES = ("tp", "fp", "fn", "tn")
_TABLE_RATES = {f"{rate}{suffix}" for rate in ("op-accuracy", "sensitivity", "specificity", "ppv", "npv")
                for suffix in _SUFFIXES}
_GROUP_SIZE = re.compile(r"^grp-(?P<group>sex-[fmo]|age-[0-7])-n$")
_ROC_NAME = re.compile(r"^roc-tpr-(?P<point>\d{2})$")
_BIN_SIZE = re.compile(r"^rel-bin-(?P<bin>\d{2})-n$")


def _number(metrics: Mapping[str, object], name: str) -> float:
    value = metrics.get(name)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan


def _times(rate: float, total: float) -> float:
    """The count behind ``rate`` of ``total`` (nan when either is missing)."""
    product = rate * total
    return float(round(product)) if math.isfinite(product) else math.nan


def _inside(count: float, total: float, floor: int) -> bool:
    """A count of a set of ``total`` that may leave: at least ``floor`` of it, and of its complement."""
    return math.isfinite(count) and math.isfinite(total) and floor <= count <= total - floor


def _columns_problem(where: str, cells: tuple[float, float, float, float], floor: int) -> list[str]:
    """tp, fp, fn, tn: each non-empty prediction column needs ``floor`` positives and ``floor`` negatives."""
    tp, fp, fn, tn = cells
    if not all(math.isfinite(c) for c in cells):
        return [f"{where}: a confusion table rate without its counts"]
    if all(a + b == 0 or (a >= floor and b >= floor) for a, b in ((tp, fp), (fn, tn))):
        return []
    return [f"{where}: a confusion-table cell describes fewer than {floor} samples"]


def count_problems(metrics: Mapping[str, object], *, floor: int = GROUP_SIZE_FLOOR) -> list[str]:
    """Why ``metrics`` would give away a count of fewer than ``floor`` patients (empty: it would not).

    Checked from the reply alone, independently of :mod:`federation.metrics.disclosure`:
    ``n-pos`` (as a count of ``num-examples``), the confusion table
    ``tp/fp/fn/tn`` and every rate derived from it, each ROC grid point (as a count of
    ``n-pos``), each reliability bin (its size, and its positives), each subgroup's
    positives and table (from its rates), and what the released bins and subgroups of
    an attribute leave over from the site's totals.
    """
    n, pos = _number(metrics, "num-examples"), _number(metrics, "n-pos")
    problems = []
    if "n-pos" in metrics and not _inside(pos, n, floor):
        problems.append(f"n-pos {pos} of {n} samples")
    if _TABLE_RATES & set(metrics) or set(_CELL_NAMES) & set(metrics):
        cells = tuple(_number(metrics, c) for c in _CELL_NAMES)
        problems += _columns_problem("site", cells, floor)  # type: ignore[arg-type]
    for name in metrics:
        match = _ROC_NAME.match(name)
        if match and int(match["point"]) < 20:
            if not _inside(_times(_number(metrics, name), pos), pos, floor):
                problems.append(f"{name} is a count of fewer than {floor} positives (or of all but that many)")
    problems += _bin_problems(metrics, n=n, pos=pos, floor=floor)
    problems += _subgroup_problems(metrics, n=n, pos=pos, floor=floor)
    return problems


def _bin_problems(metrics: Mapping[str, object], *, n: float, pos: float, floor: int) -> list[str]:
    sizes = {m["bin"]: _number(metrics, name) for name in metrics if (m := _BIN_SIZE.match(name))}
    problems = [f"rel-bin-{b}-n = {size}" for b, size in sizes.items() if not (size == 0 or size >= floor)]
    if sizes and not (n - sum(sizes.values()) == 0 or n - sum(sizes.values()) >= floor):
        problems.append(f"the unsent reliability bins hold {n - sum(sizes.values())} samples")
    with_obs = {b: _times(_number(metrics, f"rel-bin-{b}-obs"), size) for b, size in sizes.items()
                if f"rel-bin-{b}-obs" in metrics}
    with_obs = {b: c for b, c in with_obs.items() if math.isfinite(c)}
    problems += [f"rel-bin-{b}-obs counts {c} of {sizes[b]}" for b, c in with_obs.items()
                 if not _inside(c, sizes[b], floor)]
    observed = {name[8:10] for name in metrics if name.startswith("rel-bin-") and name.endswith("-obs")}
    problems += [f"rel-bin-{b}-obs without a valid bin size" for b in sorted(observed - set(with_obs))]
    if with_obs:
        rest_n = n - sum(sizes[b] for b in with_obs)
        if not (rest_n == 0 or _inside(pos - sum(with_obs.values()), rest_n, floor)):
            problems.append("the bins without observed rates leave a small count of positives")
    return problems


def _subgroup_problems(metrics: Mapping[str, object], *, n: float, pos: float, floor: int) -> list[str]:
    problems: list[str] = []
    sizes = {m["group"]: _number(metrics, name) for name in metrics if (m := _GROUP_SIZE.match(name))}
    for attribute in ("sex", "age"):
        labelled: dict[str, tuple[float, float]] = {}
        tables: dict[str, tuple[float, float, float, float]] = {}
        for g, size in sizes.items():
            if not g.startswith(f"{attribute}-"):
                continue
            if f"grp-{g}-n-pos" not in metrics:
                extra = [k for k in metrics if k.startswith(f"grp-{g}-") and k != f"grp-{g}-n"]
                problems += [f"{k} without the group's n-pos" for k in extra[:1]]
                continue
            g_pos = _number(metrics, f"grp-{g}-n-pos")
            labelled[g] = (size, g_pos)
            if not _inside(g_pos, size, floor):
                problems.append(f"grp-{g}-n-pos {g_pos} of {size}")
            if any(f"grp-{g}-{r}" in metrics for r in ("sensitivity", "specificity", "op-accuracy")):
                tp = _times(_number(metrics, f"grp-{g}-sensitivity"), g_pos)
                tn = _times(_number(metrics, f"grp-{g}-specificity"), size - g_pos)
                cells = (tp, size - g_pos - tn, g_pos - tp, tn)
                tables[g] = cells
                problems += _columns_problem(f"grp-{g}", cells, floor)
        if labelled:
            rest_n = n - sum(s for s, _ in labelled.values())
            if not (rest_n == 0 or _inside(pos - sum(p for _, p in labelled.values()), rest_n, floor)):
                problems.append(f"the {attribute} groups leave a small count of positives to the rest")
        if tables:
            site = tuple(_number(metrics, c) for c in _CELL_NAMES)
            rest = tuple(s - sum(t[i] for t in tables.values()) for i, s in enumerate(site))
            if any(rest) and _columns_problem("rest", rest, floor):  # type: ignore[arg-type]
                problems.append(f"the {attribute} groups' tables leave a small cell to the rest")
    return problems


_SEGMENTATION_STAT = re.compile(r"^(?P<metric>dice|hd95|voldiff)(?:-(?P<cls>\d{1,2}))?(?P<rest>-(?:lo|hi|median|abs))?$")


def case_count_problems(metrics: Mapping[str, object], *, floor: int = GROUP_SIZE_FLOOR) -> list[str]:
    """Why segmentation ``metrics`` would describe fewer than ``floor`` cases (empty list: they would not).

    ``dice``/``dice-lo``/``dice-hi`` need ``dice-n >= floor``; a class's ``dice-c*`` and
    ``voldiff-c*`` need ``dice-c-n >= floor``, its ``hd95-c*`` need ``hd95-c-n >= floor``,
    all in the same record (see :mod:`federation.metrics.segmentation`).
    """
    problems = []
    for name in metrics:
        match = _SEGMENTATION_STAT.match(name)
        if match is None:
            continue
        metric, cls = match["metric"], match["cls"]
        size_key = f"{'hd95' if metric == 'hd95' else 'dice'}{'-' + cls if cls else ''}-n"
        size = metrics.get(size_key)
        if not isinstance(size, (int, float)) or math.isnan(size) or size < floor:
            problems.append(f"{name} describes {size} (< {floor}) cases")
    return problems
