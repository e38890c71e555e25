"""What a hospital site does in a round, as plain functions with no Flower types.

The ClientApp (:mod:`client.app`) only turns Flower Messages into calls of these
functions and their results back into Messages.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from client.admission import Admission, admit_train_round, evaluation_budget_refusal
from client.evaluation import EvaluationRecord, EvaluationRules, evaluation_rules, lifetime_evaluations, request_key
from client.cache import checkout_model, release_model, site_data
from client.guard import check_site_name, refusal
from client.ledger import LedgerError, PrivacyLedger, check_run_name
from client.policy import NODE_POLICY, SitePolicy  # noqa: F401  (a node-config key)
from client.replay import save_reply, saved_reply
from client.simulated import is_simulated_site
from federation.config import DataConfig, ExperimentConfig
from federation.data import DataMismatch, SiteData
from federation.metrics.clinical import clinical_metrics
from federation.metrics.disclosure import release_metrics
from federation.models import build_model
from federation.tasks import get_task
from federation.training import evaluate, select_device

if TYPE_CHECKING:  # Opacus (~1 s to import) loads only in a process that trains: see train_round
    from federation.privacy import SitePrivacy

logger = logging.getLogger(__name__)

#: Node-config keys a SuperNode may set (``flower-supernode --node-config``).
NODE_SITE_NAME = "site-name"
NODE_DATA_DIR = "data-dir"
NODE_STATE_DIR = "state-dir"
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_PACS = "pacs"  # the site's PACS YAML: its cohort is retrieved into <state-dir>/<site>/pacs-cache, its data-dir
# NODE_POLICY ("policy": the site's policy YAML) is defined in client.policy.


class SiteConfigError(RuntimeError):
    """A real site's node config lacks a key it must set (the site's log names them)."""


#: Node-config keys every real site must set: the coordinator never chooses its name or folders.
REAL_SITE_KEYS = (NODE_SITE_NAME, NODE_DATA_DIR, NODE_STATE_DIR)


@dataclass(frozen=True)
class SiteSettings:
    """Where a site is and which slice of data it holds, from Flower's node config."""

    name: str
    site_index: int
    num_sites: int
    data_dir: str
    state_dir: Path
    run_name: str = "run"
    simulated: bool = False  # inside a simulation engine (client.simulated): faults/attacks may apply
    pacs: str = ""  # the site's PACS YAML (node config 'pacs'; simulated: simulation.site_pacs); data_dir: its cache

    @property
    def run_state_dir(self) -> Path:
        """This run's folder on the site's disk (its privacy accountant)."""
        return self.state_dir / "runs" / self.run_name


def check_node_config(node_config: Mapping[str, Any]) -> None:
    """Raise :class:`SiteConfigError` unless a real site's node config sets ``site-name``, ``data-dir``, ``state-dir``.

    Simulated sites (:func:`client.simulated.is_simulated_site`) pass: their engine
    gives them only ``partition-id``/``num-partitions``.
    """
    if is_simulated_site(node_config):
        return
    missing = [key for key in REAL_SITE_KEYS if not str(node_config.get(key, "")).strip()]
    if missing:
        raise SiteConfigError(
            f"this SuperNode's node config lacks {', '.join(repr(k) for k in missing)}: a real site must set "
            f"its own {', '.join(REAL_SITE_KEYS)} (`medfed deploy supernode --site-name ... --data-dir ... "
            "--state-dir ...`); the run config may not choose them"
        )


