"""Does DRDD's noise stage, trained on full-dose CT only, help low-dose CT denoising? Measure it.

The drdd_ldct bundle samples with the residual stage only. This script scores, on the bundle's
held-out cases (abdomen window, inside the body mask), the residual network of a trained bundle
combined with a noise network trained on the full-dose CTs only, under three samplers:

- ``residual only``: start at the low-dose image, 2 residual steps, no noise phase (the bundle's default);
- ``two-stage (method default)``: start ``x_in + ε``, 2 residual steps, 2 noise steps from ``T−1``;
- ``noise refinement at σ_0``: the residual-only result, then 1 noise step from ``t = 0`` (σ ≈ 20 HU),
  treating what the residual stage left as noise at the lowest level the noise network knows.

The study is about the method's two-stage model, so its residual network must be trained at the
method's fixed noise level σ_{T−1} (``--fixed_noise_step None``; the bundle's default is σ_0, and a
model trained at another level is refused). The measurement in the bundle README used the residual
network of the bundle's demo training at that level and a noise network from the bundle's own training
with the noise stage only::

    python -m monai.bundle run training --config_file bundles/drdd_ldct/configs/train.json \\
        --fixed_noise_step None
    python -m monai.bundle run training --config_file bundles/drdd_ldct/configs/train.json \\
        --bundle_root /tmp/noise_stage --dataset_dir bundles/drdd_ldct/data/demo \\
        --heldout_dir bundles/drdd_ldct/data/heldout --stages "['noise']" --max_epochs 65 --val_interval 1000
    python scripts/ldct_noise_stage_study.py --noise_ckpt /tmp/noise_stage/models/checkpoint_final.pt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from drdd_med.data.files import atomic_output
from drdd_med.diffusion import DRDDSampler, DRDDSchedule
from drdd_med.inferers import DRDDInferer
from drdd_med.metrics.functional import windowed_psnr, windowed_ssim
from drdd_med.networks import check_sampler, load_model
from drdd_med.transforms.array import NormalizeHU

SAMPLERS = {
    "residual only": {"noise_steps": 0, "start_scale": 0.0},
    "two-stage (method default)": {"noise_steps": 2, "start_scale": 1.0},
    "noise refinement at sigma_0": {"noise_steps": 1, "start_scale": 0.0, "noise_start": 0},
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle_root", type=Path, default=Path("bundles/drdd_ldct"))
    parser.add_argument("--residual_ckpt", type=Path, help="default BUNDLE_ROOT/models/model.pt")
    parser.add_argument("--noise_ckpt", type=Path, required=True,
                        help="a training checkpoint whose network_ema holds a noise network trained on full-dose CT")
    parser.add_argument("--heldout_dir", type=Path, help="default BUNDLE_ROOT/data/heldout")
    parser.add_argument("--out", type=Path, help="JSON results (default BUNDLE_ROOT/noise_stage_study.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing results")
    args = parser.parse_args(argv)
    heldout = args.heldout_dir or args.bundle_root / "data" / "heldout"
    # beside, not inside, report/: that folder belongs to ct_correction_report.py, which replaces it whole
    out = args.out or args.bundle_root / "noise_stage_study.json"
    if out.exists() and not args.overwrite:
        print(f"error: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    cases = sorted(p.name for p in heldout.iterdir() if (p / "ldct.nii.gz").is_file()) if heldout.is_dir() else []
    if not cases:
        print(f"error: no <case>/ldct.nii.gz under {heldout}; run the bundle's training first", file=sys.stderr)
        return 2

    # both models are rebuilt from their own records; the noise network joins the residual one
    residual_ckpt = args.residual_ckpt or args.bundle_root / "models" / "model.pt"
    network = load_model(residual_ckpt)
    method_level = DRDDSchedule().fixed_noise_step
    if network.schedule["fixed_noise_step"] != method_level:
        print(f"error: {residual_ckpt.name}: trained at fixed_noise_step {network.schedule['fixed_noise_step']}; "
              f"the study needs the method's level ({method_level}): train the residual stage with "
              "--fixed_noise_step None", file=sys.stderr)
        return 2
    noise_source = load_model(args.noise_ckpt, key="network_ema")
    network.noise.load_state_dict(noise_source.noise.state_dict())
    network.trained_iterations["noise"] = noise_source.trained_iterations["noise"]
    for settings in SAMPLERS.values():
        check_sampler(network, DRDDSampler(DRDDSchedule(), **settings), args.noise_ckpt.name)
    network.eval()
    normalize = NormalizeHU()

    scores = {name: {"psnr_abdomen": [], "ssim_abdomen": []} for name in SAMPLERS}
    for case in cases:
        low, full, mask = (np.asarray(nib.load(heldout / case / f"{n}.nii.gz").dataobj, dtype=np.float32)
                           for n in ("ldct", "ct", "mask"))
        source = normalize(torch.from_numpy(low)[None, None])
        for name, settings in SAMPLERS.items():
            inferer = DRDDInferer(DRDDSampler(DRDDSchedule(), residual_steps=2, **settings), slice_batch_size=16)
            with torch.no_grad():
                pred = normalize.to_hu(inferer(source, network))[0, 0].numpy()
            scores[name]["psnr_abdomen"].append(windowed_psnr(pred, full, "abdomen", mask))
            scores[name]["ssim_abdomen"].append(windowed_ssim(pred, full, "abdomen", mask))

    summary = {name: {metric: {"mean": float(np.mean(v)), "std": float(np.std(v))} for metric, v in values.items()}
               for name, values in scores.items()}
    print(f"{len(cases)} held-out cases ({', '.join(cases)}), abdomen window [-150, 250] HU, inside the body mask")
    print(f"{'sampler':30s} {'PSNR (dB)':>16s} {'SSIM':>18s}")
    for name, metrics in summary.items():
        psnr, ssim = metrics["psnr_abdomen"], metrics["ssim_abdomen"]
        print(f"{name:30s} {psnr['mean']:7.2f} ± {psnr['std']:4.2f} {ssim['mean']:9.4f} ± {ssim['std']:.4f}")
    with atomic_output(out, overwrite=args.overwrite) as tmp:
        tmp.write_text(json.dumps({"cases": cases, "samplers": SAMPLERS, "metrics": summary}, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
