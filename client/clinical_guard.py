"""The outbound whitelist of clinical metrics, and the subgroup-size check the guard applies.

The names are spelled out here, independent of the code that computes them
(:mod:`federation.metrics.clinical`), so that a change there cannot widen what a
site sends: a new metric needs a new entry here. The set is finite: at most 20
reliability bins, a 21-point ROC grid, and subgroups from a fixed vocabulary
(``sex-f``, ``sex-m``, ``sex-o``, ``age-0`` .. ``age-7``).
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