def site_settings(
    *, node_config: Mapping[str, Any], config: ExperimentConfig, run_name: str
) -> SiteSettings:
    """Resolve a site's settings: a real site's from its node config only.

    A real SuperNode sets ``site-name``, ``data-dir`` and ``state-dir`` (required:
    :func:`check_node_config`); no run-config key chooses its name, data or ledger.
    A simulated site (inside a simulation engine, no ``state-dir``) gets only
    ``partition-id`` and ``num-partitions`` from Flower, so it takes its data folder
    from ``data.data_dir`` and keeps its "disk" under ``simulation.site_state_dir`` or
    the run directory.

    Args:
        node_config: Flower node config of this SuperNode.
        config: The run's experiment config.
        run_name: Name of the run (keys the site's privacy state on disk).

    Raises:
        SiteConfigError: A real site's node config lacks one of :data:`REAL_SITE_KEYS`.
    """
    check_node_config(node_config)
    simulated = is_simulated_site(node_config)
    if NODE_PARTITION_ID in node_config:  # a demo deployment may slice a shared data set too
        site_index = int(node_config[NODE_PARTITION_ID])
        fallback = config.data.num_sites if simulated else site_index + 1
        num_sites = int(node_config.get(NODE_NUM_PARTITIONS, fallback))
    else:
        site_index, num_sites = 0, 1
    name = check_site_name(str(node_config.get(NODE_SITE_NAME, f"site-{site_index + 1}")))
    check_run_name(run_name)
    pacs = ""
    if not simulated:
        data_dir, base = str(node_config[NODE_DATA_DIR]), Path(str(node_config[NODE_STATE_DIR])).expanduser()
        pacs = str(node_config.get(NODE_PACS, "") or "").strip()
        if pacs:  # the site's cohort from its own PACS, kept on its own disk (federation.data.dicom.pacs)
            from federation.data.dicom.pacs import cohort_cache_dir  # noqa: PLC0415

            data_dir = str(cohort_cache_dir(pacs, state_dir=base / name))
    else:
        data_dir = str(node_config.get(NODE_DATA_DIR, config.data.data_dir))
        if getattr(config.simulation, "site_state_dir", ""):
            # Simulated hospitals whose disks outlive one run (lifetime budgets across runs).
            base = Path(config.simulation.site_state_dir).expanduser()
        else:  # a simulated site keeps its "disk" inside the run directory
            base = Path(config.server.out_dir).expanduser() / run_name / "site-state"
        if config.simulation.site_pacs:  # a simulated site with a PACS cohort of its own, cached on its "disk"
            from federation.data.dicom.pacs import cohort_cache_dir, simulated_site_pacs  # noqa: PLC0415

            pacs = simulated_site_pacs(config.simulation.site_pacs, site_index=site_index, num_sites=num_sites)
            data_dir = str(cohort_cache_dir(pacs, state_dir=base / name))
    return SiteSettings(
        name=name, site_index=site_index, num_sites=num_sites, data_dir=data_dir, state_dir=base / name,
        run_name=run_name, simulated=simulated, pacs=pacs,
    )


#: File in a real site's state folder holding its secret salt of the PatientID keys (created on first use).
PATIENT_SALT_FILE = "patient-salt"


def site_data_config(config: ExperimentConfig, settings: SiteSettings) -> DataConfig:
    """The ``data`` section this site loads with: its own data folder, and at a real site its own paths.

    At a real site the DICOM paths the run config names are confined to the site's
    folders (the labels CSV anchored at its data-dir, the header index at its state
    folder; :func:`federation.data.dicom.confine.confine`), and the PatientID keys
    of its header index are salted with its own secret (:data:`PATIENT_SALT_FILE`).

    Raises:
        PathOutsideSite: A path resolves outside the site's folders (the site's log
            names it; the coordinator gets the uniform error reply).
    """
    data = config.data.model_copy(update={"data_dir": settings.data_dir})
    if settings.simulated or data.dataset not in ("dicom", "dicom_volume", "dicom_seg"):
        return data
    from federation.data.dicom.confine import confine  # noqa: PLC0415

    roots = (settings.data_dir, settings.state_dir)
    update = {
        "dicom_labels": str(confine(data.dicom_labels or "labels.csv", roots=roots, what="data.dicom_labels")),
        "dicom_patient_salt_file": str(settings.state_dir / PATIENT_SALT_FILE),
    }
    if data.dicom_cache_dir:
        update["dicom_cache_dir"] = str(confine(data.dicom_cache_dir, roots=roots[::-1], what="data.dicom_cache_dir"))
    return data.model_copy(update=update)


