"""A PACS over DIMSE (pynetdicom): C-FIND to find series, C-GET or C-MOVE to fetch them, C-STORE to send.

Every association outcome and every response status is checked: a rejected or aborted
association, a missing response (timeout, dropped connection), a failure or warning status, or
fewer instances received than C-FIND counted all raise ``TransferError``. pynetdicom never
transcodes, so C-GET and our C-MOVE storage SCP accept the common compressed transfer syntaxes
(the reader decodes them) and C-STORE proposes each file's own transfer syntax.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, AllStoragePresentationContexts, StoragePresentationContexts, build_role, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.status import code_to_category

from drdd_med.pacs.endpoints import SeriesRef, SeriesRules, TransferError
from drdd_med.pacs.phi import quiet_network_logging

RECEIVE_TRANSFER_SYNTAXES = [
    dicom_uid.ExplicitVRLittleEndian,
    dicom_uid.ImplicitVRLittleEndian,
    dicom_uid.DeflatedExplicitVRLittleEndian,
    dicom_uid.JPEG2000Lossless,
    dicom_uid.JPEG2000,
    dicom_uid.JPEGLosslessSV1,
    dicom_uid.JPEGLossless,
    dicom_uid.JPEGBaseline8Bit,
    dicom_uid.JPEGExtended12Bit,
    dicom_uid.JPEGLSLossless,
    dicom_uid.RLELossless,
]
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
REJECTED_PERMANENT, REJECTED_TRANSIENT = 0x01, 0x02  # A-ASSOCIATE-RJ results
REJECTED_BY_SERVICE_USER = 0x01  # result source: the PACS itself (not its ACSE or presentation layer)
CALLING_AE_NOT_RECOGNISED, CALLED_AE_NOT_RECOGNISED = 0x03, 0x07  # the service user's diagnostics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DimseNode:
    """A DICOM application entity: AE title, host and port."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, spec: str) -> DimseNode:
        """``dimse://AET@host:port``."""
        rest = spec.removeprefix("dimse://")
        ae_title, at, address = rest.rpartition("@")
        host, colon, port = address.rpartition(":")
        if not (at and colon and ae_title and host and port.isdigit()):
            raise ValueError(f"{spec!r}: a DIMSE address is dimse://AET@host:port")
        return cls(ae_title, host, int(port))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def _status(response: Dataset, operation: str) -> tuple[int, str]:
    """(status code, category) of a response; no response at all is a dropped or timed-out association."""
    if "Status" not in response:
        raise TransferError(f"{operation}: no response (association aborted, dropped or timed out)")
    code = int(response.Status)
    return code, code_to_category(code)


def _failure(operation: str, code: int, response: Dataset) -> TransferError:
    comment = f" ({response.ErrorComment})" if response.get("ErrorComment") else ""
    return TransferError(f"{operation}: status 0x{code:04X}{comment}")


def _rejection_of(assoc: Association) -> A_ASSOCIATE | None:
    """The A-ASSOCIATE-RJ of an association that was not established, None if it was not rejected.

    pynetdicom checks the socket before it reads the reply: when the PACS closes the connection
    right after rejecting (Orthanc often does), the association looks aborted and the rejection is
    left unread in the DUL's queue, where it is found here.
    """
    if assoc.is_rejected:
        return assoc.acceptor.primitive
    unread = list(assoc.dul.to_user_queue.queue)
    rejected = (REJECTED_PERMANENT, REJECTED_TRANSIENT)
    return next((p for p in unread if isinstance(p, A_ASSOCIATE) and p.result in rejected), None)


class _Inbox:
    """Writes the instances a C-STORE sub-operation delivers into the folder of the current fetch."""

    def __init__(self):
        self.folder: Path | None = None
        self.count = 0
        self._lock = threading.Lock()

    @contextmanager
    def receiving(self, folder: Path) -> Iterator[None]:
        folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self.folder, self.count = folder, 0
        try:
            yield
        finally:
            with self._lock:
                self.folder = None

    def on_c_store(self, event) -> int:
        with self._lock:
            if self.folder is None:  # nothing asked for: refuse rather than keep stray patient data
                return STATUS_OUT_OF_RESOURCES
            self.count += 1
            path = self.folder / f"{self.count:06d}.dcm"
        try:
            path.write_bytes(event.encoded_dataset())
        except OSError:
            return STATUS_OUT_OF_RESOURCES
        return STATUS_SUCCESS


