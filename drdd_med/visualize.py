"""Pictures worth looking at: side-by-side previews of volumes (mid axial slice, HU windows), uncertainty maps."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from drdd_med.data.files import atomic_output

CT_WINDOW = (-1000.0, 1500.0)  # wide enough to show air, soft tissue and bone at once


def mid_axial(volume) -> np.ndarray:
    """The middle axial slice (last axis) of a (X, Y, Z) or (1, X, Y, Z) volume, rotated for display."""
    volume = np.asarray(volume, dtype=np.float32).squeeze()
    return np.rot90(volume[..., volume.shape[-1] // 2])  # (X, Y) voxel order -> anterior up for RAS data


def save_panels(
    path: str | os.PathLike,
    panels: Sequence[tuple[str, np.ndarray, tuple[float, float] | None]],
    title: str | None = None,
    colorbar: Sequence[bool] | None = None,
    cmaps: Sequence[str] | None = None,
    overwrite: bool = False,
    rows: int = 1,
    colorbar_label: str = "HU",
) -> Path:
    """Save 2D images side by side as a PNG: ``panels`` is ``(title, image, (vmin, vmax) or None)``.

    With ``rows`` > 1 the panels fill a grid row by row; a panel whose image is ``None`` stays blank.
    Colour bars (``colorbar``, per panel) are labelled ``colorbar_label``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = -(-len(panels) // rows)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, (name, image, window)) in enumerate(zip(axes.flat, panels)):
        if image is None:
            continue
        vmin, vmax = window if window is not None else (None, None)
        im = ax.imshow(image, cmap=(cmaps[i] if cmaps else "gray"), vmin=vmin, vmax=vmax)
        ax.set_title(name, fontsize=10)
        if colorbar and colorbar[i]:
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label=colorbar_label)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_output(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)


def source_window(image) -> tuple[float, float]:
    """The display window of a source image (MR, CBCT, normalised CT): its 0.5th and 99.5th percentiles."""
    lo, hi = np.percentile(np.asarray(image, dtype=np.float32), [0.5, 99.5])
    return float(lo), float(hi)


def save_translation_preview(
    path: str | os.PathLike, source, synthetic, reference=None, title: str | None = None, overwrite: bool = False
) -> Path:
    """source | synthetic CT | reference CT (when given), mid axial slice."""
    source_slice = mid_axial(source)
    panels = [("source", source_slice, source_window(source_slice)), ("synthetic CT", mid_axial(synthetic), CT_WINDOW)]
    if reference is not None:
        panels.append(("reference CT", mid_axial(reference), CT_WINDOW))
    return save_panels(path, panels, title=title, overwrite=overwrite)


def save_std_preview(
    path: str | os.PathLike, std, synthetic=None, title: str | None = None, overwrite: bool = False
) -> Path:
    """The per-voxel std of several samples (HU), mid axial slice in ``magma`` with a colour bar "std (HU)".

    The colour scale runs from 0 to the slice's 99th percentile (at least 1 HU), so a few extreme
    voxels do not wash out the rest; the mean synthetic CT (when given) is shown beside it.
    """
    std_slice = mid_axial(std)
    top = max(float(np.percentile(std_slice, 99)), 1.0)
    panels = [("std over samples", std_slice, (0.0, top))]
    flags, cmaps = [True], ["magma"]
    if synthetic is not None:
        panels.insert(0, ("synthetic CT (mean)", mid_axial(synthetic), CT_WINDOW))
        flags, cmaps = [False, *flags], ["gray", *cmaps]
    return save_panels(path, panels, title=title, colorbar=flags, cmaps=cmaps, overwrite=overwrite,
                       colorbar_label="std (HU)")


def translation_preview_image(source, synthetic, reference=None, window: tuple[float, float] = CT_WINDOW) -> np.ndarray:
    """source | synthetic CT | reference CT (when given), mid axial slices side by side: one uint8 grey image.

    The CTs are shown in the fixed HU ``window``, so the images of successive validations compare
    directly; the source in its own ``source_window``. For experiment trackers (TensorBoard, MLflow),
    which take pixels rather than figures: no titles, nothing but the images.
    """
    source_slice = mid_axial(source)
    panels = [(source_slice, source_window(source_slice)), (mid_axial(synthetic), window)]
    if reference is not None:
        panels.append((mid_axial(reference), window))
    scaled = [np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1) for image, (lo, hi) in panels]
    return np.round(np.concatenate(scaled, axis=1) * 255).astype(np.uint8)
