"""A DICOMweb server (dicomweb-client): QIDO-RS to find series, WADO-RS to fetch them, STOW-RS to send.

HTTP errors, connection failures and STOW-RS responses that list failed instances raise
``TransferError`` with the status only: URLs carry study and series UIDs, so they stay out of
messages. dicomweb-client's own retrying is off; ``BatchConverter`` retries.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from drdd_med.data.dicom import quiet_pydicom
from drdd_med.pacs.endpoints import SeriesRef, SeriesRules, TransferError
from drdd_med.pacs.phi import quiet_network_logging

SERIES_FIELDS = ["StudyDate", "SeriesDescription", "SeriesNumber", "NumberOfSeriesRelatedInstances"]


@contextmanager
def _http(operation: str) -> Iterator[None]:
    try:
        yield
    except requests.HTTPError as err:
        response = err.response
        status = f"HTTP {response.status_code} {response.reason}" if response is not None else "HTTP error"
        raise TransferError(f"{operation}: {status}") from None
    except requests.RequestException as err:  # connection refused, timeout, dropped connection
        raise TransferError(f"{operation}: {type(err).__name__} (server unreachable or connection dropped)") from None
    except ValueError as err:  # a response dicomweb-client cannot parse
        raise TransferError(f"{operation}: unreadable response ({type(err).__name__})") from None


class _DicomwebClient:
    """One HTTP session with the server; ``auth`` is (user, password) for HTTP basic authentication."""

    def __init__(self, url: str, auth: tuple[str, str] | None = None, timeout: float = 30.0):
        quiet_network_logging()
        self._opened_with = (url, auth, timeout)
        self._session = requests.Session()
        self._session.auth = auth
        self.client = DICOMwebClient(url.rstrip("/"), session=self._session, timeout=timeout)
        self.client.set_http_retry_params(retry=False)
        self.description = f"DICOMweb {url}"
        self.private: tuple[str, ...] = ()
        self.key = f"dicomweb:{url.rstrip('/')}"

    def __reduce__(self):
        """Pickled as what opens it (credentials included): a Ray worker opens its own session."""
        return type(self), self._opened_with

    def close(self) -> None:
        self._session.close()


class DicomwebSource(_DicomwebClient):
    """Series from QIDO-RS (``/series`` with modality and date filters), instances by WADO-RS."""

    def find(self, rules: SeriesRules) -> list[SeriesRef]:
        filters = {}
        if rules.modality:
            filters["Modality"] = rules.modality
        if rules.study_date_range:
            filters["StudyDate"] = rules.study_date_range
        found = []
        with _http("QIDO-RS"):
            for study_uid in rules.study_uids or [None]:
                found += self.client.search_for_series(
                    study_instance_uid=study_uid, search_filters=filters, fields=SERIES_FIELDS, get_remaining=True
                )
        refs = []
        for item in found:
            with quiet_pydicom():
                series = Dataset.from_json(item)
            number, count = series.get("SeriesNumber"), series.get("NumberOfSeriesRelatedInstances")
            refs.append(
                SeriesRef(
                    series_uid=str(series.get("SeriesInstanceUID") or ""),
                    study_uid=str(series.get("StudyInstanceUID") or ""),
                    modality=str(series.get("Modality") or ""),
                    description=str(series.get("SeriesDescription") or ""),
                    series_number=int(number) if number not in (None, "") else None,
                    study_date=str(series.get("StudyDate") or ""),
                    num_instances=int(count) if count not in (None, "") else None,
                )
            )
        return [ref for ref in refs if ref.series_uid and ref.study_uid and rules.matches(ref)]

    def fetch(self, ref: SeriesRef, folder: Path) -> Sequence[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        with _http("WADO-RS"), quiet_pydicom():
            for index, instance in enumerate(self.client.iter_series(ref.study_uid, ref.series_uid)):
                path = folder / f"{index + 1:06d}.dcm"
                instance.save_as(path, enforce_file_format=True)
                files.append(path)
        if ref.num_instances is not None and len(files) < ref.num_instances:
            raise TransferError(f"WADO-RS: received {len(files)} of {ref.num_instances} instances")
        return files


class DicomwebDestination(_DicomwebClient):
    """STOW-RS of one series per request; every instance must be listed as stored in the response.

    ``count`` asks QIDO-RS for the series' instances, so the user needs search rights too.
    """

    def deliver(self, files: Sequence[Path], series_uid: str) -> None:
        with quiet_pydicom():
            datasets = [pydicom.dcmread(file) for file in files]
        with _http("STOW-RS"):
            response = self.client.store_instances(datasets)
        failed = response.get("FailedSOPSequence") or []
        stored = response.get("ReferencedSOPSequence") or []
        if failed or len(stored) < len(datasets):
            reasons = sorted({f"0x{int(item.FailureReason):04X}" for item in failed if "FailureReason" in item})
            raise TransferError(
                f"STOW-RS: {len(stored)} of {len(datasets)} instances stored"
                + (f", failure reason {', '.join(reasons)}" if reasons else "")
            )

    def count(self, study_uid: str, series_uid: str) -> int:
        with _http("QIDO-RS (stored instances)"):
            found = self.client.search_for_instances(study_instance_uid=study_uid, series_instance_uid=series_uid,
                                                     get_remaining=True)
        return len(found)

    def withdraw(self, series_uid: str) -> bool:
        """DICOMweb has no standard delete (see ``drdd_med.pacs.endpoints``): a partial series stays."""
        return False
