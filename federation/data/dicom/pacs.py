"""A site's cohort from its own PACS over DICOMweb (QIDO-RS to query, WADO-RS to retrieve) or DIMSE.

The configuration is the site's own YAML file (named by its node config or on the command
line, never by the coordinator's run config)::

    dicomweb_url: https://pacs.hospital.local/dicom-web
    username: medfed
    password_file: /etc/medfed/pacs-password     # or password_env: MEDFED_PACS_PASSWORD
    labels: /etc/medfed/pacs-labels.csv           # keyed by Study/Series Instance UID or Accession Number
    key_column: series_instance_uid               # or study_instance_uid, accession_number
    label_column: label
    cohort:
      modality: CT                                # one or a comma list
      body_part: CHEST
      study_date_from: "20200101"
      study_date_to: "20251231"
      series_description: "AX.*"                  # a regular expression (full match, case-insensitive)

A PACS without DICOMweb is named by a ``dimse`` block (host, port, called_ae, calling_ae)
instead of ``dicomweb_url`` (C-FIND, C-GET, C-STORE: :mod:`federation.data.dicom.dimse`);
DIMSE has no password (the PACS allow-lists the site's AE title), so no credential key goes with it.

:func:`sync_cohort` retrieves the labelled series of the cohort into a local cache folder:
each instance written to a temporary file and renamed into place, its SHA-256 kept in
``manifest.json``, so an interrupted retrieval resumes and a re-run fetches only new or
damaged instances and drops those that left the cohort. The cache then holds a
``labels.csv`` keyed by SOP Instance UID (2-D sites) and Series Instance UID (``dicom_volume``),
and the site trains from it exactly as from a folder. Nothing here writes to the PACS.
The password is read when connecting and is never logged, stored or part of an error.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydicom.dataset import Dataset

from federation.data.dicom.dimse import DimseClient, DimseFailure, DimseSettings
from federation.data.dicom.labels import read_labels
from federation.hashing import sha256_file

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LABELS = "labels.csv"
KEY_COLUMNS = ("series_instance_uid", "study_instance_uid", "accession_number")
_TOP_KEYS = {"dicomweb_url", "dimse", "username", "password_file", "password_env", "labels", "key_column",
             "label_column", "cohort", "timeout_s", "cache_dir"}
_DIMSE_KEYS = {"host", "port", "called_ae", "calling_ae", "retrieve", "move_port", "move_bind", "tls_ca", "tls_cert",
               "tls_key"}
_CREDENTIAL_KEYS = ("username", "password_file", "password_env")
_COHORT_KEYS = {"modality", "body_part", "study_date_from", "study_date_to", "series_description"}
_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "BodyPartExamined", "SeriesDescription",
           "StudyDate", "AccessionNumber", "NumberOfSeriesRelatedInstances")


class PacsError(RuntimeError):
    """The PACS cannot be used (unreachable, refused credentials, bad answer) or its config is wrong."""


@dataclass(frozen=True)
class CohortQuery:
    """Which series form the cohort (every criterion optional; dates ``YYYYMMDD``, inclusive)."""

    modalities: tuple[str, ...] = ()
    body_part: str = ""
    study_date_from: str = ""
    study_date_to: str = ""
    series_description: str = ""

    def matches(self, series: CohortSeries) -> bool:
        """Whether a series found by QIDO-RS meets every criterion."""
        if self.modalities and series.modality not in self.modalities:
            return False
        if self.body_part and series.body_part.upper() != self.body_part.upper():
            return False
        if self.study_date_from and not (series.study_date and series.study_date >= self.study_date_from):
            return False
        if self.study_date_to and not (series.study_date and series.study_date <= self.study_date_to):
            return False
        pattern = self.series_description
        return not pattern or re.fullmatch(pattern, series.description, flags=re.IGNORECASE) is not None


@dataclass(frozen=True)
class PacsConfig:
    """A site's PACS settings (:func:`load_pacs_config`). Holds where the password is, never the password."""

    source: Path
    dicomweb_url: str = ""
    dimse: DimseSettings | None = None
    username: str = ""
    password_file: str = ""
    password_env: str = ""
    labels: str = ""
    key_column: str = "series_instance_uid"
    label_column: str = "label"
    cohort: CohortQuery = field(default_factory=CohortQuery)
    timeout_s: float = 30.0
    cache_dir: str = ""

    @property
    def address(self) -> str:
        """The PACS as errors and logs name it: its DICOMweb URL or ``dicom://AE@host:port``."""
        return self.dimse.address if self.dimse is not None else self.dicomweb_url

    def password(self) -> str:
        """Read the password now, from its file or environment variable (``""`` without either)."""
        if self.password_file:
            try:
                return Path(self.password_file).expanduser().read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise PacsError(f"{self.source}: password_file {self.password_file} cannot be read "
                                f"({type(exc).__name__})") from None
        if self.password_env:
            if self.password_env not in os.environ:
                raise PacsError(f"{self.source}: password_env {self.password_env} is not set in the environment")
            return os.environ[self.password_env]
        return ""


