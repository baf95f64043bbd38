"""``drdd-med simulate-ldct IN OUT --dose 0.25``: a simulated low-dose scan of a full-dose CT.

NIfTI or MetaImage in -> NIfTI or MetaImage out (OUT's extension picks the format), written
atomically as int16 HU on exactly the input grid. A DICOM series (folder or file) in -> a derived
DICOM CT series in the folder OUT, marked synthetic, with the source's study and frame of
reference. The noise model is ``drdd_med.ldct`` (projection-domain noise insertion, fan beam).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from drdd_med import __version__
from drdd_med.data.dicom import read_dicom_series, scan_dicom_series
from drdd_med.data.dicom_writer import write_derived_ct_series
from drdd_med.data.readers import DICOM_SUFFIXES, load_volume
from drdd_med.data.writers import write_volume
from drdd_med.errors import DRDDInputError, OutputExistsError
from drdd_med.ldct import check_dose_fraction, simulate_low_dose

logger = logging.getLogger(__name__)

FILE_SUFFIXES = (".nii", ".nii.gz", ".mha")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "simulate-ldct",
        help="simulate a low-dose CT scan from a full-dose CT (projection-domain noise)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_io_arguments(parser, "full-dose CT")
    parser.add_argument("--dose", type=float, required=True, help="fraction of the full dose, in (0, 1], e.g. 0.25")
    parser.set_defaults(func=run)


def add_io_arguments(parser: argparse.ArgumentParser, source: str) -> None:
    """IN, OUT, --seed, --device and --overwrite of a simulation command whose input is a ``source`` in HU."""
    parser.add_argument("input", type=Path, help=f"{source} in HU: .nii, .nii.gz, .mha, or a DICOM folder or file")
    parser.add_argument("output", type=Path, help="output file (.nii, .nii.gz, .mha) or, for DICOM input, a folder")
    parser.add_argument(
        "--seed", type=int, default=0, help="noise seed; the same seed gives the same output (default 0)"
    )
    parser.add_argument("--device", default="cpu", help="torch device to compute on, e.g. cuda (default cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def _is_dicom(path: Path) -> bool:
    return path.is_dir() or path.name.lower().endswith(DICOM_SUFFIXES)


def simulate_file(
    args: argparse.Namespace,
    simulate: Callable[[np.ndarray, np.ndarray, str], np.ndarray],
    command: str,
    settings: str,
    series_description: str,
) -> int:
    """Read ``args.input``, write ``simulate(volume_hu, in_plane_spacing_mm, name)`` to ``args.output``.

    ``command``, ``settings`` (e.g. ``"dose 0.25 seed 0"``) and ``series_description`` label a
    DICOM output. Logs neither file names nor paths (they may name the patient).
    """
    source, output = Path(args.input), Path(args.output)
    if not source.exists():
        raise FileNotFoundError(f"{source.name}: no such file or folder")
    dicom = _is_dicom(source)
    if not dicom and not output.name.lower().endswith(FILE_SUFFIXES):
        raise DRDDInputError(f"{output.name}: output must end in .nii, .nii.gz or .mha")
    if output.exists() and not args.overwrite:
        raise OutputExistsError(f"{output}: output exists already; pass --overwrite to replace it")

    if dicom:
        reference = scan_dicom_series(source, expected_modality="CT")
        volume = read_dicom_series(reference)
    else:
        volume = load_volume(source)
    affine = np.asarray(volume.affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :2], axis=0)
    start = time.perf_counter()
    simulated = simulate(volume.numpy(), spacing, source.name)
    logger.info(
        "%s: %s, %s voxels in %.1f s",
        command,
        settings,
        "x".join(map(str, simulated.shape)),
        time.perf_counter() - start,
    )
    if dicom:
        write_derived_ct_series(
            simulated,
            reference,
            output,
            model_name=f"drdd_med {command}",
            model_version=f"{__version__} {settings}",
            series_description=series_description,
            overwrite=args.overwrite,
        )
    else:
        write_volume(simulated, affine, output, overwrite=args.overwrite)
    logger.info("%s: output written", command)
    return 0


def run(args: argparse.Namespace) -> int:
    dose = check_dose_fraction(args.dose)
    return simulate_file(
        args,
        lambda volume, spacing, name: simulate_low_dose(
            volume, spacing, dose, seed=args.seed, device=args.device, name=name
        ),
        "simulate-ldct",
        f"dose {dose:g} seed {args.seed}",
        f"SYNTHETIC LOW-DOSE CT {100 * dose:g}% DOSE",
    )
