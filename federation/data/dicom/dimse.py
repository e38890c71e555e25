"""A site's PACS over DIMSE (pynetdicom): C-FIND to query, C-GET to retrieve, C-STORE to write back.

For a PACS without DICOMweb. The site's PACS YAML names it with a ``dimse`` block instead
of ``dicomweb_url``::

    dimse:
      host: pacs.hospital.local
      port: 104
      called_ae: HOSPITALPACS     # the PACS's AE title
      calling_ae: MEDFED_NORTH    # this site's AE title, allow-listed at the PACS
      retrieve: get               # or "move" (with move_port): C-MOVE to this site's own storage SCP

DIMSE has no password: the PACS admits an association by the calling AE title (and, in
most PACS, the host it comes from), so the site's AE title must be registered at the PACS
with C-FIND and C-GET (or C-MOVE) allowed (and C-STORE for ``predict --pacs``). C-GET needs
no listening port at the site; C-MOVE makes it run a storage SCP for the retrieval that
accepts only the PACS's AE title.

:class:`DimseClient` offers the few methods of ``dicomweb_client.DICOMwebClient`` that
:mod:`federation.data.dicom.pacs` and :mod:`federation.inference.writeback` call, with the
same answers (DICOM JSON for searches, datasets for retrievals), so the cohort cache,
its checks and quarantine are the same for both protocols.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

_SERIES_FIELDS = ("SeriesInstanceUID", "Modality", "BodyPartExamined", "SeriesDescription",
                  "NumberOfSeriesRelatedInstances")
_STUDY_FIELDS = ("StudyInstanceUID", "StudyDate", "AccessionNumber")
_SUCCESS, _PENDING = 0x0000, (0xFF00, 0xFF01)
_MAX_STORAGE_CONTEXTS = 32  # storage SOP classes offered on one C-GET association (128 contexts at most)


class DimseFailure(RuntimeError):
    """A DIMSE operation failed; ``kind`` is ``unreachable``, ``rejected`` or ``status``."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


@dataclass(frozen=True)
class DimseSettings:
    """Where the PACS listens and which AE titles the association uses."""

    host: str
    port: int
    called_ae: str
    calling_ae: str = "MEDFED"
    timeout_s: float = 30.0
    retrieve: str = "get"  # "get": C-GET on the query's association; "move": C-MOVE to our own storage SCP
    move_port: int = 0  # "move": the port our storage SCP listens on (registered at the PACS for calling_ae)
    move_bind: str = "0.0.0.0"  # noqa: S104 - "move": the address our SCP binds (the PACS connects to it)
    tls_ca: str = ""  # DICOM TLS: the CA file the PACS's certificate must chain to ("" = no TLS)
    tls_cert: str = ""  # DICOM TLS: the site's client certificate and key, where the PACS asks for one
    tls_key: str = ""

    @property
    def address(self) -> str:
        """The PACS as errors and logs name it: ``dicom://CALLED_AE@host:port``."""
        return f"dicom://{self.called_ae}@{self.host}:{self.port}"


def _date_range(date_from: str, date_to: str) -> str:
    return f"{date_from}-{date_to}" if (date_from or date_to) else ""