def load_data(config: ExperimentConfig, settings: SiteSettings) -> SiteData:
    """Load this site's train and test split (kept per process between rounds, see :mod:`client.cache`).

    Raises:
        DataMismatch: Site-only data (``dicom``) disagreeing with the classes, channels or
            size the run declares; the caller refuses with ``data-mismatch``.
    """
    from federation.data import check_site_data, is_site_only, load_dataset  # noqa: PLC0415

    if settings.pacs:  # retrieve the cohort (once per run), then load it like a folder
        from federation.data.dicom.pacs import ensure_site_cohort  # noqa: PLC0415

        ensure_site_cohort(settings.pacs, cache_dir=settings.data_dir, run=settings.run_name)
    data_config = site_data_config(config, settings)
    if is_site_only(data_config.dataset):  # the model's shape came from the run config, not from data
        check_site_data(data_config, load_dataset(data_config, seed=config.seed))
    whole = bool(settings.pacs)  # a PACS cohort is the site's own: all of it, never a slice of a shared folder
    return site_data(
        data_config, seed=config.seed, site_index=0 if whole else settings.site_index,
        num_sites=1 if whole else settings.num_sites, budget_mb=config.simulation.data_cache_mb,
    )


def _build(config: ExperimentConfig, data: SiteData, *, dp: bool) -> torch.nn.Module:
    """A model of the configured architecture (reused between rounds: load weights, then release_model).

    Evaluation asks with ``dp=False`` (the layers follow ``model.norm`` either way), so
    it never loads Opacus; ``dp=True`` has the network checked for DP-SGD first.
    """
    return checkout_model(
        config.model, in_channels=data.in_channels, num_classes=data.num_classes, dp=dp,
        build=lambda: build_model(
            config.model, in_channels=data.in_channels, num_classes=data.num_classes, dp=False,
            spatial_dims=data.spatial_dims,
        ),
    )


def _privacy_path(settings: SiteSettings) -> Path:
    path = settings.run_state_dir / "privacy.json"
    legacy = settings.state_dir / "privacy.json"  # layout before the ledger: simulation only, one run per disk
    if not path.is_file() and legacy.is_file() and settings.state_dir.parent.name == "site-state" \
            and settings.state_dir.parent.parent.name == settings.run_name:
        return legacy
    return path


def load_privacy(
    config: ExperimentConfig, settings: SiteSettings, num_examples: int
) -> SitePrivacy | None:
    """The site's accountant for the whole run, restored from its disk when present."""
    if not config.privacy.enabled:
        return None
    from client.personal import planned_rounds  # noqa: PLC0415
    from federation.privacy import SitePrivacy  # noqa: PLC0415 - Opacus: only where DP trains

    privacy = SitePrivacy(
        config=config.privacy,
        num_examples=num_examples,
        batch_size=config.train.batch_size,
        local_epochs=config.train.local_epochs,
        planned_rounds=planned_rounds(config),  # Ditto's and fine-tuning's steps too: client.personal
    )
    path = _privacy_path(settings)
    if path.is_file():
        try:
            privacy.load_state_dict(json.loads(path.read_text()))
        except (ValueError, KeyError) as err:
            raise RuntimeError(
                f"site {settings.name}: privacy state {path} is unreadable ({err}); "
                "it records the privacy budget already spent, so it is never reset "
                "silently: restore it from backup or start a new run name"
            ) from err
    return privacy


def save_privacy(privacy: SitePrivacy, settings: SiteSettings) -> None:
    """Write the accountant state atomically (a crash never leaves half a file)."""
    path = _privacy_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".privacy-", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        json.dump(privacy.state_dict(), handle)
    os.replace(tmp, path)


@dataclass(frozen=True)
class TrainOutcome:
    """A round's result at a site: new weights and whitelisted metrics, or a refusal."""

    weights: dict[str, torch.Tensor] | None
    metrics: dict[str, float]
    refusal: str | None = None
    admission: Admission | None = None
    replayed: bool = False  # the reply already sent for this round (client/replay.py): nothing spent


