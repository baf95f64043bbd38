"""``drdd-med export MODEL OUT_DIR``: a trained model's networks as TorchScript and ONNX files.

MODEL is a ``model.pt`` (or a training checkpoint) of a bundle, loaded with ``weights_only``.
OUT_DIR gets ``NAME.ts`` per trained network (DRDD: residual, noise; conditional DDIM: denoise;
regression: regression), ``NAME.onnx`` where the onnx, onnxscript and onnxruntime packages are
installed (pip install "drdd-med[export]") and the network converts, and ``manifest.json``: the
model record, each file's input signature, sha256 and checked difference from eager, the versions.
Every file is run on two seeded inputs of different valid shapes and compared with the eager
network; a difference above the tolerance (default 1e-4) is an error and nothing is written.
Diffusion networks are traced on --device and run there only; the regression model is scripted.
The folder appears complete or not at all; an existing export is replaced only with --overwrite.
The sampler is not exported: the manifest holds its settings (see drdd_med.diffusion).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from drdd_med.errors import OutputExistsError
from drdd_med.export import MANIFEST_NAME, TOLERANCE, export_model


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a trained model's networks as TorchScript (and ONNX) files with a manifest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", type=Path, help="weights file, e.g. bundles/drdd_mr2ct/models/model.pt")
    parser.add_argument("out_dir", type=Path, help="output folder (must not exist, unless --overwrite)")
    parser.add_argument("--no-onnx", action="store_true", help="write TorchScript files only")
    parser.add_argument("--device", default="cpu",
                        help="device the diffusion networks are traced on, and so run on (default cpu)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help="largest accepted max |exported - eager| (default %(default)g)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is an earlier export")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.out_dir.exists() and not args.overwrite:  # before the model is read: say it in the command's terms
        raise OutputExistsError(f"{args.out_dir}: output exists already; pass --overwrite to replace an earlier export")
    manifest = export_model(args.model, args.out_dir, overwrite=args.overwrite, onnx=not args.no_onnx,
                            device=args.device, tolerance=args.tolerance)
    written = []
    for file_format, label in (("torchscript", "TorchScript"), ("onnx", "ONNX")):
        names = [entry["file"] for entry in manifest["files"] if entry["format"] == file_format]
        if names:
            written.append(f"{label} {', '.join(names)}")
    print(f"wrote {args.out_dir}: {'; '.join(written)}; {MANIFEST_NAME}")
    for entry in manifest["files"]:
        how = f"{entry['conversion']}, " if "conversion" in entry else f"opset {entry['opset']}, "
        print(f"  {entry['file']}: {how}runs on {entry['device']}, max |exported - eager| "
              f"{entry['max_abs_difference']:.2g} <= {manifest['tolerance']:g}")
    for note in manifest["skipped"]:
        print(f"  not written: {note['what']}: {note['why']}")
    return 0