def _bad(path: Path, key: str, problem: str) -> PacsError:
    return PacsError(f"{path}: {key}: {problem}")


def load_pacs_config(path: str | os.PathLike[str]) -> PacsConfig:
    """Read and check a site's PACS YAML; every problem names the file and the key.

    Raises:
        PacsError: Missing file, unknown keys, bad values, or a password written into the file.
    """
    source = Path(path).expanduser().resolve()
    try:
        raw = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PacsError(f"{source}: cannot read the PACS config ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise PacsError(f"{source}: expected a mapping of keys, got {type(raw).__name__}")
    if "password" in raw:
        raise _bad(source, "password", "never write the password into this file: use password_file or password_env")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise _bad(source, unknown[0], f"unknown key (valid: {', '.join(sorted(_TOP_KEYS))})")
    url = str(raw.get("dicomweb_url", "") or "").rstrip("/")
    dimse = _dimse_settings(source, raw) if "dimse" in raw else None
    if dimse is not None and url:
        raise _bad(source, "dimse", "give dicomweb_url or dimse, not both")
    if dimse is None and not re.match(r"^https?://", url):
        raise _bad(source, "dicomweb_url", f"must be an http(s) URL of the DICOMweb root (or give a dimse "
                                           f"block: host, port, called_ae, calling_ae), got {url!r}")
    cohort = raw.get("cohort") or {}
    if not isinstance(cohort, dict) or set(cohort) - _COHORT_KEYS:
        bad = sorted(set(cohort) - _COHORT_KEYS) if isinstance(cohort, dict) else ["(not a mapping)"]
        raise _bad(source, f"cohort.{bad[0]}", f"unknown key (valid: {', '.join(sorted(_COHORT_KEYS))})")
    dates = {k: str(cohort.get(k, "") or "") for k in ("study_date_from", "study_date_to")}
    for key, value in dates.items():
        if value and not re.fullmatch(r"\d{8}", value):
            raise _bad(source, f"cohort.{key}", f"a date YYYYMMDD, got {value!r}")
    pattern = str(cohort.get("series_description", "") or "")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise _bad(source, "cohort.series_description", f"not a regular expression ({exc})") from None
    key_column = str(raw.get("key_column", "series_instance_uid"))
    if key_column not in KEY_COLUMNS:
        raise _bad(source, "key_column", f"{key_column!r} is not one of {', '.join(KEY_COLUMNS)}")
    labels = str(raw.get("labels", "") or "")
    if labels and not Path(labels).expanduser().is_absolute():
        labels = str(source.parent / labels)
    return PacsConfig(
        source=source, dicomweb_url=url, dimse=dimse, username=str(raw.get("username", "") or ""),
        password_file=str(raw.get("password_file", "") or ""), password_env=str(raw.get("password_env", "") or ""),
        labels=labels, key_column=key_column, label_column=str(raw.get("label_column", "label")),
        cohort=CohortQuery(
            modalities=tuple(m.strip().upper() for m in str(cohort.get("modality", "") or "").split(",") if m.strip()),
            body_part=str(cohort.get("body_part", "") or ""), series_description=pattern, **dates),
        timeout_s=float(raw.get("timeout_s", 30.0)), cache_dir=str(raw.get("cache_dir", "") or ""),
    )


def _dimse_settings(source: Path, raw: dict) -> DimseSettings:
    """The ``dimse`` block: host, port and AE titles; no credential key may go with it."""
    block = raw["dimse"]
    if not isinstance(block, dict) or set(block) - _DIMSE_KEYS:
        bad = sorted(set(block) - _DIMSE_KEYS) if isinstance(block, dict) else ["(not a mapping)"]
        raise _bad(source, f"dimse.{bad[0]}", f"unknown key (valid: {', '.join(sorted(_DIMSE_KEYS))})")
    for key in _CREDENTIAL_KEYS:
        if raw.get(key):
            raise _bad(source, key, "DIMSE has no password: the PACS admits the site by its AE title "
                                    "(dimse.calling_ae, allow-listed at the PACS); remove this key")
    host, port = str(block.get("host", "") or ""), block.get("port")
    if not host:
        raise _bad(source, "dimse.host", "the PACS's host name or address is required")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise _bad(source, "dimse.port", f"a TCP port (1-65535), got {port!r}")
    titles = {k: str(block.get(k, "") or "") for k in ("called_ae", "calling_ae")}
    titles["calling_ae"] = titles["calling_ae"] or "MEDFED"
    for key, title in titles.items():
        if not re.fullmatch(r"[ -~]{1,16}", title) or title.strip() != title or "\\" in title:
            raise _bad(source, f"dimse.{key}", f"an AE title of 1-16 printable characters without "
                                               f"backslash or outer spaces, got {title!r}")
    retrieve = str(block.get("retrieve", "get") or "get").lower()
    if retrieve not in ("get", "move"):
        raise _bad(source, "dimse.retrieve", f"'get' (C-GET) or 'move' (C-MOVE to this site's storage SCP), "
                                             f"got {retrieve!r}")
    move_port = block.get("move_port", 0)
    if retrieve == "move" and (not isinstance(move_port, int) or isinstance(move_port, bool)
                               or not 0 < move_port < 65536):
        raise _bad(source, "dimse.move_port", f"retrieve: move needs the TCP port this site's storage SCP listens "
                                              f"on (registered at the PACS for {titles['calling_ae']}), got "
                                              f"{move_port!r}")
    return DimseSettings(host=host, port=port, timeout_s=float(raw.get("timeout_s", 30.0)), retrieve=retrieve,
                         move_port=int(move_port or 0), move_bind=str(block.get("move_bind", "0.0.0.0")),
                         **_dimse_tls(source, block, retrieve=retrieve), **titles)


def _dimse_tls(source: Path, block: dict, *, retrieve: str) -> dict[str, str]:
    """The ``dimse`` block's TLS files (relative to the YAML's folder), each checked to exist."""
    files = {k: str(block.get(k, "") or "") for k in ("tls_ca", "tls_cert", "tls_key")}
    if not files["tls_ca"] and (files["tls_cert"] or files["tls_key"]):
        raise _bad(source, "dimse.tls_ca", "tls_cert/tls_key need tls_ca (the CA the PACS's certificate chains to)")
    if bool(files["tls_cert"]) != bool(files["tls_key"]):
        raise _bad(source, "dimse.tls_key" if files["tls_cert"] else "dimse.tls_cert", "give both tls_cert and tls_key")
    if files["tls_ca"] and retrieve == "move":
        raise _bad(source, "dimse.retrieve", "retrieve: move is not supported with TLS yet (its storage SCP would "
                                             "take plain connections): use retrieve: get")
    for key, value in files.items():
        if value:
            path = Path(value).expanduser()
            files[key] = str(path if path.is_absolute() else source.parent / path)
            if not Path(files[key]).is_file():
                raise _bad(source, f"dimse.{key}", f"{files[key]} is not a file")
    return files


@dataclass(frozen=True)
class CohortSeries:
    """One series of the cohort, as QIDO-RS describes it."""

    study_instance_uid: str
    series_instance_uid: str
    modality: str
    body_part: str
    description: str
    study_date: str
    accession_number: str
    instances: int


@contextmanager
def pacs_errors(config: PacsConfig, what: str) -> Iterator[None]:
    """Turn HTTP/network failures into a :class:`PacsError` naming the PACS URL (never the password)."""
    import requests  # noqa: PLC0415

    try:
        yield
    except DimseFailure as exc:
        if exc.kind == "rejected":
            raise PacsError(f"PACS {config.address} rejected the association of {exc} while trying to {what}: "
                            "the PACS must allow-list this AE title (and host) for C-FIND, C-GET and C-STORE "
                            f"(dimse.calling_ae in {config.source})") from None
        if exc.kind == "unreachable":
            raise PacsError(f"PACS {config.address} is unreachable ({exc}) while trying to {what}: "
                            "check dimse host, port and called_ae and the network") from None
        raise PacsError(f"PACS {config.address}: {exc} while trying to {what}") from None
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else 0
        if code in (401, 403):
            raise PacsError(f"PACS {config.dicomweb_url} refused the credentials of user {config.username!r} "
                            f"(HTTP {code}) while trying to {what}: check the username and the password "
                            f"({'password_file' if config.password_file else 'password_env'} in {config.source})"
                            ) from None
        raise PacsError(f"PACS {config.dicomweb_url} answered HTTP {code} while trying to {what}") from None
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise PacsError(f"PACS {config.dicomweb_url} is unreachable ({type(exc).__name__}) while trying to {what}: "
                        "check dicomweb_url and the network") from None


def connect(config: PacsConfig) -> Any:
    """A client for the site's PACS: a ``dicomweb_client.DICOMwebClient`` (basic auth when a username
    is set) or, for a ``dimse`` PACS, a :class:`~federation.data.dicom.dimse.DimseClient`."""
    if config.dimse is not None:
        return DimseClient(config.dimse, study_date=(config.cohort.study_date_from, config.cohort.study_date_to))
    import requests  # noqa: PLC0415
    from dicomweb_client.api import DICOMwebClient  # noqa: PLC0415

    session = requests.Session()
    if config.username:
        session.auth = (config.username, config.password())
    client = DICOMwebClient(config.dicomweb_url, session=session, timeout=config.timeout_s)
    # one quick retry (busy PACS, dropped connection), not dicomweb-client's five with 1-16 s back-off:
    # an unreachable PACS is reported in well under a second
    client.set_http_retry_params(retry=True, max_attempts=2, wait_exponential_multiplier=200)
    return client


def _values(item: dict) -> dict[str, str]:
    """A QIDO-RS answer (DICOM JSON) as keyword -> text for :data:`_FIELDS`."""
    ds = Dataset.from_json(item)
    return {k: ("" if ds.get(k) is None else str(ds.get(k)).strip()) for k in _FIELDS}


def query_cohort(config: PacsConfig, *, client: Any = None) -> list[CohortSeries]:
    """The series of the cohort (QIDO-RS; criteria applied to what the PACS answers), sorted by UID."""
    client = client or connect(config)
    filters = {"Modality": config.cohort.modalities[0]} if len(config.cohort.modalities) == 1 else {}
    with pacs_errors(config, "query the cohort (C-FIND)" if config.dimse else "query the cohort (QIDO-RS)"):
        found = client.search_for_series(fields=list(_FIELDS), search_filters=filters, get_remaining=True)
    series = []
    for item in found:
        v = _values(item)
        s = CohortSeries(*(v[k] for k in _FIELDS[:7]), instances=int(v["NumberOfSeriesRelatedInstances"] or 0))
        if config.cohort.matches(s):
            series.append(s)
    return sorted(series, key=lambda s: s.series_instance_uid)


@dataclass
class SyncResult:
    """What a cohort retrieval did: the cohort's labelled series, instances fetched, reused and dropped."""

    cache_dir: Path
    series: list[CohortSeries]
    unlabelled: list[CohortSeries]
    fetched: int = 0
    reused: int = 0
    removed: int = 0


def _series_labels(config: PacsConfig, series: list[CohortSeries]) -> dict[str, str]:
    if not config.labels:
        return {}
    table = read_labels(config.labels, key_column=config.key_column, label_column=config.label_column)
    key: Callable[[CohortSeries], str] = {
        "series_instance_uid": lambda s: s.series_instance_uid,
        "study_instance_uid": lambda s: s.study_instance_uid,
        "accession_number": lambda s: s.accession_number,
    }[config.key_column]
    return {s.series_instance_uid: table.labels[key(s)] for s in series if key(s) in table.labels}



def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _save_manifest(cache: Path, manifest: dict[str, dict[str, str]]) -> None:
    _write_atomic(cache / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1, sort_keys=True)))