def train_round(
    *,
    config: ExperimentConfig,
    settings: SiteSettings,
    global_weights: Mapping[str, torch.Tensor],
    server_round: int,
    proximal_mu: float = 0.0,
    policy: SitePolicy | None = None,
    run_id: int | None = None,
    data: SiteData | None = None,
) -> TrainOutcome:
    """Train the global model on this site's data for one round.

    Returns a refusal instead of training when the request is outside the site's
    policy, or when this round would exceed the run's or the site's lifetime privacy
    budget (see :func:`client.admission.admit_train_round`). The site's ledger
    records the epsilon reserved before and spent after training. A round asked for
    again from the same global model (a coordinator resumed after a crash) gets the
    reply already sent, spending nothing (:mod:`client.replay`). ``data`` is the site's data when the
    caller loaded it already (default: :func:`load_data`; a simulated attacker's poisoned copy comes
    from :mod:`simulations.adversary_app`, never from a deployed site's code).
    """
    from federation.training.schedule import with_site_schedule  # noqa: PLC0415

    sent = saved_reply(settings.run_state_dir, server_round=server_round, global_weights=global_weights)
    if sent is not None:
        logger.warning("site %s: round %d of run %s was trained already; resending its reply (no epsilon spent)",
                       settings.name, server_round, settings.run_name)
        return TrainOutcome(weights=sent[0], metrics=sent[1], replayed=True)
    try:
        data = load_data(config, settings) if data is None else data
    except DataMismatch as mismatch:
        reason = refusal("data-mismatch", mismatch.detail)
        logger.warning("site %s refuses round %d: %s", settings.name, server_round, reason)
        return TrainOutcome(weights=None, metrics={}, refusal=reason)
    config = with_site_schedule(config, num_examples=len(data.train), server_round=server_round)  # steps, lr
    model = _build(config, data, dp=config.privacy.enabled)  # checked for DP-SGD before any epsilon is reserved
    try:
        model.load_state_dict(dict(global_weights))
        if config.train.local_norm:  # FedBN: this site's own norm layers, kept on its disk (client.personal)
            from client.personal import restore_local_norm  # noqa: PLC0415

            restore_local_norm(model, settings)
        privacy = load_privacy(config, settings, num_examples=len(data.train))
        try:
            ledger = PrivacyLedger.open(settings.state_dir)
        except LedgerError as damaged:  # kept as it is; the operator restores it (the error says how)
            logger.error("site %s refuses round %d: %s", settings.name, server_round, damaged)
            return TrainOutcome(weights=None, metrics={}, refusal=refusal(
                "ledger-damaged", "the site's privacy ledger does not load; the site trains no more until "
                "its operator restores it (details in the site's own log)"))
        admission = admit_train_round(
            policy=policy, ledger=ledger, config=config, privacy=privacy, run=settings.run_name,
            server_round=server_round, run_id=run_id,
        )
        if admission.refusal is not None:
            logger.warning("site %s refuses round %d: %s", settings.name, server_round, admission.refusal)
            return TrainOutcome(weights=None, metrics={}, refusal=admission.refusal, admission=admission)
        return _train_admitted(
            model, config=config, settings=settings, data=data, privacy=privacy, ledger=ledger, admission=admission,
            global_weights=global_weights, server_round=server_round, proximal_mu=proximal_mu, run_id=run_id,
            policy=policy,
        )
    finally:
        release_model(model)  # refused or failed rounds too: the next request reuses it