class _DimseClient:
    """The association handling shared by the source and the destination."""

    def __init__(self, remote: DimseNode, calling_aet: str = "DRDD", timeout: float = 30.0):
        quiet_network_logging()
        self.remote = remote
        self.calling_aet = calling_aet
        self.timeout = timeout
        self.description = f"DIMSE {remote}"
        self.private: tuple[str, ...] = ()
        self.key = f"dimse:{remote}"

    def __reduce__(self):
        """Pickled as what opens it: a Ray worker opens its own client (quiet logging included)."""
        return type(self), (self.remote, self.calling_aet, self.timeout)

    def _ae(self) -> AE:
        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = self.timeout
        return ae

    @contextmanager
    def _association(self, ae: AE, operation: str, **kwargs) -> Iterator[Association]:
        assoc = ae.associate(self.remote.host, self.remote.port, ae_title=self.remote.ae_title, **kwargs)
        if not assoc.is_established:
            rejection = _rejection_of(assoc)
            if rejection is not None:
                raise self._rejection(operation, rejection)
            raise TransferError(f"{operation}: no association with {self.remote} (unreachable, or aborted)")
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def _rejection(self, operation: str, why: A_ASSOCIATE) -> TransferError:
        """The error for an A-ASSOCIATE-RJ: a hint at the AE title the PACS named; not retried if permanent."""
        message = (f"{operation}: association rejected by {self.remote} "
                   f"({why.result_str}, {why.source_str}: {why.reason_str})")
        if why.result_source == REJECTED_BY_SERVICE_USER and why.diagnostic == CALLED_AE_NOT_RECOGNISED:
            message += f"; is {self.remote.ae_title} the PACS's own AE title (the called AE title)?"
        elif why.result_source == REJECTED_BY_SERVICE_USER and why.diagnostic == CALLING_AE_NOT_RECOGNISED:
            message += f"; is our AE title {self.calling_aet} registered there?"
        return TransferError(message, retryable=why.result != REJECTED_PERMANENT)

    def _find(self, assoc: Association, query: Dataset) -> list[Dataset]:
        matches = []
        for response, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            code, category = _status(response, "C-FIND")
            if category == "Pending":
                if identifier is not None:
                    matches.append(identifier)
            elif category == "Success":
                return matches
            else:
                raise _failure("C-FIND", code, response)
        raise TransferError("C-FIND: the response ended without a final status")

    def close(self) -> None:
        pass


