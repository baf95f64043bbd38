"""Exceptions for input a user can fix.

Every message names the file or case (never patient data) and the problem. They subclass the
built-in types callers already catch (``ValueError``, ``FileExistsError``), so the CLI reports them
on stderr with exit code 2.
"""


class DRDDInputError(ValueError):
    """Input data that drdd_med refuses: wrong shape, grid, modality, values or structure."""


class NonFiniteError(DRDDInputError):
    """NaN or infinite voxels."""


class GridMismatchError(DRDDInputError):
    """Images that must share a voxel grid (shape, affine) do not."""


class GeometryError(DRDDInputError):
    """A DICOM series whose slices do not form a regular volume (duplicates, gaps, tilt, mixed orientation)."""


class SeriesSelectionError(DRDDInputError):
    """Several series match and none was chosen explicitly, or none matches the selection."""


class VolumeTooLargeError(DRDDInputError):
    """A volume that exceeds the configured memory limit."""


class OutputExistsError(FileExistsError):
    """An output exists already and overwriting was not requested."""
