"""``drdd-med prepare-pairs``: raw MR/CT pairs -> the SynthRAD2023 layout the bundles train on."""

from __future__ import annotations

import argparse
from pathlib import Path

from drdd_med.data.pairs import GRIDS, PairCase, PairSettings, find_pair_cases, prepare_pairs, write_report

EXIT_OK, EXIT_FAILED = 0, 1

DESCRIPTION = """\
Put each MR/CT pair on one grid and write OUT_DIR/Task1/<region>/<case>/{mr,ct,mask}.nii.gz, the
layout the drdd_mr2ct bundle reads (set its dataset_dir to OUT_DIR).

For each case the CT is resampled onto the MR's grid (linear, -1024 HU outside the CT; --grid ct
resamples the MR onto the CT's grid instead), optionally after a rigid registration (--register:
Mattes mutual information, kept only if it raises the metric). The body mask is the CT above
-500 HU (largest component, holes filled) where both images have data; both images are cropped to
the mask's bounding box plus --margin-mm, within the common field of view. Each case folder gets a
pair.json record; OUT_DIR/prepare_pairs.{csv,json} list this run's cases.

INPUT_DIR holds one folder per case (its name becomes the case id) with the MR and CT files
(--mr-name, --ct-name; .nii.gz, .nii, .mha, .mhd, .nrrd). --pair CASE MR CT names a pair directly.

A case whose folder exists in OUT_DIR is skipped (--overwrite redoes it). A case with a missing
file, NaN voxels or no overlap between MR and CT is reported and nothing is written for it; the
other cases go on. Exit status: 0 when every case was prepared or skipped, 1 when some failed,
2 for a usage error."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare-pairs",
        help="put raw MR/CT pairs on one grid, mask and crop them, in the SynthRAD layout",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input_dir", metavar="INPUT_DIR", type=Path, nargs="?",
                        help="folder with one subfolder per case (optional with --pair)")
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="dataset folder to write")
    parser.add_argument("--pair", nargs=3, action="append", default=[], metavar=("CASE", "MR", "CT"),
                        help="a case given by its id and files (repeat for more)")
    parser.add_argument("--mr-name", default="mr.nii.gz", help="MR file in each case folder (default: %(default)s)")
    parser.add_argument("--ct-name", default="ct.nii.gz", help="CT file in each case folder (default: %(default)s)")
    parser.add_argument("--grid", choices=GRIDS, default="mr", help="grid to put both images on (default: %(default)s)")
    parser.add_argument("--register", action="store_true", help="refine the alignment with a rigid registration")
    parser.add_argument("--margin-mm", type=float, default=10.0,
                        help="margin around the body mask, in mm (default: %(default)s)")
    parser.add_argument("--region", default="body", help="region folder under Task1 (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the registration's voxel sampling")
    parser.add_argument("--overwrite", action="store_true", help="redo cases already in OUT_DIR")
    parser.set_defaults(func=run)


def _cases(args: argparse.Namespace) -> list[PairCase]:
    """The cases of INPUT_DIR and --pair; none at all, or one id twice, is a usage error."""
    cases = find_pair_cases(args.input_dir, args.mr_name, args.ct_name) if args.input_dir else []
    cases += [PairCase(case_id, Path(mr), Path(ct)) for case_id, mr, ct in args.pair]
    if not cases:
        raise ValueError("give INPUT_DIR or at least one --pair CASE MR CT")
    ids = [case.case_id for case in cases]
    repeated = sorted({case_id for case_id in ids if ids.count(case_id) > 1})
    if repeated:
        raise ValueError(f"case id(s) given more than once: {', '.join(repeated)}")
    return cases


def run(args: argparse.Namespace) -> int:
    settings = PairSettings(grid=args.grid, register=args.register, margin_mm=args.margin_mm,
                            region=args.region, seed=args.seed)
    records = prepare_pairs(_cases(args), args.out_dir, settings, overwrite=args.overwrite)
    csv_path, _ = write_report(records, args.out_dir)
    counts = {status: sum(r["status"] == status for r in records) for status in ("prepared", "skipped", "failed")}
    print(f"{counts['prepared']} prepared, {counts['skipped']} skipped, {counts['failed']} failed; "
          f"report {csv_path.name} in {args.out_dir}")
    for record in records:
        if record["status"] == "failed":
            print(f"  {record['error']}")
    return EXIT_FAILED if counts["failed"] else EXIT_OK
