"""One held-out case side by side: the source | each method's output | the reference CT, and each error.

Reads the outputs that ``scripts/compare_methods.py --work-dir WORK`` keeps (``WORK/<method>/<variant>/
<case>/sct.nii.gz``) and the case's prepared files (``<dataset>/Task1/<region>/<case>/{mr,ct,mask}.nii.gz``,
found by case id), and saves a PNG: top row the middle axial slice in a CT window, bottom row the
absolute error against the CT inside the body mask. Example, the IBSI figure of the mr2ct README::

    python scripts/compare_figure.py --dataset-dir PREPARED --case STS_025 \\
        --panel "U-Net=WORK_U/regression/translation" --panel "DRDD=WORK_D/drdd/default" \\
        --output docs/images/mr2ct_ibsi_STS_025.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from drdd_med.errors import DRDDInputError
from drdd_med.evaluation import check_same_grid, read_volume
from drdd_med.visualize import mid_axial, save_panels

CT_WINDOW = (-300.0, 700.0)  # soft tissue to cortical bone: limbs show muscle, fat and bone apart
ERROR_RANGE = (0.0, 300.0)  # HU


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-dir", type=Path, required=True, help="the prepared SynthRAD-layout folder")
    parser.add_argument("--case", required=True, help="a held-out case id")
    parser.add_argument("--panel", action="append", required=True, metavar="LABEL=DIR",
                        help="a method's output folder (holding <case>/sct.nii.gz), in display order")
    parser.add_argument("--output", type=Path, required=True, help="PNG to write (refused if it exists)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return parser.parse_args(argv)


def case_files(dataset_dir: Path, case: str) -> Path:
    """The folder of ``case`` in a SynthRAD layout (``Task1/<region>/<case>``)."""
    found = sorted(p for p in dataset_dir.glob(f"Task1/*/{case}") if p.is_dir())
    if len(found) != 1:
        raise DRDDInputError(f"{case}: {'no' if not found else 'more than one'} case folder of this id in the dataset")
    return found[0]


def figure(args: argparse.Namespace) -> Path:
    folder = case_files(args.dataset_dir, args.case)
    mr, _ = read_volume(folder / "mr.nii.gz", "MR", args.case)
    ct, ct_affine = read_volume(folder / "ct.nii.gz", "CT", args.case)
    mask, _ = read_volume(folder / "mask.nii.gz", "mask", args.case)
    mr_slice = mid_axial(mr)
    top = [("MR", mr_slice, tuple(float(v) for v in np.percentile(mr_slice, [0.5, 99.5])))]
    bottom = [("body mask", mid_axial(mask), (0.0, 1.0))]
    for text in args.panel:
        label, sep, directory = text.partition("=")
        if not sep or not label:
            raise DRDDInputError(f"--panel {text!r}: expected LABEL=DIR")
        sct, affine = read_volume(Path(directory) / args.case / "sct.nii.gz", f"{label} output", args.case)
        check_same_grid(args.case, f"{label} output", sct.shape, affine, ct.shape, ct_affine)
        error = np.abs(sct - ct) * (mask > 0)
        mae = float(error.sum() / max((mask > 0).sum(), 1))
        top.append((label, mid_axial(sct), CT_WINDOW))
        bottom.append((f"|{label} − CT|, case MAE {mae:.0f} HU", mid_axial(error), ERROR_RANGE))
    top.append(("CT", mid_axial(ct), CT_WINDOW))
    bottom.append(("", None, None))
    return save_panels(args.output, top + bottom, rows=2, overwrite=args.overwrite,
                       title=f"{args.case}, middle axial slice: CT window {CT_WINDOW[0]:.0f} to {CT_WINDOW[1]:.0f} HU, "
                             f"errors 0 to {ERROR_RANGE[1]:.0f} HU inside the body mask",
                       cmaps=["gray"] * (len(top) + 1) + ["magma"] * (len(bottom) - 1))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        print(figure(args))
    except (DRDDInputError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
