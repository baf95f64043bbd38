"""Batch conversion between DICOM folders and PACS (DIMSE, DICOMweb): each source series once into a synthetic series.

Layers, each crossed once per series: a source (``endpoints``, ``dimse``, ``dicomweb``) finds and
fetches series; the DICOM reader and ``drdd_med.bundle.BundleTranslator`` make the synthetic
volume; the derived-CT writer makes the series; a destination delivers it. ``convert`` runs the
batch with the SQLite ``journal`` and PHI-safe logging (``phi``).
"""

from drdd_med.pacs.convert import BatchConverter, Report, SeriesResult
from drdd_med.pacs.endpoints import SeriesRef, SeriesRules, TransferError, open_destination, open_source
from drdd_med.pacs.journal import Journal, JournalLockedError