def _train_admitted(
    model: torch.nn.Module,
    *,
    config: ExperimentConfig,
    settings: SiteSettings,
    data: SiteData,
    privacy: SitePrivacy | None,
    ledger: PrivacyLedger,
    admission: Admission,
    global_weights: Mapping[str, torch.Tensor],
    server_round: int,
    proximal_mu: float,
    run_id: int | None,
    policy: SitePolicy | None = None,
) -> TrainOutcome:
    """Train an admitted round on a checked-out model and record what it spent."""
    from federation.privacy import PrivacyBudgetExhausted  # noqa: PLC0415 - Opacus: only where a site trains
    from federation.training import model_state, train_local  # noqa: PLC0415

    try:
        result = train_local(
            model=model,
            dataset=data.train,
            config=config.train,
            privacy=privacy,
            seed=config.seed * 100_003 + server_round * 1_009 + settings.site_index,
            proximal_mu=proximal_mu,
            device=select_device(config.train.device),
            # A real site's DP noise and sampling come from a secret only it holds (issue 26): the
            # coordinator knows every input of the seed above and could regenerate and subtract them.
            noise_source="seeded" if settings.simulated else "secure",
            task=config.data.task,  # its loss: cross-entropy, or DiceCELoss for segmentation
        )
    except PrivacyBudgetExhausted as stop:  # admit_train_round checks this first; kept as a backstop
        logger.warning("site %s refuses round %d: %s", settings.name, server_round, stop.reason)
        return TrainOutcome(weights=None, metrics={}, refusal=refusal("run-budget", stop.reason), admission=admission)
    if config.train.ditto_lambda > 0:  # Ditto: the personal model trains too, in the same accountant (client.ditto)
        from client.ditto import train_ditto  # noqa: PLC0415

        result = train_ditto(model, config=config, settings=settings, data=data, privacy=privacy, ledger=ledger,
                             policy=policy, global_weights=global_weights, server_round=server_round, run_id=run_id,
                             result=result)
    if privacy is not None:
        save_privacy(privacy, settings)
    ledger.commit(
        settings.run_name, epsilon=float(result.epsilon) if privacy is not None else 0.0,
        delta=float(result.delta) if privacy is not None else 0.0, server_round=server_round,
        dp=privacy is not None, run_id=run_id,
    )
    # A real DP site sends no exact statistic of its data (the training loss is neither noised nor accounted).
    metrics = result.metrics(unprivatized=privacy is None or settings.simulated)
    local = model_state(model)
    if config.train.local_norm:  # FedBN: the norm layers stay here; the reply carries the global values
        from client.personal import keep_local_norm  # noqa: PLC0415

        local = keep_local_norm(model, settings=settings, local=local, global_weights=global_weights)
    save_reply(settings.run_state_dir, server_round=server_round, global_weights=global_weights, weights=local,
               metrics=metrics)  # a redone round resends it instead of spending again
    return TrainOutcome(weights=local, metrics=metrics, admission=admission)


def evaluate_round(
    *,
    config: ExperimentConfig,
    settings: SiteSettings,
    global_weights: Mapping[str, torch.Tensor],
    rules: EvaluationRules | None = None,
) -> dict[str, float]:
    """Evaluate the global model on this site's own test split (at a real site: after disclosure control).

    Args:
        config: The run config.
        settings: The site's settings.
        global_weights: The model to evaluate.
        rules: Clinical settings, subgroups and floor in force (default: the run config's
            at a simulated site, the policy defaults at a real one; see :mod:`client.evaluation`).
    """
    if rules is None:
        rules = evaluation_rules(config=config, simulated=settings.simulated, policy=None)
    data = load_data(config, settings)
    model = _build(config, data, dp=False)
    model.load_state_dict(dict(global_weights))
    task_metrics = get_task(config.data.task).site_metrics(
        model=model, data=data, config=config, device=select_device(config.train.device))
    if task_metrics is not None:  # the task's own aggregates (segmentation: Dice, HD95 over >= 5 cases each)
        if _personalized(config):
            from client.personal import personal_task_metrics  # noqa: PLC0415

            task_metrics.update(personal_task_metrics(model, data=data, config=config, released=task_metrics,
                                                      global_weights=global_weights, settings=settings))
        release_model(model)
        return task_metrics
    result = evaluate(
        model=model,
        dataset=data.test,
        batch_size=max(256, config.train.batch_size),
        device=select_device(config.train.device),
    )
    personal: dict[str, float] = {}
    if _personalized(config):  # client.personal
        from client.personal import personal_metrics  # noqa: PLC0415

        personal = personal_metrics(model, dataset=data.test, global_weights=global_weights, settings=settings,
                                    device=select_device(config.train.device),
                                    batch_size=max(256, config.train.batch_size))
    release_model(model)
    metrics = {"loss": float(result.loss), "auc": float(result.auc), "accuracy": float(result.accuracy)}
    # Clinical aggregates (intervals, calibration, ROC grid, the site's subgroups); never per-patient values.
    metrics.update(
        clinical_metrics(
            labels=result.labels,
            probs=result.probs,
            settings=rules.clinical,
            groups={k: v for k, v in (data.test_groups or {}).items() if k in rules.subgroups},
        )
    )
    if not settings.simulated:  # a real site: no count of fewer than k patients leaves (federation.metrics.disclosure)
        metrics = release_metrics(metrics, num_examples=int(result.num_examples),
                                  min_count=rules.clinical.min_group_size)
        if personal:
            from client.personal import release_personal  # noqa: PLC0415

            personal = release_personal(personal, released=metrics, num_examples=int(result.num_examples),
                                        min_count=rules.clinical.min_group_size)
    return {"num-examples": float(result.num_examples), **metrics, **personal}


