"""``drdd-med demo-data``: write the built-in demo dataset of paired MR/CT head phantoms."""

from __future__ import annotations

import argparse
from pathlib import Path

from drdd_med.data.demo import DEFAULT_SHAPE, DEFAULT_SPACING, write_demo_dataset


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo-data",
        help="write a demo dataset of synthetic paired MR/CT head phantoms",
        description="Write seeded, synthetic head phantoms (T1-like MR, CT in HU, body mask) in the "
        "SynthRAD2023 layout: OUT_DIR/Task1/brain/1BA001/{mr,ct,mask}.nii.gz ... for paired cases and "
        "OUT_DIR/ct_pool/1BP001.nii.gz ... (CT only, other subjects) for an unpaired target pool. "
        "The same arguments always give the same voxel data. No patient data is involved.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="folder to write the dataset to")
    parser.add_argument("--paired", type=int, default=16, metavar="N", help="number of paired MR/CT cases")
    parser.add_argument("--unpaired", type=int, default=8, metavar="N", help="number of CT-only pool cases")
    parser.add_argument(
        "--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("X", "Y", "Z"), help="voxels per axis"
    )
    parser.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=list(DEFAULT_SPACING),
        metavar=("X", "Y", "Z"),
        help="voxel spacing in mm (axial slices along Z)",
    )
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument("--overwrite", action="store_true", help="replace a demo dataset already in OUT_DIR")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    summary = write_demo_dataset(
        args.out_dir,
        num_paired=args.paired,
        num_unpaired=args.unpaired,
        shape=args.shape,
        spacing=args.spacing,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(
        f"wrote {summary['num_paired']} paired and {summary['num_unpaired']} unpaired demo cases "
        f"({'x'.join(map(str, summary['shape']))} voxels at {'x'.join(f'{s:g}' for s in summary['spacing'])} mm, "
        f"seed {summary['seed']}) to {args.out_dir}"
    )
    return 0
