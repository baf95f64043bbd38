"""Keeping patient data out of logs and reports of batch conversions.

Series and studies are named by a keyed hash of their UID (HMAC-SHA256, the key kept in the job
journal, so the same series has the same name in every run of one journal and cannot be looked
up from the UID without the key). Messages of errors, which may quote UIDs, file paths or header
values, pass through ``Redactor`` before they are logged or reported. The network libraries'
own logging of identifiers and URLs is turned off.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import re
from collections.abc import Iterable, Iterator

# A UID: at least three dot-separated numeric components (e.g. in URLs or exception texts).
UID_PATTERN = re.compile(r"(?<![\w.])[0-2](?:\.\d+){3,}(?![\w.])")
MIN_REDACTED_LENGTH = 3  # shorter strings (initials) would blank out ordinary words
REDACTED = "[redacted]"


def quiet_network_logging() -> None:
    """Stop pynetdicom, dicomweb-client and urllib3 from logging identifiers, UIDs or URLs.

    pynetdicom logs C-FIND identifiers (patient names) at INFO and UIDs at DEBUG;
    dicomweb-client and urllib3 log URLs, which carry study and series UIDs. Failures are
    reported by drdd_med itself, redacted.
    """
    import pynetdicom

    pynetdicom._config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom._config.LOG_RESPONSE_IDENTIFIERS = False
    logging.getLogger("pynetdicom").setLevel(logging.ERROR)  # association failures only, no data
    logging.getLogger("dicomweb_client").setLevel(logging.CRITICAL + 1)  # even its errors quote UIDs
    logging.getLogger("urllib3").setLevel(logging.ERROR)


class Redactor:
    """Names UIDs by keyed hashes and hides known patient strings and paths in free text."""

    def __init__(self, key: bytes):
        self.key = key
        self._hidden: set[str] = set()

    def uid(self, uid: str, prefix: str = "") -> str:
        """A short, stable, keyed name for a UID, e.g. ``series:3f9a01c2d4e5``."""
        digest = hmac.new(self.key, uid.encode(), hashlib.sha256).hexdigest()[:12]
        return f"{prefix}:{digest}" if prefix else digest

    def hide(self, values: Iterable[object]) -> None:
        """Remember strings (ids, dates, paths) to remove from every later message."""
        for value in values:
            text = str(value or "").strip()
            if len(text) >= MIN_REDACTED_LENGTH:
                self._hidden.add(text)

    def hide_header(self, header) -> None:
        """Hide the patient-identifying values of a DICOM header, and each part of the patient's name."""
        name = str(header.get("PatientName") or "")
        self.hide([name, *re.split(r"[\^=\s]+", name)])
        self.hide(str(header.get(keyword) or "") for keyword in ("PatientID", "PatientBirthDate", "AccessionNumber"))

    def __call__(self, text: str) -> str:
        text = UID_PATTERN.sub(lambda match: self.uid(match.group(0), "uid"), str(text))
        for value in sorted(self._hidden, key=len, reverse=True):  # whole strings before their parts
            text = text.replace(value, REDACTED)
        return text


class _RedactingFilter(logging.Filter):
    def __init__(self, redact: Redactor):
        super().__init__()
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.redact(record.getMessage()), ()
        return True


@contextlib.contextmanager
def redacted_logging(redact: Redactor) -> Iterator[None]:
    """Pass every record reaching the root logger's handlers through ``redact`` (UIDs, names, paths).

    Messages of the reader and writer name series by number and description; this catches the
    rare description or file name that carries a patient's name, and any UID in any message.
    """
    handlers, redacting = list(logging.getLogger().handlers), _RedactingFilter(redact)
    for handler in handlers:
        handler.addFilter(redacting)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(redacting)