def _personalized(config: ExperimentConfig) -> bool:
    """Whether the site keeps a personalized model to evaluate too (FedBN, fine-tuning, Ditto)."""
    return bool(config.train.local_norm or config.train.finetune_rounds or config.train.ditto_lambda > 0)


@dataclass(frozen=True)
class EvaluateOutcome:
    """An evaluation's reply at a site: released metrics, or a refusal; whether it came from the cache."""

    metrics: dict[str, float]
    refusal: str | None = None
    cached: bool = False
    evaluations: int | None = None  # evaluations answered in this run (real sites)


def evaluate_request(
    *,
    config: ExperimentConfig,
    settings: SiteSettings,
    global_weights: Mapping[str, torch.Tensor],
    policy: SitePolicy | None = None,
    server_round: int = 0,
) -> EvaluateOutcome:
    """Answer an evaluation request within the site's evaluation rules (:mod:`client.evaluation`).

    The evaluation after the last round first fine-tunes the global model when
    ``train.finetune_rounds`` asks (:func:`client.personal.finetune_after_federation`).

    A simulated site just evaluates. A real site answers a repeated request from its
    cache (no budget used), refuses other clinical settings than the run's first
    evaluation fixed and requests beyond its budget, and counts the evaluation on
    its disk before running it.
    """
    rules = evaluation_rules(config=config, simulated=settings.simulated, policy=policy)
    from client.personal import finetune_after_federation, finetune_due  # noqa: PLC0415

    due = finetune_due(config, server_round)
    if not rules.limited:
        if due:
            finetune_after_federation(config=config, settings=settings, global_weights=global_weights, policy=policy)
        return EvaluateOutcome(evaluate_round(config=config, settings=settings, global_weights=global_weights,
                                              rules=rules))
    record = EvaluationRecord.open(settings.run_state_dir)
    key = request_key(global_weights, rules=rules, config=config)
    if key in record.cache:
        logger.info("site %s answers a repeated evaluation request from its cache", settings.name)
        return EvaluateOutcome(dict(record.cache[key]), cached=True, evaluations=record.count)
    reason = evaluation_budget_refusal(rules=rules, record=record,
                                       lifetime_count=lifetime_evaluations(settings.state_dir))
    if reason is not None:
        logger.warning("site %s refuses an evaluation: %s", settings.name, reason)
        return EvaluateOutcome({}, refusal=reason, evaluations=record.count)
    record.reserve(rules.fingerprint())
    if due:
        finetune_after_federation(config=config, settings=settings, global_weights=global_weights, policy=policy)
    metrics = evaluate_round(config=config, settings=settings, global_weights=global_weights, rules=rules)
    record.store(key, metrics)
    return EvaluateOutcome(metrics, evaluations=record.count)
