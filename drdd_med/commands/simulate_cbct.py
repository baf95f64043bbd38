"""``drdd-med simulate-cbct IN OUT``: a simulated cone-beam CT (CBCT) of a CT.

NIfTI or MetaImage in -> NIfTI or MetaImage out (OUT's extension picks the format), written
atomically as int16 HU on exactly the input grid. A DICOM series (folder or file) in -> a derived
DICOM CT series in the folder OUT, marked synthetic, with the source's study and frame of
reference. The model is ``drdd_med.cbct`` (scatter, noise, truncated field of view and miscalibrated
HU of a linac-mounted CBCT, in the projection domain; see docs/cbct.md).
"""

from __future__ import annotations

import argparse

from drdd_med import cbct
from drdd_med.commands.simulate_ldct import add_io_arguments, simulate_file


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "simulate-cbct",
        help="simulate a linac CBCT from a CT (projection-domain scatter, noise, truncation)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_io_arguments(parser, "CT")
    physics = parser.add_argument_group("CBCT physics")
    physics.add_argument(
        "--fov-mm",
        type=float,
        default=cbct.FOV_DIAMETER_MM,
        help="field-of-view diameter at the isocentre (%(default)s)",
    )
    physics.add_argument(
        "--scatter-to-primary",
        type=float,
        default=cbct.SCATTER_TO_PRIMARY,
        help="scatter-to-primary ratio behind 200 mm of water; 0: no scatter (%(default)s)",
    )
    physics.add_argument(
        "--scatter-kernel-mm",
        type=float,
        default=cbct.SCATTER_KERNEL_MM,
        help="sigma of the scatter's spread at the detector (%(default)s)",
    )
    physics.add_argument(
        "--photons", type=float, default=cbct.INCIDENT_PHOTONS, help="incident photons per ray (%(default)s)"
    )
    physics.add_argument(
        "--electronic-noise",
        type=float,
        default=cbct.ELECTRONIC_NOISE_COUNTS,
        help="electronic noise standard deviation in counts (%(default)s)",
    )
    physics.add_argument(
        "--hu-scale", type=float, default=cbct.HU_SCALE, help="CBCT = scale * HU + offset (%(default)s)"
    )
    physics.add_argument("--hu-offset", type=float, default=cbct.HU_OFFSET, help="in HU (%(default)s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    def simulate(volume, spacing, name):
        return cbct.simulate_cbct(
            volume,
            spacing,
            args.seed,
            fov_diameter_mm=args.fov_mm,
            scatter_to_primary=args.scatter_to_primary,
            scatter_kernel_mm=args.scatter_kernel_mm,
            incident_photons=args.photons,
            electronic_noise_counts=args.electronic_noise,
            hu_scale=args.hu_scale,
            hu_offset=args.hu_offset,
            device=args.device,
            name=name,
        )

    settings = f"fov {args.fov_mm:g} spr {args.scatter_to_primary:g} seed {args.seed}"  # DICOM: at most 64 characters
    return simulate_file(args, simulate, "simulate-cbct", settings, "SYNTHETIC CBCT")
