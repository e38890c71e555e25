"""The site's outbound guard: a reply may carry model arrays and whitelisted numbers only.

Every Message a site sends is checked here before it leaves; anything else (a
string, an unexpected record or metric, an array that is not a model parameter) is
an error raised at the site, so a bug or a hostile config cannot leak data.

The only strings that ever leave are the site's name (:data:`SITE_NAME_PATTERN`:
a letter, then letters, digits, ``_ . -``; never a path or a UID) and a refusal
reason ``"<code>: <detail>"`` whose code is one of :data:`REFUSAL_CODES` and whose
detail uses a restricted alphabet (no ``/``, ``\\``, ``^``, ``@``, no long digit
runs such as UIDs or dates). A site that fails replies with :func:`error_reply`,
whose reason is the same for every failure (:data:`SITE_ERROR_REASON`): Flower would
otherwise send the exception's text, which may hold file paths, to the coordinator,
and even its type would tell whether a path exists.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from client.clinical_guard import CLINICAL_METRICS, case_count_problems, count_problems, group_size_problems
from federation.compression import transfer_layout
from federation.flower_internals import ErrorCode
from federation.training.results import TRAIN_METRICS as _TRAIN_METRIC_NAMES
from federation.training.results import UNPRIVATIZED_TRAIN_METRICS

#: Metric names a site may send after training (declared in :mod:`federation.training.results`).
TRAIN_METRICS = frozenset(_TRAIN_METRIC_NAMES)
#: What a real site that trains with DP may send: nothing computed from its data without noise.
DP_SITE_TRAIN_METRICS = TRAIN_METRICS - UNPRIVATIZED_TRAIN_METRICS
#: Metric names a site may send after evaluation.
EVALUATE_METRICS = frozenset({"num-examples", "loss", "auc", "accuracy"}) | CLINICAL_METRICS | frozenset(
    {"personal-loss", "personal-auc", "personal-accuracy"})  # train.local_norm (client.personal.PERSONAL_METRICS)
#: Per task, the evaluation metric names spelled out here rather than asked of the task.
_SPELLED_OUT_EVALUATE_METRICS = {"classification": EVALUATE_METRICS}


def evaluate_metrics(task: str) -> frozenset[str]:
    """Metric names a site may send after evaluating a model of ``data.task`` = ``task``.

    Classification: :data:`EVALUATE_METRICS`. Other tasks declare their own finite
    list (segmentation: Dice/HD95/volume-error aggregates and case counts); the
    guard also refuses any of them computed over fewer than 5 cases
    (:func:`client.clinical_guard.case_count_problems`).

    Raises:
        ValueError: Unknown task (the message lists the valid names).
    """
    if task in _SPELLED_OUT_EVALUATE_METRICS:
        return _SPELLED_OUT_EVALUATE_METRICS[task]
    from federation.tasks import get_task  # noqa: PLC0415

    return get_task(task).metric_names()


#: Config entries a site may send: its (public) name, and a refusal reason.
CONFIG_ENTRIES = {"site": frozenset({"name"}), "status": frozenset({"refused"})}


#: Refusal codes a site may send, with what each means.
REFUSAL_CODES: dict[str, str] = {
    "run-budget": "the run's own epsilon budget (privacy.target_epsilon) would be exceeded",
    "lifetime-epsilon": "the site's lifetime epsilon (policy lifetime_epsilon) would be exceeded",
    "lifetime-delta": "the site's lifetime delta (policy lifetime_delta) would be exceeded",
    "delta-too-high": "privacy.target_delta is above 1/n of the site's training set or the policy's max_delta",
    "ledger-damaged": "the site's privacy ledger does not load; it trains no more until its operator restores it",
    "ledger-mismatch": "the run's accountant holds less epsilon than the site's ledger records",
    "model-not-allowed": "model.name is not in the policy's allowed_models",
    "strategy-not-allowed": "strategy.name is not in the policy's allowed_strategies",
    "accountant-not-allowed": "privacy.accountant is not in the policy's allowed_accountants",
    "max-rounds": "the run asks for more rounds than max_rounds_per_run",
    "dp-required": "privacy.enabled is false and the policy does not allow non-DP training",
    "noise-too-low": "the noise multiplier is below the policy's min_noise_multiplier",
    "clipping-too-high": "privacy.max_grad_norm is above the policy's max_grad_norm",
    "evaluation-budget": "the run's (or the site's lifetime) evaluations reached the policy's maximum",
    "evaluation-settings": "the clinical settings differ from those the run's first evaluation fixed",
    "secagg-required": "the site's policy requires secure aggregation (require_secagg) and the round is plain",
    "secagg-protocol": "a secure-aggregation request that would reveal more than the sum, or out of order",
    "data-mismatch": "the site's data disagrees with the classes, channels or size the run config declares",
}
#: What a site name must look like (from node config ``site-name``, set by the hospital).
SITE_NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_REASON_PATTERN = re.compile(r"^(?P<code>[a-z][a-z-]*): [A-Za-z0-9 _.,:;=<>()\[\]'+*%-]{1,400}$")
_NUMERIC_DTYPE = re.compile(r"^(float|int|uint|bfloat)\d+$")
#: Runs of digits and dots this long look like UIDs, dates or IDs and never leave.
_ID_LIKE = re.compile(r"[0-9.]{14,}")


class OutboundViolation(RuntimeError):
    """A reply would carry something the site does not allow to leave."""


def train_metrics_allowed(*, dp: bool, simulated: bool) -> frozenset[str]:
    """Train metric names a reply may carry: a real site under DP sends no un-noised statistic (train-loss)."""
    return DP_SITE_TRAIN_METRICS if dp and not simulated else TRAIN_METRICS


def check_site_name(name: str) -> str:
    """Return ``name`` if it may leave the site, else raise :class:`OutboundViolation`."""
    if not isinstance(name, str) or not SITE_NAME_PATTERN.match(name) or _ID_LIKE.search(name):
        raise OutboundViolation(
            f"site name must match {SITE_NAME_PATTERN.pattern} (set node config 'site-name'), got {name!r}"
        )
    return name


def check_refusal_reason(reason: str) -> str:
    """Return ``reason`` if it is ``"<known code>: <safe detail>"``, else raise :class:`OutboundViolation`."""
    match = _REASON_PATTERN.match(reason) if isinstance(reason, str) else None
    if match is None or match["code"] not in REFUSAL_CODES or _ID_LIKE.search(reason):
        raise OutboundViolation(f"refusal reason {reason!r} is not a known code with a safe detail")
    return reason


def refusal(code: str, detail: str) -> str:
    """Build a refusal reason ``"<code>: <detail>"`` and check that it may leave the site.

    Raises:
        OutboundViolation: Unknown code, or a detail outside the safe alphabet.
    """
    return check_refusal_reason(f"{code}: {detail}")


#: The one reason every failed request gets: not even the exception type leaves the site
#: (``FileNotFoundError`` vs ``ValueError`` would tell the coordinator whether a path exists).
SITE_ERROR_REASON = "site error; details are in the site's own log and audit log"


def error_reply(msg: Message, err: BaseException) -> Message:
    """An error reply to ``msg`` that carries nothing about the failure (type, paths, values) off the site.

    ``err`` stays at the site: :func:`client.handling.handle` writes it to the site's
    log and audit log.
    """
    del err  # deliberately unused: see SITE_ERROR_REASON
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=SITE_ERROR_REASON), reply_to=msg)


def check_reply(
    content: RecordDict,
    *,
    allowed_metrics: Iterable[str],
    parameter_names: Iterable[str] = (),
    parameter_shapes: Mapping[str, Sequence[int]] | None = None,
    transfer_dtype: str = "fp32",
    count_floors: bool = True,
) -> RecordDict:
    """Raise :class:`OutboundViolation` unless ``content`` holds only allowed items.

    Args:
        content: The reply's RecordDict.
        allowed_metrics: Metric names permitted in the MetricRecord.
        parameter_names: Names the ArrayRecord may use (the model's parameters);
            empty means no ArrayRecord is allowed.
        parameter_shapes: The model's parameters by name and shape; when given,
            the ArrayRecord must hold exactly these, with these shapes, as numbers.
        transfer_dtype: With ``fp16``/``int8`` (``train.transfer_dtype``) the
            ArrayRecord must instead hold exactly the quantized update that
            :func:`federation.compression.transfer_layout` describes.
        count_floors: Also check that no metric gives away a count of fewer than 5
            patients (:func:`client.clinical_guard.count_problems`); False only for a
            simulated site's evaluation (research, no patients under a coordinator's threat).

    Returns:
        ``content`` unchanged, for chaining.
    """
    allowed = frozenset(allowed_metrics)
    layout = transfer_layout(parameter_shapes or {}, dtype=transfer_dtype)
    params = frozenset(parameter_names) | frozenset(parameter_shapes or ()) | frozenset(layout)
    for key, record in content.items():
        if isinstance(record, MetricRecord):
            extra = sorted(set(record.keys()) - allowed)
            if key != "metrics" or extra:
                raise OutboundViolation(f"metric record {key!r} carries non-whitelisted {extra}")
            for name, value in record.items():
                if not isinstance(value, (int, float)):
                    raise OutboundViolation(f"metric {name!r} is not a single number")
            small = group_size_problems(dict(record.items())) + case_count_problems(dict(record.items()))
            small += count_problems(dict(record.items())) if count_floors else []
            if small:
                raise OutboundViolation(f"metric record would single out small groups: {small[:3]}")
        elif isinstance(record, ArrayRecord):
            extra = sorted(set(record.keys()) - params)
            if key != "arrays" or extra:
                raise OutboundViolation(f"array record {key!r} carries non-parameter arrays {extra[:5]}")
            if parameter_shapes is not None and transfer_dtype != "fp32":
                _check_encoded(record, layout)
            elif parameter_shapes is not None:
                _check_arrays(record, parameter_shapes)
        elif isinstance(record, ConfigRecord):
            entries = CONFIG_ENTRIES.get(key)
            if entries is None or set(record.keys()) - entries:
                raise OutboundViolation(f"config record {key!r} is not allowed to leave the site")
            if "name" in record and key == "site":
                check_site_name(record["name"])
            if "refused" in record and key == "status":
                check_refusal_reason(record["refused"])
        else:
            raise OutboundViolation(f"record {key!r} of type {type(record).__name__} is not allowed")
    return content


def _check_arrays(record: ArrayRecord, shapes: Mapping[str, Sequence[int]]) -> None:
    """Exactly the model's parameters, with their shapes, as numeric arrays (no strings or objects)."""
    missing = sorted(set(shapes) - set(record.keys()))
    if missing:
        raise OutboundViolation(f"array record lacks model parameters {missing[:5]}")
    for name, array in record.items():
        if tuple(array.shape) != tuple(shapes[name]):
            raise OutboundViolation(
                f"array {name!r} has shape {tuple(array.shape)}, the model's is {tuple(shapes[name])}"
            )
        if not _NUMERIC_DTYPE.match(str(array.dtype)):
            raise OutboundViolation(f"array {name!r} has dtype {array.dtype}; only numeric model tensors may leave")


def _check_encoded(record: ArrayRecord, layout: Mapping[str, tuple[tuple[int, ...], str]]) -> None:
    """Exactly the quantized update's arrays (:func:`federation.compression.transfer_layout`)."""
    missing = sorted(set(layout) - set(record.keys()))
    if missing:
        raise OutboundViolation(f"array record lacks update entries {missing[:5]}")
    for name, array in record.items():
        shape, dtype = layout[name]
        if tuple(array.shape) != shape or str(array.dtype) != dtype:
            raise OutboundViolation(
                f"array {name!r} is {array.dtype}{tuple(array.shape)}, the {dtype}{shape} of the quantized update"
            )
