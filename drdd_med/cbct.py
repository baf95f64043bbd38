"""Cone-beam CT (CBCT) simulation from CT, in the projection domain (central-plane fan beam).

The CBCT of a linac-mounted kV imager differs from diagnostic CT mostly by what its wide cone and
flat panel let through: scatter (cupping, dark streaks), fewer photons per detector pixel (noise), a
detector narrower than large patients (truncation) and numbers that are not calibrated HU. They are
simulated one axial slice at a time (``docs/cbct.md``), with the projector and filtered
back-projection of ``drdd_med.ldct``:

1. HU -> linear attenuation ``mu`` (``hu_to_mu``, water 0.0193/mm) and line integrals ``p``
   (``forward_project``) in ``cbct_geometry``: the central plane of the cone, a fan beam with the
   linac imager's source-to-isocentre 1000 mm and source-to-detector 1500 mm, 0.776 mm channels
   (flat-panel pixels binned 2 x 2) and 656 views over 360 degrees, whose centred detector spans
   ``fov_diameter_mm`` at the isocentre. There are rays only where the detector is: the body beyond
   the field of view is neither measured nor irradiated (so it scatters nothing either).
2. Scatter (``scatter_intensity``), in units of the unattenuated intensity: each ray's primary
   ``exp(-p)`` scatters in proportion to its path length, ``scatter_to_primary * p / p_200 * exp(-p)``
   (``p_200`` the line integral of 200 mm of water), spread over the detector by a normalised
   Gaussian kernel (``scatter_kernel_mm``, sigma at the detector; what falls beyond the detector is
   lost). Behind a uniform 200 mm of water the scatter-to-primary ratio (SPR) is
   ``scatter_to_primary``; behind the centre of a round body it is higher, as the kernel carries in
   the scatter of the thinner, brighter periphery (defaults: 0.6 behind a 200 mm water cylinder,
   1.9 behind a 300 mm one).
3. Counts ``N = Poisson(I0 (exp(-p) + S)) + Normal(0, sigma_e^2)`` and ``p_cbct = -log(max(N, 1) / I0)``
   (``noisy_line_integrals`` at the line integrals ``-log(exp(-p) + S)`` of the measured intensity).
   Nothing corrects the scatter: its extra intensity shortens the line integrals most where they are
   longest, which the reconstruction turns into cupping (defaults: the centre of a 300 mm water
   cylinder 235 HU below its periphery) and dark streaks between dense objects.
4. FBP (``filtered_back_project``, Hann window) of ``p_cbct`` with the same geometry, back to HU,
   then the miscalibration ``hu_scale * HU + hu_offset``. Pixels outside the field-of-view circle
   are set to ``OUTSIDE_FOV_HU`` (-1000); inside, a truncated body keeps the artefact of an
   uncorrected reconstruction of truncated projections (no extrapolation): a bright rim at the edge
   of the circle (+300 HU for a 360 mm pelvis in a 250 mm field, +60 HU at its centre).

The output is a new reconstruction, not the input plus a difference: its resolution is that of the
CBCT's detector and reconstruction. Approximations: the cone's central plane stands for every slice
(no cone-beam artefacts; the cone's larger scatter volume is in ``scatter_to_primary``); a centred
detector stands for the offset (half-fan) detector of large fields of view; monochromatic beam (no
beam hardening, no bowtie filter); scatter as a stationary convolution of the primary (no object
shape or anti-scatter grid beyond its amplitude); no lag, ghosting or motion.

Accepted input and determinism as for ``drdd_med.ldct.simulate_low_dose``: CT in HU (air or fat
present), slices ``(i, j)`` or ``(i, j, k)``; the same seed on the same device gives the same output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from drdd_med.errors import DRDDInputError
from drdd_med.ldct import (
    MU_WATER_PER_MM,
    FanBeamGeometry,
    check_ct_slices,
    filtered_back_project,
    forward_project,
    hu_to_mu,
    noisy_line_integrals,
)

SOURCE_TO_ISOCENTER_MM = 1000.0
SOURCE_TO_DETECTOR_MM = 1500.0
DETECTOR_PITCH_MM = 0.776
N_VIEWS = 656
FOV_DIAMETER_MM = 450.0
SCATTER_TO_PRIMARY = 0.5
SCATTER_KERNEL_MM = 150.0
SCATTER_REFERENCE_WATER_MM = 200.0
INCIDENT_PHOTONS = 2.0e4
ELECTRONIC_NOISE_COUNTS = 5.0
HU_SCALE = 0.95
HU_OFFSET = -30.0
OUTSIDE_FOV_HU = -1000.0

_MAX_VOXELS_PER_BATCH = 1 << 24  # slices are simulated in batches of at most this many voxels


def cbct_geometry(
    fov_diameter_mm: float = FOV_DIAMETER_MM, *, n_views: int = N_VIEWS, detector_pitch_mm: float = DETECTOR_PITCH_MM
) -> FanBeamGeometry:
    """The central plane of a linac-mounted CBCT: a centred detector just wide enough for ``fov_diameter_mm``."""
    fov = float(fov_diameter_mm)
    if not 0 < fov < 2 * SOURCE_TO_ISOCENTER_MM:
        raise DRDDInputError(
            f"fov_diameter_mm: must be in (0, {2 * SOURCE_TO_ISOCENTER_MM:g}) mm at the isocentre, got {fov_diameter_mm}"
        )
    if not detector_pitch_mm > 0:
        raise DRDDInputError(f"detector_pitch_mm: must be positive, got {detector_pitch_mm}")
    channel_angle = detector_pitch_mm / SOURCE_TO_DETECTOR_MM
    half_fan_channels = math.ceil(math.asin(fov / 2 / SOURCE_TO_ISOCENTER_MM) / channel_angle)
    return FanBeamGeometry(
        source_to_isocenter_mm=SOURCE_TO_ISOCENTER_MM,
        source_to_detector_mm=SOURCE_TO_DETECTOR_MM,
        n_channels=2 * half_fan_channels + 1,
        detector_pitch_mm=detector_pitch_mm,
        detector_offset_channels=0.0,
        n_views=n_views,
    )


def scatter_intensity(
    p: torch.Tensor,
    geometry: FanBeamGeometry,
    scatter_to_primary: float = SCATTER_TO_PRIMARY,
    scatter_kernel_mm: float = SCATTER_KERNEL_MM,
) -> torch.Tensor:
    """Scatter on the detector, in units of the unattenuated intensity, for line integrals ``p`` ``(views, channels, slices)``."""
    reference = SCATTER_REFERENCE_WATER_MM * MU_WATER_PER_MM
    emitted = scatter_to_primary * (p / reference) * torch.exp(-p)
    sigma = scatter_kernel_mm / geometry.detector_pitch_mm  # in channels
    radius = min(math.ceil(3 * sigma), geometry.n_channels - 1)
    lags = torch.arange(-radius, radius + 1, device=p.device, dtype=p.dtype)
    kernel = torch.exp(-0.5 * (lags / sigma) ** 2)
    kernel = kernel / kernel.sum()
    n_views, n_channels, n_slices = p.shape
    rows = emitted.permute(0, 2, 1).reshape(-1, 1, n_channels)
    spread = F.conv1d(rows, kernel[None, None], padding=radius)  # scatter beyond the detector is lost
    return spread.reshape(n_views, n_slices, n_channels).permute(0, 2, 1)


def _check_parameters(**values: float) -> None:
    rules = {
        "scatter_to_primary": ("at least 0", lambda v: v >= 0),
        "scatter_kernel_mm": ("positive", lambda v: v > 0),
        "incident_photons": ("positive", lambda v: v > 0),
        "electronic_noise_counts": ("at least 0", lambda v: v >= 0),
        "hu_scale": ("positive", lambda v: v > 0),
        "hu_offset": ("finite", lambda v: True),
    }
    for parameter, value in values.items():
        rule, holds = rules[parameter]
        if not (math.isfinite(value) and holds(value)):
            raise DRDDInputError(f"{parameter}: must be {rule}, got {value}")


def _cbct_hu(
    slab_hu: torch.Tensor,
    spacing: tuple[float, float],
    geometry: FanBeamGeometry,
    generator: torch.Generator,
    scatter_to_primary: float,
    scatter_kernel_mm: float,
    incident_photons: float,
    electronic_noise_counts: float,
) -> torch.Tensor:
    """The uncalibrated CBCT reconstruction (HU) of a slab ``(ni, nj, slices)``."""
    p = forward_project(hu_to_mu(slab_hu), spacing, geometry)
    scatter = scatter_intensity(p, geometry, scatter_to_primary, scatter_kernel_mm)
    measured = -torch.log(torch.exp(-p) + scatter)
    p_cbct = noisy_line_integrals(measured, 1.0, generator, incident_photons, electronic_noise_counts)
    mu = filtered_back_project(p_cbct, slab_hu.shape[:2], spacing, geometry)
    return mu * (1000 / MU_WATER_PER_MM) - 1000


def simulate_cbct(
    volume_hu: np.ndarray | torch.Tensor,
    spacing_mm: Sequence[float],
    seed: int = 0,
    *,
    fov_diameter_mm: float = FOV_DIAMETER_MM,
    scatter_to_primary: float = SCATTER_TO_PRIMARY,
    scatter_kernel_mm: float = SCATTER_KERNEL_MM,
    incident_photons: float = INCIDENT_PHOTONS,
    electronic_noise_counts: float = ELECTRONIC_NOISE_COUNTS,
    hu_scale: float = HU_SCALE,
    hu_offset: float = HU_OFFSET,
    n_views: int = N_VIEWS,
    detector_pitch_mm: float = DETECTOR_PITCH_MM,
    device: torch.device | str | None = None,
    name: str = "volume",
) -> np.ndarray | torch.Tensor:
    """A simulated CBCT (HU, same grid) of the CT ``volume_hu``, per axial slice (see the module docstring).

    ``volume_hu``: ``(i, j, k)`` with axial slices along the last axis, or one slice ``(i, j)``, its
    centre on the isocentre; ``spacing_mm``: the in-plane pixel spacing ``(si, sj)`` (a third value
    is ignored).

    Physical parameters: ``fov_diameter_mm`` the field of view at the isocentre (the detector's
    width); ``scatter_to_primary`` the SPR behind 200 mm of water (0 switches scatter off) and
    ``scatter_kernel_mm`` the sigma of its spread at the detector; ``incident_photons`` per ray and
    ``electronic_noise_counts`` (standard deviation); ``hu_scale`` and ``hu_offset`` the CBCT's
    miscalibration; ``n_views`` over 360 degrees and ``detector_pitch_mm`` (at the detector) set the
    sampling. Returns float32 of the input's kind (numpy, or torch on the input's device); ``device``
    moves the computation (e.g. to CUDA). ``name`` labels error messages.
    """
    _check_parameters(
        scatter_to_primary=scatter_to_primary,
        scatter_kernel_mm=scatter_kernel_mm,
        incident_photons=incident_photons,
        electronic_noise_counts=electronic_noise_counts,
        hu_scale=hu_scale,
        hu_offset=hu_offset,
    )
    geometry = cbct_geometry(fov_diameter_mm, n_views=n_views, detector_pitch_mm=detector_pitch_mm)
    volume, spacing = check_ct_slices(volume_hu, spacing_mm, name)
    work = volume.to(device=device or volume.device, dtype=torch.float32)
    slab = work if work.ndim == 3 else work[:, :, None]
    (ni, nj), (si, sj) = slab.shape[:2], spacing
    if math.hypot(ni * si, nj * sj) / 2 >= SOURCE_TO_ISOCENTER_MM:
        raise DRDDInputError(
            f"{name}: the image reaches the CBCT source orbit; is the pixel spacing {spacing} mm right?"
        )
    generator = torch.Generator(slab.device).manual_seed(int(seed))
    batch = max(1, _MAX_VOXELS_PER_BATCH // (ni * nj))
    cbct = torch.empty_like(slab)
    for start in range(0, slab.shape[2], batch):
        cbct[:, :, start : start + batch] = _cbct_hu(
            slab[:, :, start : start + batch],
            spacing,
            geometry,
            generator,
            scatter_to_primary,
            scatter_kernel_mm,
            incident_photons,
            electronic_noise_counts,
        )
    x = (torch.arange(ni, device=slab.device) - (ni - 1) / 2) * si
    y = (torch.arange(nj, device=slab.device) - (nj - 1) / 2) * sj
    inside_fov = (x[:, None] ** 2 + y[None, :] ** 2 <= geometry.scan_fov_radius_mm**2)[:, :, None]
    cbct = torch.where(inside_fov, hu_scale * cbct + hu_offset, OUTSIDE_FOV_HU).reshape(volume.shape)
    return cbct.cpu().numpy() if isinstance(volume_hu, np.ndarray) else cbct.to(volume.device)