def _load_manifest(cache: Path) -> dict[str, dict[str, str]]:
    try:
        data = json.loads((cache / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("cohort cache manifest %s unreadable (%s): every instance is checked again", cache, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _fetch_series(client: Any, config: PacsConfig, series: CohortSeries, cache: Path,
                  manifest: dict[str, dict[str, str]], result: SyncResult) -> set[str]:
    with pacs_errors(config, f"list the instances of series {series.series_instance_uid}"):
        found = client.search_for_instances(study_instance_uid=series.study_instance_uid,
                                            series_instance_uid=series.series_instance_uid,
                                            fields=["SOPInstanceUID"], get_remaining=True)
    sops = sorted(Dataset.from_json(i).SOPInstanceUID for i in found)
    for sop in sops:
        rel = f"series/{series.series_instance_uid}/{sop}.dcm"
        entry, path = manifest.get(sop), cache / rel
        if entry and entry.get("path") == rel and path.is_file() and sha256_file(path) == entry.get("sha256"):
            result.reused += 1
            continue
        how = "WADO-RS" if config.dimse is None else ("C-MOVE" if config.dimse.retrieve == "move" else "C-GET")
        with pacs_errors(config, f"retrieve instance {sop} ({how})"):
            ds = client.retrieve_instance(series.study_instance_uid, series.series_instance_uid, sop,
                                          media_types=(("application/dicom", "*"),))
        _write_atomic(path, lambda p, d=ds: d.save_as(p, enforce_file_format=True))
        manifest[sop] = {"path": rel, "sha256": sha256_file(path), "series_instance_uid": series.series_instance_uid,
                         "study_instance_uid": series.study_instance_uid}
        result.fetched += 1
    return set(sops)


def _write_labels(cache: Path, manifest: dict[str, dict[str, str]], labels: dict[str, str]) -> None:
    def write(path: Path) -> None:
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sop_instance_uid", "path", "series_instance_uid", "label"])
            for sop, entry in sorted(manifest.items()):
                label = labels.get(entry["series_instance_uid"])
                if label is not None:
                    writer.writerow([sop, entry["path"], entry["series_instance_uid"], label])

    _write_atomic(cache / LABELS, write)


def sync_cohort(config: PacsConfig, *, cache_dir: str | os.PathLike[str], labelled_only: bool = True,
                client: Any = None) -> SyncResult:
    """Retrieve the cohort into ``cache_dir`` (atomic, resumable, checksummed; only what changed).

    The PACS is queried before anything is written, so a wrong password or an
    unreachable PACS leaves the site's disk as it was.

    Args:
        config: The site's PACS config.
        cache_dir: The local cohort folder (at a real site inside its state-dir or data-dir).
        labelled_only: Retrieve only series with a label (training); ``False``: every cohort series (predict).
        client: A DICOMweb client (default: :func:`connect`).

    Returns:
        The :class:`SyncResult`.

    Raises:
        PacsError: The PACS is unreachable, refuses the credentials or answers with an error.
    """
    client = client or connect(config)
    cohort = query_cohort(config, client=client)
    labels = _series_labels(config, cohort)
    wanted = [s for s in cohort if s.series_instance_uid in labels or not labelled_only]
    result = SyncResult(cache_dir=Path(cache_dir).expanduser().resolve(), series=wanted,
                        unlabelled=[s for s in cohort if s.series_instance_uid not in labels])
    cache = result.cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    manifest = _load_manifest(cache)
    keep: set[str] = set()
    try:
        for series in wanted:
            keep |= _fetch_series(client, config, series, cache, manifest, result)
            _save_manifest(cache, manifest)  # resumable: what is fetched stays known
    finally:
        if isinstance(client, DimseClient):  # its C-GET association
            client.close()
    for sop in sorted(set(manifest) - keep):
        (cache / manifest.pop(sop)["path"]).unlink(missing_ok=True)
        result.removed += 1
    for folder in (cache / "series").glob("*") if (cache / "series").is_dir() else ():
        if folder.is_dir() and not any(folder.iterdir()):
            shutil.rmtree(folder)
    _save_manifest(cache, manifest)
    _write_labels(cache, manifest, labels)
    logger.info("PACS cohort %s: %d series, %d instances fetched, %d reused, %d removed",
                config.address, len(wanted), result.fetched, result.reused, result.removed)
    return result


COHORT_CACHE = "pacs-cache"
"""The cohort cache's folder in a site's state folder, unless its PACS YAML sets ``cache_dir``."""

_RETRIEVED: dict[tuple[str, str], SyncResult] = {}


def cohort_cache_dir(config_path: str | os.PathLike[str], *, state_dir: str | os.PathLike[str]) -> Path:
    """Where a site keeps the cohort of its PACS YAML: its ``cache_dir``, else ``<state_dir>/pacs-cache``."""
    config = load_pacs_config(config_path)
    return Path(config.cache_dir).expanduser().resolve() if config.cache_dir else Path(state_dir) / COHORT_CACHE


def ensure_site_cohort(config_path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str],
                       run: str) -> SyncResult:
    """Retrieve a site's cohort into its cache once per process and run (its data stays fixed within a run).

    Raises:
        PacsError: The PACS is unreachable, refuses the credentials or answers with an error.
    """
    key = (str(Path(config_path).expanduser().resolve()), str(cache_dir), run)
    if key not in _RETRIEVED:
        _RETRIEVED[key] = sync_cohort(load_pacs_config(config_path), cache_dir=cache_dir)
    return _RETRIEVED[key]


def simulated_site_pacs(site_pacs: str, *, site_index: int, num_sites: int) -> str:
    """The PACS YAML of simulated site ``site_index`` from ``simulation.site_pacs`` (one per site, in order).

    Raises:
        ValueError: The list does not name one YAML per site.
    """
    entries = [entry.strip() for entry in site_pacs.split(",")]
    if len(entries) != num_sites or not all(entries):
        raise ValueError(f"simulation.site_pacs names {len([e for e in entries if e])} PACS YAML(s) for {num_sites} "
                         f"simulated sites: give one per site, comma separated, in site order ({site_pacs!r})")
    return entries[site_index]