class DimseSource(_DimseClient):
    """Series from a PACS: study-level then series-level C-FIND, and C-GET or C-MOVE per series.

    ``retrieve="move"`` runs our own storage SCP on ``move_port`` (``move_host`` interface, all by
    default) while the source is open; the PACS must know ``calling_aet`` at that port.
    """

    def __init__(
        self,
        remote: DimseNode,
        calling_aet: str = "DRDD",
        retrieve: str = "get",
        move_port: int | None = None,
        move_host: str = "",
        timeout: float = 30.0,
    ):
        super().__init__(remote, calling_aet, timeout)
        if retrieve not in ("get", "move"):
            raise ValueError(f"retrieve must be 'get' or 'move', got {retrieve!r}")
        if retrieve == "move" and not move_port:
            raise ValueError("C-MOVE retrieval needs the port of our storage SCP (move_port)")
        self.retrieve = retrieve
        self._inbox = _Inbox()
        self._server = None
        if retrieve == "move":
            ae = self._ae()
            for context in AllStoragePresentationContexts:
                ae.add_supported_context(context.abstract_syntax, RECEIVE_TRANSFER_SYNTAXES)
            try:
                self._server = ae.start_server(
                    (move_host, move_port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._inbox.on_c_store)]
                )
            except OSError as err:  # a configuration problem, not a transfer to retry
                raise ValueError(f"cannot listen for C-MOVE on port {move_port}: {err.strerror}") from None

    def __reduce__(self):
        """Pickled as what opens it (a Ray worker opens its own); a C-MOVE source's SCP listens here only."""
        if self.retrieve == "move":
            raise TypeError("a C-MOVE source cannot be used by other processes (its storage SCP listens in this "
                            "one); retrieve by C-GET")
        return DimseSource, (self.remote, self.calling_aet, "get", None, "", self.timeout)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def find(self, rules: SeriesRules) -> list[SeriesRef]:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        refs = []
        with self._association(ae, "C-FIND") as assoc:
            studies = []
            for study_uid in rules.study_uids or [""]:
                query = Dataset()
                query.QueryRetrieveLevel = "STUDY"
                query.StudyInstanceUID = study_uid
                query.StudyDate = rules.study_date_range
                query.ModalitiesInStudy = rules.modality or ""
                studies += self._find(assoc, query)
            for study in studies:
                query = Dataset()
                query.QueryRetrieveLevel = "SERIES"
                query.StudyInstanceUID = study.StudyInstanceUID
                query.SeriesInstanceUID = ""
                query.Modality = rules.modality or ""
                query.SeriesDescription = ""
                query.SeriesNumber = ""
                query.NumberOfSeriesRelatedInstances = ""
                for series in self._find(assoc, query):
                    number, count = series.get("SeriesNumber"), series.get("NumberOfSeriesRelatedInstances")
                    refs.append(
                        SeriesRef(
                            series_uid=str(series.get("SeriesInstanceUID") or ""),
                            study_uid=str(study.StudyInstanceUID),
                            modality=str(series.get("Modality") or ""),
                            description=str(series.get("SeriesDescription") or ""),
                            series_number=int(number) if number not in (None, "") else None,
                            study_date=str(study.get("StudyDate") or ""),
                            num_instances=int(count) if count not in (None, "") else None,
                        )
                    )
        return [ref for ref in refs if ref.series_uid and rules.matches(ref)]

    def fetch(self, ref: SeriesRef, folder: Path) -> Sequence[Path]:
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = ref.study_uid
        query.SeriesInstanceUID = ref.series_uid
        ae = self._ae()
        with self._inbox.receiving(folder):
            if self.retrieve == "get":
                ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
                for context in StoragePresentationContexts:
                    ae.add_requested_context(context.abstract_syntax, RECEIVE_TRANSFER_SYNTAXES)
                roles = [build_role(context.abstract_syntax, scp_role=True) for context in StoragePresentationContexts]
                handlers = [(evt.EVT_C_STORE, self._inbox.on_c_store)]
                with self._association(ae, "C-GET", ext_neg=roles, evt_handlers=handlers) as assoc:
                    self._check_retrieve(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet), "C-GET")
            else:
                ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
                with self._association(ae, "C-MOVE") as assoc:
                    responses = assoc.send_c_move(query, self.calling_aet, StudyRootQueryRetrieveInformationModelMove)
                    self._check_retrieve(responses, "C-MOVE")
            received = self._inbox.count
        if ref.num_instances is not None and received < ref.num_instances:
            raise TransferError(f"{self.retrieve.upper()}: received {received} of {ref.num_instances} instances")
        return sorted(folder.iterdir())

    @staticmethod
    def _check_retrieve(responses, operation: str) -> None:
        for response, _ in responses:
            code, category = _status(response, operation)
            if category == "Pending":
                continue
            failed = int(response.get("NumberOfFailedSuboperations") or 0)
            if category == "Success" and not failed:
                return
            if category == "Warning" or failed:
                raise TransferError(f"{operation}: status 0x{code:04X}, {failed} sub-operation(s) failed")
            raise _failure(operation, code, response)
        raise TransferError(f"{operation}: the response ended without a final status")


class DimseDestination(_DimseClient):
    """C-STORE each file of a series over one association; any status other than success is a failure.

    ``count`` asks the PACS by an image-level C-FIND, so our AE title needs query rights there too.
    """

    def deliver(self, files: Sequence[Path], series_uid: str) -> None:
        metas = [read_file_meta_info(file) for file in files]
        ae = self._ae()
        for sop_class in sorted({str(meta.MediaStorageSOPClassUID) for meta in metas}):
            syntaxes = sorted({str(m.TransferSyntaxUID) for m in metas if m.MediaStorageSOPClassUID == sop_class})
            ae.add_requested_context(sop_class, syntaxes)
        with self._association(ae, "C-STORE") as assoc:
            accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
            refused = {(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas} - accepted
            if refused:
                names = ", ".join(sorted(f"{dicom_uid.UID(c).name} in {dicom_uid.UID(t).name}" for c, t in refused))
                raise TransferError(f"C-STORE: {self.remote} accepts no {names}")
            for sent, file in enumerate(files):
                response = assoc.send_c_store(file)
                if "Status" not in response:
                    raise TransferError(
                        f"C-STORE: no response after {sent} of {len(files)} instances (association dropped or timed out)"
                    )
                code = int(response.Status)
                category = code_to_category(code)
                if category == "Warning":  # stored, perhaps with coerced elements (PS3.4 B.2.3)
                    logger.warning("C-STORE to %s: warning status 0x%04X", self.remote, code)
                elif category != "Success":
                    raise _failure(f"C-STORE of instance {sent + 1} of {len(files)}", code, response)

    def count(self, study_uid: str, series_uid: str) -> int:
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = series_uid
        query.SOPInstanceUID = ""
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        with self._association(ae, "C-FIND (stored instances)") as assoc:
            return len(self._find(assoc, query))

    def withdraw(self, series_uid: str) -> bool:
        """DIMSE has no delete (see ``drdd_med.pacs.endpoints``): a partial series stays for its administrator."""
        return False