class DimseClient:
    """C-FIND/C-GET/C-STORE against one PACS: an association per query or store; the C-GETs of a
    retrieval share one (opened again when a new SOP class comes up; :meth:`close` releases it)."""

    def __init__(self, settings: DimseSettings, *, study_date: tuple[str, str] = ("", "")) -> None:
        self.settings = settings
        self.study_date = study_date  # the cohort's date range, matched by the study-level C-FIND
        self._sop_classes: dict[str, str] = {}  # SOP Instance UID -> SOP Class UID, from the instance C-FIND
        self._held: tuple[Any, frozenset[str]] | None = None  # the open C-GET association and its storage classes
        self._received: list[Dataset] = []
        self._scp: Any = None  # "move": our storage SCP, started on first use, stopped by close()
        self._moved: dict[str, Dataset] = {}  # "move": instances the PACS sent, by SOP Instance UID
        self._scp_classes: frozenset[str] = frozenset()

    def _ae(self) -> Any:
        from pynetdicom import AE  # noqa: PLC0415

        ae = AE(ae_title=self.settings.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.settings.timeout_s
        ae.connection_timeout = min(self.settings.timeout_s, 10.0)
        return ae

    def _tls_args(self) -> tuple[ssl.SSLContext, str] | None:
        """DICOM TLS: the PACS's certificate checked against ``tls_ca`` and its host name; the site's own
        certificate presented where set."""
        if not self.settings.tls_ca:
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.settings.tls_ca)
        if self.settings.tls_cert:
            context.load_cert_chain(self.settings.tls_cert, self.settings.tls_key or None)
        return context, self.settings.host

    def _open(self, ae: Any, **kwargs: Any) -> Any:
        assoc = ae.associate(self.settings.host, self.settings.port, ae_title=self.settings.called_ae,
                             tls_args=self._tls_args(), **kwargs)
        if not assoc.is_established:
            if assoc.is_rejected:
                raise DimseFailure("rejected", f"calling AE title {self.settings.calling_ae!r}")
            if self._reachable():  # a PACS may close the connection before its rejection is read (Orthanc does)
                raise DimseFailure("rejected", f"calling AE title {self.settings.calling_ae!r} (the PACS closed "
                                               "the association without accepting it: an AE title it does not "
                                               "admit, or TLS on one side only: dimse.tls_ca)")
            raise DimseFailure("unreachable", "no association")
        return assoc

    def _reachable(self) -> bool:
        """Whether the PACS's port accepts a TCP connection at all."""
        try:
            with socket.create_connection((self.settings.host, self.settings.port),
                                          timeout=min(self.settings.timeout_s, 5.0)):
                return True
        except OSError:
            return False

    @contextmanager
    def _association(self, ae: Any, **kwargs: Any) -> Iterator[Any]:
        assoc = self._open(ae, **kwargs)
        try:
            yield assoc
        finally:
            assoc.release()

    def close(self) -> None:
        """Release the C-GET association and stop the C-MOVE storage SCP, where open."""
        held, self._held = self._held, None
        if held is not None and held[0].is_established:
            held[0].release()
        scp, self._scp = self._scp, None
        if scp is not None:
            scp.shutdown()

    @contextmanager
    def _find_association(self) -> Iterator[Any]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND  # noqa: PLC0415

        ae = self._ae()
        ae.add_requested_context(FIND)
        with self._association(ae) as assoc:
            yield assoc

    def find(self, level: str, query: dict[str, str], *, fields: Sequence[str], assoc: Any = None) -> list[Dataset]:
        """C-FIND (Study Root) at ``level``: matching identifiers with ``fields`` returned.

        ``assoc``: an open association with the C-FIND context (default: one for this query)."""
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND  # noqa: PLC0415

        if assoc is None:
            with self._find_association() as own:
                return self.find(level, query, fields=fields, assoc=own)
        identifier = Dataset()
        identifier.QueryRetrieveLevel = level
        for keyword in fields:
            setattr(identifier, keyword, query.get(keyword, ""))
        found = []
        for status, answer in assoc.send_c_find(identifier, FIND):
            code = _status(status)
            if code in _PENDING and answer is not None:
                found.append(answer)
            elif code != _SUCCESS:
                raise DimseFailure("status", f"C-FIND answered status 0x{code:04X}")
        return found

    def search_for_series(self, *, fields: Sequence[str] = (), search_filters: dict[str, str] | None = None,
                          get_remaining: bool = True) -> list[dict]:
        """Series of every study (study-level then series-level C-FIND) as DICOM JSON, like QIDO-RS."""
        del fields, get_remaining  # always the fields the cohort needs, always every match
        study_filters = {"StudyDate": _date_range(*self.study_date)}
        if (search_filters or {}).get("Modality"):  # only studies holding the modality, where the PACS matches it
            study_filters["ModalitiesInStudy"] = search_filters["Modality"]
        answers = []
        with self._find_association() as assoc:  # one association for the study query and its series queries
            studies = self.find("STUDY", study_filters, fields=(*_STUDY_FIELDS, "ModalitiesInStudy"), assoc=assoc)
            for study in studies:
                series = self.find("SERIES", {"StudyInstanceUID": study.StudyInstanceUID, **(search_filters or {})},
                                   fields=("StudyInstanceUID", *_SERIES_FIELDS), assoc=assoc)
                for item in series:
                    for keyword in _STUDY_FIELDS:
                        setattr(item, keyword, study.get(keyword, ""))
                    answers.append(item.to_json_dict())
        return answers

    def search_for_instances(self, study_instance_uid: str, series_instance_uid: str, *,
                             fields: Sequence[str] = (), get_remaining: bool = True) -> list[dict]:
        """The instances of one series (image-level C-FIND) as DICOM JSON."""
        del fields, get_remaining
        found = self.find("IMAGE", {"StudyInstanceUID": study_instance_uid, "SeriesInstanceUID": series_instance_uid},
                          fields=("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"))
        for item in found:
            self._sop_classes[str(item.SOPInstanceUID)] = str(item.get("SOPClassUID", ""))
        return [item.to_json_dict() for item in found]

    def retrieve_instance(self, study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str,
                          *, media_types: Any = None) -> Dataset:
        """One instance by C-GET (the PACS sends it back over the same association)."""
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET  # noqa: PLC0415

        del media_types
        sop_class = self._sop_classes.get(sop_instance_uid) or self._sop_class(
            study_instance_uid, series_instance_uid, sop_instance_uid)
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "IMAGE"
        identifier.StudyInstanceUID, identifier.SeriesInstanceUID = study_instance_uid, series_instance_uid
        identifier.SOPInstanceUID = sop_instance_uid
        if self.settings.retrieve == "move":
            return self._move(identifier, sop_class)
        for attempt in (1, 2):  # a held association the PACS dropped meanwhile is opened again, once
            reused = self._held is not None
            assoc, self._received = self._get_association(sop_class), []
            try:
                for status, _ in assoc.send_c_get(identifier, GET):
                    code = _status(status)
                    if code not in _PENDING and code != _SUCCESS:
                        raise DimseFailure("status", f"C-GET of instance {sop_instance_uid} answered status "
                                                     f"0x{code:04X}")
                break
            except DimseFailure as failure:
                self.close()
                if failure.kind != "unreachable" or not reused or attempt == 2:
                    raise
        if len(self._received) != 1:
            raise DimseFailure("status", f"C-GET of instance {sop_instance_uid} returned {len(self._received)} "
                                         "instances")
        return self._received[0]

    def _move(self, identifier: Dataset, sop_class: str) -> Dataset:
        """C-MOVE one instance to our own storage SCP (the PACS opens an association to it)."""
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE  # noqa: PLC0415

        sop = str(identifier.SOPInstanceUID)
        self._storage_scp(sop_class)
        ae = self._ae()
        ae.add_requested_context(MOVE)
        with self._association(ae) as assoc:
            for status, _ in assoc.send_c_move(identifier, self.settings.calling_ae, MOVE):
                code = _status(status)
                if code not in _PENDING and code != _SUCCESS:
                    raise DimseFailure("status", f"C-MOVE of instance {sop} to {self.settings.calling_ae} answered "
                                                 f"status 0x{code:04X} (is the AE title registered at the PACS "
                                                 f"with this host and port {self.settings.move_port}?)")
        if sop not in self._moved:
            raise DimseFailure("status", f"C-MOVE of instance {sop}: the PACS sent nothing to port "
                                         f"{self.settings.move_port}")
        return self._moved.pop(sop)

    def _storage_scp(self, sop_class: str) -> None:
        """Our storage SCP for C-MOVE, accepting only the PACS's AE title (started again for a new SOP class)."""
        from pynetdicom import ALL_TRANSFER_SYNTAXES, evt  # noqa: PLC0415

        if self._scp is not None and sop_class in self._scp_classes:
            return
        if self._scp is not None:
            self._scp.shutdown()
        classes = sorted({c for c in self._sop_classes.values() if c} | {sop_class})[:_MAX_STORAGE_CONTEXTS]
        ae = self._ae()
        ae.require_calling_aet = [self.settings.called_ae]
        for uid in classes:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)

        def on_store(event: Any) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            self._moved[str(ds.SOPInstanceUID)] = ds
            return _SUCCESS

        self._scp = ae.start_server((self.settings.move_bind, self.settings.move_port), block=False,
                                    ae_title=self.settings.calling_ae, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        self._scp_classes = frozenset(classes)

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self._received.append(ds)
        return _SUCCESS

    def _get_association(self, sop_class: str) -> Any:
        """The held C-GET association if it can receive ``sop_class``, else a new one for every class seen."""
        from pynetdicom import ALL_TRANSFER_SYNTAXES, build_role, evt  # noqa: PLC0415
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET  # noqa: PLC0415

        if self._held is not None and self._held[0].is_established and sop_class in self._held[1]:
            return self._held[0]
        self.close()
        others = sorted({c for c in self._sop_classes.values() if c} - {sop_class})
        classes = [sop_class, *others[:_MAX_STORAGE_CONTEXTS - 1]]
        ae = self._ae()
        ae.add_requested_context(GET)
        for uid in classes:
            ae.add_requested_context(uid, ALL_TRANSFER_SYNTAXES)  # as the PACS stored it: no transcoding
        assoc = self._open(ae, ext_neg=[build_role(uid, scp_role=True) for uid in classes],
                           evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self._held = (assoc, frozenset(classes))
        return assoc

    def _sop_class(self, study: str, series: str, sop: str) -> str:
        self.search_for_instances(study, series)
        if sop not in self._sop_classes:
            raise DimseFailure("status", f"instance {sop} is not in series {series}")
        return self._sop_classes[sop]

    def store_instances(self, datasets: Sequence[Dataset]) -> None:
        """C-STORE each dataset (one association; its SOP class in its own transfer syntax)."""
        ae = self._ae()
        for ds in datasets:
            syntax = ds.file_meta.TransferSyntaxUID if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else None
            ae.add_requested_context(ds.SOPClassUID, [syntax] if syntax else None)
        with self._association(ae) as assoc:
            for ds in datasets:
                code = _status(assoc.send_c_store(ds))
                if code != _SUCCESS:
                    raise DimseFailure("status", f"C-STORE of {ds.SOPInstanceUID} answered status 0x{code:04X}")


def _status(status: Dataset | None) -> int:
    """A DIMSE status code; an empty status (timeout, aborted association) is a failure."""
    if status is None or "Status" not in status:
        raise DimseFailure("unreachable", "the association was aborted or timed out")
    return int(status.Status)
