"""Low-dose CT simulation by noise insertion in the projection domain (fan-beam).

The method (``docs/medical.md``, "Low-dose CT simulation"), one axial slice at a time:

1. HU -> linear attenuation ``mu = mu_water * (1 + HU / 1000)`` in 1/mm, with ``mu_water = 0.0193/mm``
   (water at the ~70 keV effective energy of a 120 kVp spectrum); air and padding (HU <= -1000) -> 0.
2. Forward projection ``p`` (line integrals) in a third-generation fan-beam geometry
   (``FanBeamGeometry``: equiangular detector, source-to-isocentre 595 mm, source-to-detector
   1085.6 mm, 736 channels with a quarter-channel offset, 1152 views over 360 degrees).
3. Transmitted counts ``N = Poisson(dose_fraction * I0 * exp(-p)) + Normal(0, sigma_e^2)``
   (``I0 = 1.5e5`` photons per ray at full dose, electronic noise ``sigma_e = 10`` counts), and
   ``p_low = -log(max(N, 1) / (dose_fraction * I0))``.
4. Fan-beam filtered back-projection (Kak & Slaney's equiangular algorithm: cosine weighting, ramp
   filter with a Hann, Shepp-Logan or Ram-Lak window, ``1/L^2``-weighted back-projection) with the
   same geometry, back to HU.
5. ``output = full-dose image + (FBP(p_low) - FBP(p))``: only the difference of the noisy and the
   noise-free reconstruction is added, so the full-dose image's own texture and resolution are kept.
   FBP is linear, so this difference is computed as ``FBP(p_low - p)``.

What the simulated noise is: that of a scan at ``dose_fraction * I0`` on top of the input's own
noise (``dose_fraction=1`` adds the noise of a second full-dose scan). Its standard deviation scales
as ``1/sqrt(dose_fraction)`` while quantum noise dominates. Electronic noise adds variance growing
as ``1/dose_fraction^2``: it matters at very low counts (thick or dense paths at low dose), where
the noise then grows faster and the log of clipped counts biases HU upwards. With the defaults, at
10 % dose through a ~35 cm abdomen (lateral rays ~15 counts) the noise in soft tissue is ~2.4x the
quantum-only value and the mean shifts by ~+7 HU; at 25 % dose ~1.45x and +1.5 HU; through a head
at 10 % dose ~1.15x. ``electronic_noise_counts=0`` gives the pure quantum-noise law.

Modelling choices worth knowing:

- The ramp filter's window ends at the image grid's Nyquist frequency when that is below the
  detector's (pixels coarser than the 0.7 mm detector sampling at the isocentre): the noise texture
  is what a scanner reconstructing onto this grid produces without aliasing, and coarse (resampled)
  volumes get proportionally less noise, as averaging would give them.
- ``p`` only sets the noise level of each ray (it cancels in ``p_low - p``), so it is projected from
  the image averaged to pixels of at least ``NOISE_MODEL_PIXEL_MM`` along every 4th view and
  channel, and interpolated back to all rays. The noise itself is drawn and filtered for every ray
  of every view; pairs of neighbouring filtered views are back-projected together from their mean
  angle (``NOISE_MODEL_VIEWS_MERGED``; a shift of at most 0.7 mm at 250 mm from the isocentre),
  onto the full-resolution grid. Noise statistics in uniform regions are unaffected (checked against
  unmerged back-projection); noise streaks behind bone are spread over ~3 mm.
- The detector is widened (same pitch) when the image's circumscribed circle exceeds the 500 mm scan
  field of view, so every pixel is reconstructed; an image reaching the source orbit is refused.
  There is no bowtie filter, beam hardening or scatter (a flat ``I0`` across the fan).
- Voxels below ``PADDING_BELOW_HU`` (-1500; scanners pad outside the reconstruction circle with
  -2048 or -3024) are left unchanged.
- Accepted input: a volume in HU, recognised by air (>= 0.1 % voxels <= -500 HU) or fat (>= 1 % in
  -200..-50 HU). MR, normalised intensities and CT stored without rescale slope/intercept have
  neither; a CT crop without air still has fat. A slice must hold the patient's whole cross-section
  (a truncated reconstruction under-states attenuation and so the noise).
- Deterministic: the same seed gives the same output on the same device with the same number of
  threads (``torch.Generator``); other thread counts change float32 rounding only (~1e-4 HU).

Implementation: projector and back-projector are sparse matrices (``torch.sparse_csr``) built per
chunk of views and applied to all slices at once as the columns of one matrix product (CPU: MKL,
CUDA: cuSPARSE). Rotating the gantry by 90 (square grid, equal spacing) or 180 degrees maps the
pixel grid onto itself, so one matrix serves 4 (or 2) views, applied to rotated images.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from drdd_med.errors import DRDDInputError, NonFiniteError

MU_WATER_PER_MM = 0.0193
INCIDENT_PHOTONS = 1.5e5
ELECTRONIC_NOISE_COUNTS = 10.0
MIN_COUNTS = 1.0  # the eps of -log(max(N, eps) / I0): photon starvation ends at this count
PADDING_BELOW_HU = -1500.0
WINDOWS = ("hann", "shepp-logan", "ram-lak")

NOISE_MODEL_PIXEL_MM = 2.0
NOISE_MODEL_VIEW_STEP = 4
NOISE_MODEL_CHANNEL_STEP = 4
NOISE_MODEL_VIEWS_MERGED = 2

_TILE = 32  # pixels are back-projected in 32 x 32 tiles
_VIEWS_PER_CHUNK = 16
_MAX_COLUMNS = 1 << 26  # pixels x folds x slices held by the back-projection accumulator (256 MiB)


@dataclass(frozen=True)
class FanBeamGeometry:
    """A third-generation CT scanner: point source and equiangular arc detector rotating together.

    Defaults are those of a common 64-row scanner class (Siemens Definition-like): the 736 channels
    of pitch 1.2858 mm at 1085.6 mm span a 500 mm scan field of view; a quarter-channel detector
    offset interleaves opposite rays. Views are at ``2 pi v / n_views`` over 360 degrees.
    """

    source_to_isocenter_mm: float = 595.0
    source_to_detector_mm: float = 1085.6
    n_channels: int = 736
    detector_pitch_mm: float = 1.2858
    detector_offset_channels: float = 0.25
    n_views: int = 1152

    def __post_init__(self):
        if not 0 < self.source_to_isocenter_mm < self.source_to_detector_mm:
            raise DRDDInputError(
                f"geometry: need 0 < source_to_isocenter_mm ({self.source_to_isocenter_mm}) "
                f"< source_to_detector_mm ({self.source_to_detector_mm})"
            )
        if self.n_channels < 8 or self.n_views < 8 or self.detector_pitch_mm <= 0:
            raise DRDDInputError(
                f"geometry: need n_channels >= 8, n_views >= 8 and detector_pitch_mm > 0, got "
                f"{self.n_channels}, {self.n_views}, {self.detector_pitch_mm}"
            )
        if self.n_channels * self.channel_angle >= math.pi:
            raise DRDDInputError(f"geometry: the fan spans {self.n_channels * self.channel_angle:.2f} rad, at least pi")

    @property
    def channel_angle(self) -> float:
        """Angle between neighbouring channels seen from the source (radians)."""
        return self.detector_pitch_mm / self.source_to_detector_mm

    @property
    def central_channel(self) -> float:
        """Fractional channel index of the ray through the isocentre."""
        return (self.n_channels - 1) / 2 + self.detector_offset_channels

    @property
    def scan_fov_radius_mm(self) -> float:
        half_fan = min(self.central_channel, self.n_channels - 1 - self.central_channel) * self.channel_angle
        return self.source_to_isocenter_mm * math.sin(half_fan)

    def fan_angles(self, device=None) -> torch.Tensor:
        channels = torch.arange(self.n_channels, dtype=torch.float64, device=device)
        return ((channels - self.central_channel) * self.channel_angle).float()

    def view_angles(self, device=None) -> torch.Tensor:
        views = torch.arange(self.n_views, dtype=torch.float64, device=device)
        return (views * (2 * math.pi / self.n_views)).float()

    def covering(self, radius_mm: float) -> FanBeamGeometry:
        """This geometry, with channels added at both ends until the fan covers ``radius_mm``."""
        if radius_mm >= self.source_to_isocenter_mm:
            raise DRDDInputError(
                f"the image's field of view (radius {radius_mm:.0f} mm) reaches the source orbit "
                f"({self.source_to_isocenter_mm:.0f} mm); is the pixel spacing right?"
            )
        if radius_mm <= self.scan_fov_radius_mm:
            return self
        needed = math.asin(radius_mm / self.source_to_isocenter_mm) / self.channel_angle + 1
        extra = math.ceil(needed - min(self.central_channel, self.n_channels - 1 - self.central_channel))
        return dataclasses.replace(self, n_channels=self.n_channels + 2 * extra)

    def subsampled(self, view_step: int, channel_step: int) -> FanBeamGeometry:
        """Every ``view_step``-th view and ``channel_step``-th channel, still covering the whole fan."""
        n_channels = math.ceil((self.n_channels - 1) / channel_step) + 1  # channels 0, step, 2 step, ...
        return dataclasses.replace(
            self,
            n_channels=n_channels,
            detector_pitch_mm=self.detector_pitch_mm * channel_step,
            detector_offset_channels=self.central_channel / channel_step - (n_channels - 1) / 2,
            n_views=math.ceil(self.n_views / view_step),
        )


@dataclass(frozen=True)
class _Grid:
    """An axial pixel grid centred on the isocentre; pixel ``(i, j)`` is at ``x = (i - (ni-1)/2) * si``, same for y."""

    shape: tuple[int, int]
    spacing: tuple[float, float]

    @property
    def n_pixels(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def radius_mm(self) -> float:
        return 0.5 * math.hypot(self.shape[0] * self.spacing[0], self.shape[1] * self.spacing[1])

    def axis(self, dim: int, device=None) -> torch.Tensor:
        n = self.shape[dim]
        return (torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2) * self.spacing[dim]

    def folds(self, n_views: int) -> int:
        """How many views one matrix serves: 4 (rotations by 90 degrees) or 2 (by 180) or 1."""
        square = self.shape[0] == self.shape[1] and math.isclose(self.spacing[0], self.spacing[1], rel_tol=1e-6)
        for folds in (4, 2):
            if n_views % folds == 0 and (folds == 2 or square):
                return folds
        return 1


def _csr(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        matrix = torch.sparse_csr_tensor(crow, col, val, shape, check_invariants=False)
        if col.is_cuda:  # cuSPARSE wants sorted, unique column indices in each row (MKL does not mind)
            matrix = matrix.to_sparse_coo().coalesce().to_sparse_csr()
    return matrix


def _rotated_stack(images: torch.Tensor, folds: int, sign: int) -> torch.Tensor:
    """``(ni, nj, B)`` -> ``(ni * nj, folds * B)``: the images rotated by ``sign * q * 360/folds`` degrees."""
    turn = 4 // folds
    rotated = [torch.rot90(images, sign * q * turn, dims=(0, 1)) for q in range(folds)]
    return torch.stack(rotated, dim=2).reshape(images.shape[0] * images.shape[1], folds * images.shape[2])


# --- Forward projection (Joseph's method) ---------------------------------------------------------


def _projection_matrix(grid: _Grid, betas: torch.Tensor, gammas: torch.Tensor, source_radius: float) -> torch.Tensor:
    """Rays ``(len(betas) * len(gammas))`` x pixels, by Joseph's method.

    A ray steps through the image along the axis it is closer to, one pixel column (or row) a step;
    at each step it interpolates linearly between the two pixels it passes, weighted by the path
    length of the step. Every ray has the same number of entries (zeros outside the image).
    """
    ni, nj = grid.shape
    si, sj = grid.spacing
    beta = betas[:, None].expand(-1, len(gammas)).reshape(-1, 1)
    gamma = gammas[None, :].expand(len(betas), -1).reshape(-1, 1)
    source_x, source_y = source_radius * torch.cos(beta), source_radius * torch.sin(beta)
    # unit direction: the central ray (from the source towards the isocentre) turned by gamma
    dir_x = -torch.cos(beta) * torch.cos(gamma) - torch.sin(beta) * torch.sin(gamma)
    dir_y = -torch.sin(beta) * torch.cos(gamma) + torch.cos(beta) * torch.sin(gamma)
    along_x = dir_x.abs() >= dir_y.abs()
    n_steps = max(ni, nj)
    step = torch.arange(n_steps, device=betas.device)[None, :]
    position = torch.where(along_x, (step - (ni - 1) / 2) * si, (step - (nj - 1) / 2) * sj)
    # the unused branch of each where() may divide by ~0; it is never selected
    distance = torch.where(along_x, (position - source_x) / dir_x, (position - source_y) / dir_y)
    across = torch.where(along_x, source_y + distance * dir_y, source_x + distance * dir_x)
    index = torch.where(along_x, across / sj + (nj - 1) / 2, across / si + (ni - 1) / 2)
    index = index.nan_to_num(-2.0, -2.0, -2.0)
    path = torch.where(along_x, si / dir_x.abs(), sj / dir_y.abs())
    n_along = torch.where(along_x, ni, nj)
    n_across = torch.where(along_x, nj, ni)
    lower = index.floor()
    frac = index - lower
    columns, weights = [], []
    for offset, weight in ((0, 1 - frac), (1, frac)):
        across_index = (lower + offset).long()
        valid = (step < n_along) & (across_index >= 0) & (across_index < n_across)
        pixel = torch.where(along_x, step * nj + across_index, across_index * nj + step)
        columns.append(torch.where(valid, pixel, 0))
        weights.append(torch.where(valid, path * weight, 0.0))
    n_rays = beta.shape[0]
    col = torch.stack(columns, dim=2).reshape(-1).int()
    val = torch.stack(weights, dim=2).reshape(-1)
    crow = torch.arange(0, col.numel() + 1, 2 * n_steps, device=betas.device, dtype=torch.int32)
    return _csr(crow, col, val, (n_rays, grid.n_pixels))


def forward_project(
    mu: torch.Tensor, spacing_mm: Sequence[float], geometry: FanBeamGeometry | None = None
) -> torch.Tensor:
    """Line integrals of ``mu`` (1/mm, ``(ni, nj, slices)``) -> sinograms ``(views, channels, slices)``.

    The isocentre is the centre of the pixel grid; ``spacing_mm`` is the in-plane ``(si, sj)``.
    """
    geometry = geometry or FanBeamGeometry()
    grid = _Grid(tuple(mu.shape[:2]), (float(spacing_mm[0]), float(spacing_mm[1])))
    folds = grid.folds(geometry.n_views)
    views_per_fold = geometry.n_views // folds
    images = _rotated_stack(mu.float(), folds, sign=-1)
    betas = geometry.view_angles(mu.device)
    gammas = geometry.fan_angles(mu.device)
    sinogram = mu.new_empty((geometry.n_views, geometry.n_channels, mu.shape[2]), dtype=torch.float32)
    for start in range(0, views_per_fold, _VIEWS_PER_CHUNK):
        views = torch.arange(start, min(start + _VIEWS_PER_CHUNK, views_per_fold), device=mu.device)
        matrix = _projection_matrix(grid, betas[views], gammas, geometry.source_to_isocenter_mm)
        projected = (matrix @ images).reshape(len(views), geometry.n_channels, folds, -1)
        for q in range(folds):
            sinogram[views + q * views_per_fold] = projected[:, :, q]
    return sinogram


# --- Filtered back-projection (equiangular fan beam) -------------------------------------------------


def _ramp_filter(geometry: FanBeamGeometry, cutoff: float, window: str, n_fft: int, device) -> torch.Tensor:
    """Frequency response (``n_fft // 2 + 1``) of the windowed equiangular ramp filter, times the channel angle.

    The spatial kernel is Kak & Slaney's ``g(n alpha)``: ``1/(8 alpha^2)`` at 0, 0 at even lags,
    ``-1/(2 pi^2 sin^2(n alpha))`` at odd lags. The window ends at ``cutoff`` times the detector's
    Nyquist frequency.
    """
    alpha = geometry.channel_angle
    lags = torch.arange(n_fft, dtype=torch.float64)
    lags = torch.where(lags > n_fft // 2, lags - n_fft, lags)
    odd = (lags.abs() % 2 == 1) & (lags.abs() < geometry.n_channels)
    kernel = torch.zeros(n_fft, dtype=torch.float64)
    kernel[lags == 0] = 1 / (8 * alpha**2)
    kernel[odd] = -1 / (2 * math.pi**2 * torch.sin(lags[odd] * alpha) ** 2)
    relative = torch.fft.rfftfreq(n_fft, dtype=torch.float64) / (0.5 * cutoff)
    shape = {
        "hann": 0.5 * (1 + torch.cos(math.pi * relative)),
        "shepp-logan": torch.sinc(relative / 2),
        "ram-lak": torch.ones_like(relative),
    }[window]
    response = torch.fft.rfft(kernel).real * alpha * torch.where(relative <= 1, shape, 0.0)
    return response.float().to(device)


class _FanBeamBackprojector:
    """Filters chunks of views and accumulates their ``1/L^2``-weighted back-projection onto a grid.

    Views come in chunks of "unique" views ``u``; each chunk carries the views
    ``u + q * n_views / folds`` for every fold ``q`` (see ``_Grid.folds``), laid out
    ``(views, channels, folds * slices)``. Pixels are visited in square tiles, so that neighbouring
    rows of the back-projection matrix read the same detector channels while they are in cache.

    ``views_merged > 1`` sums that many neighbouring filtered views and back-projects the sum from
    their mean angle: the per-view statistics stay exact, each view's contribution moves by at most
    half a view (0.7 mm at 250 mm from the isocentre for 1152 views), and the work divides.
    """

    def __init__(
        self, grid: _Grid, geometry: FanBeamGeometry, n_slices: int, window: str, device, views_merged: int = 1
    ):
        if _VIEWS_PER_CHUNK % views_merged or (geometry.n_views // grid.folds(geometry.n_views)) % views_merged:
            views_merged = 1
        self.grid, self.geometry, self.views_merged = grid, geometry, views_merged
        self.folds = grid.folds(geometry.n_views)
        self.views_per_fold = geometry.n_views // self.folds
        # the window ends at the lower of the detector's and the pixel grid's Nyquist frequency
        detector_spacing_mm = geometry.source_to_isocenter_mm * geometry.channel_angle
        cutoff = min(1.0, detector_spacing_mm / min(grid.spacing))
        self.n_fft = _fast_fft_length(2 * geometry.n_channels - 1)
        self.filter = _ramp_filter(geometry, cutoff, window, self.n_fft, device)[None, :, None]
        self.cosine = (geometry.source_to_isocenter_mm * torch.cos(geometry.fan_angles(device)))[None, :, None]
        self.betas = geometry.view_angles(device)
        i, j = torch.meshgrid(
            torch.arange(grid.shape[0], device=device), torch.arange(grid.shape[1], device=device), indexing="ij"
        )
        tiles_per_row = -(-grid.shape[1] // _TILE)
        tile_key = ((i // _TILE) * tiles_per_row + j // _TILE) * _TILE**2 + (i % _TILE) * _TILE + j % _TILE
        self.order = torch.argsort(tile_key.reshape(-1))  # tiled position -> row-major pixel index
        self.x = grid.axis(0, device)[i.reshape(-1)[self.order]][:, None]
        self.y = grid.axis(1, device)[j.reshape(-1)[self.order]][:, None]
        self.image = torch.zeros((grid.n_pixels, self.folds * n_slices), device=device)

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Unique views ``(n,)`` and all the views they stand for ``(n, folds)``."""
        device = self.image.device
        for start in range(0, self.views_per_fold, _VIEWS_PER_CHUNK):
            unique = torch.arange(start, min(start + _VIEWS_PER_CHUNK, self.views_per_fold), device=device)
            yield unique, unique[:, None] + self.views_per_fold * torch.arange(self.folds, device=device)

    def add(self, unique_views: torch.Tensor, sinogram: torch.Tensor) -> None:
        n_views, n_channels, n_columns = sinogram.shape
        merged = self.views_merged
        sinogram = sinogram.reshape(n_views // merged, merged, n_channels, n_columns).sum(dim=1)
        angles = self.betas[unique_views].reshape(-1, merged).mean(dim=1)
        spectrum = torch.fft.rfft(sinogram * self.cosine, n=self.n_fft, dim=1) * self.filter
        filtered = torch.fft.irfft(spectrum, n=self.n_fft, dim=1)[:, :n_channels]
        self.image.addmm_(self._matrix(angles), filtered.reshape(-1, n_columns))

    def _matrix(self, angles: torch.Tensor) -> torch.Tensor:
        """Pixels x (views * channels): linear interpolation at each pixel's fan angle, weighted ``d_beta / L^2``."""
        geometry = self.geometry
        beta = angles[None, :]
        cos_b, sin_b = torch.cos(beta), torch.sin(beta)
        to_source = geometry.source_to_isocenter_mm - (self.x * cos_b + self.y * sin_b)
        across = self.y * cos_b - self.x * sin_b
        channel = torch.atan2(across, to_source) / geometry.channel_angle + geometry.central_channel
        channel = channel.clamp_(0, geometry.n_channels - 1)
        left = channel.floor().clamp_(max=geometry.n_channels - 2)
        frac = channel - left
        n_views = len(angles)
        first = left.int() + torch.arange(n_views, device=beta.device, dtype=torch.int32) * geometry.n_channels
        weight = (2 * math.pi / geometry.n_views) / (to_source.square() + across.square())
        col = torch.stack([first, first + 1], dim=2).reshape(-1)
        val = torch.stack([weight * (1 - frac), weight * frac], dim=2).reshape(-1)
        crow = torch.arange(0, col.numel() + 1, 2 * n_views, device=beta.device, dtype=torch.int32)
        return _csr(crow, col, val, (self.grid.n_pixels, n_views * geometry.n_channels))

    def result(self) -> torch.Tensor:
        """The reconstruction ``(ni, nj, slices)``."""
        ni, nj = self.grid.shape
        image = torch.empty_like(self.image)
        image[self.order] = self.image
        image = image.reshape(ni, nj, self.folds, -1)
        turn = 4 // self.folds
        return sum(torch.rot90(image[:, :, q], q * turn, dims=(0, 1)) for q in range(self.folds))


def _fast_fft_length(minimum: int) -> int:
    """The smallest length >= ``minimum`` whose only prime factors are 2, 3 and 5."""
    length = minimum
    while True:
        rest = length
        for prime in (2, 3, 5):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return length
        length += 1


def filtered_back_project(
    sinogram: torch.Tensor,
    shape: Sequence[int],
    spacing_mm: Sequence[float],
    geometry: FanBeamGeometry | None = None,
    window: str = "hann",
) -> torch.Tensor:
    """Sinograms ``(views, channels, slices)`` -> images ``(ni, nj, slices)`` on a grid centred on the isocentre."""
    geometry = geometry or FanBeamGeometry()
    _check_window(window)
    grid = _Grid((int(shape[0]), int(shape[1])), (float(spacing_mm[0]), float(spacing_mm[1])))
    backprojector = _FanBeamBackprojector(grid, geometry, sinogram.shape[2], window, sinogram.device)
    for unique, views in backprojector.chunks():
        chunk = sinogram[views.reshape(-1)].reshape(*views.shape, *sinogram.shape[1:])  # (n, folds, C, B)
        backprojector.add(unique, chunk.permute(0, 2, 1, 3).reshape(len(unique), sinogram.shape[1], -1))
    return backprojector.result()


# --- Noise model ----------------------------------------------------------------------------------


def hu_to_mu(volume_hu: torch.Tensor, mu_water_per_mm: float = MU_WATER_PER_MM) -> torch.Tensor:
    """Linear attenuation (1/mm) from HU; air, and padding below it, attenuate nothing."""
    return (mu_water_per_mm * (1 + volume_hu / 1000)).clamp_min(0)


def noisy_line_integrals(
    p: torch.Tensor,
    dose_fraction: float,
    generator: torch.Generator | None = None,
    incident_photons: float = INCIDENT_PHOTONS,
    electronic_noise_counts: float = ELECTRONIC_NOISE_COUNTS,
) -> torch.Tensor:
    """Low-dose line integrals ``p_low = -log(max(N, 1) / I0_low)`` with ``I0_low = dose_fraction * I0``.

    ``N = Poisson(I0_low exp(-p)) + Normal(0, sigma_e^2)``: quantum and electronic noise.
    """
    incident = dose_fraction * incident_photons
    counts = torch.poisson(incident * torch.exp(-p), generator=generator)
    counts += electronic_noise_counts * torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
    return math.log(incident) - torch.log(counts.clamp_min(MIN_COUNTS))


def _interpolated_sinogram(
    coarse: torch.Tensor, coarse_geometry: FanBeamGeometry, geometry: FanBeamGeometry, views: torch.Tensor
) -> torch.Tensor:
    """``coarse`` (a ``subsampled`` geometry's sinogram) at ``views`` and all channels of ``geometry``, linearly."""
    position = views.double() * (coarse_geometry.n_views / geometry.n_views)
    lower = position.floor()
    weight = (position - lower).float()[:, None, None]
    lower = lower.long() % coarse_geometry.n_views
    rows = coarse[lower] * (1 - weight) + coarse[(lower + 1) % coarse_geometry.n_views] * weight
    channel = geometry.fan_angles(coarse.device) / coarse_geometry.channel_angle + coarse_geometry.central_channel
    channel = channel.clamp(0, coarse_geometry.n_channels - 1)
    left = channel.floor().clamp(max=coarse_geometry.n_channels - 2)
    weight = (channel - left)[None, :, None]
    left = left.long()
    return rows[:, left] * (1 - weight) + rows[:, left + 1] * weight


def _noise_hu(
    volume_hu: torch.Tensor,
    grid: _Grid,
    geometry: FanBeamGeometry,
    dose_fraction: float,
    generator: torch.Generator,
    incident_photons: float,
    electronic_noise_counts: float,
    window: str,
    mu_water_per_mm: float,
) -> torch.Tensor:
    """``FBP(p_low - p)`` in HU for a slab ``(ni, nj, slices)``."""
    mu = hu_to_mu(volume_hu, mu_water_per_mm)
    coarse_shape = tuple(
        min(n, math.ceil(n * s / NOISE_MODEL_PIXEL_MM)) for n, s in zip(grid.shape, grid.spacing, strict=True)
    )
    coarse_spacing = tuple(n * s / m for n, s, m in zip(grid.shape, grid.spacing, coarse_shape, strict=True))
    coarse_mu = F.adaptive_avg_pool2d(mu.permute(2, 0, 1), coarse_shape).permute(1, 2, 0)
    coarse_geometry = geometry.subsampled(NOISE_MODEL_VIEW_STEP, NOISE_MODEL_CHANNEL_STEP)
    coarse_p = forward_project(coarse_mu, coarse_spacing, coarse_geometry)

    n_slices = volume_hu.shape[2]
    backprojector = _FanBeamBackprojector(grid, geometry, n_slices, window, volume_hu.device, NOISE_MODEL_VIEWS_MERGED)
    for unique, views in backprojector.chunks():
        p = _interpolated_sinogram(coarse_p, coarse_geometry, geometry, views.reshape(-1))
        p = p.reshape(*views.shape, geometry.n_channels, n_slices).permute(0, 2, 1, 3)
        p = p.reshape(len(unique), geometry.n_channels, -1)
        p_low = noisy_line_integrals(p, dose_fraction, generator, incident_photons, electronic_noise_counts)
        backprojector.add(unique, p_low - p)
    return backprojector.result() * (1000 / mu_water_per_mm)


# --- Input checks and entry points ----------------------------------------------------------------


def _check_window(window: str) -> None:
    if window not in WINDOWS:
        raise DRDDInputError(f"window: unknown ramp-filter window {window!r}; choose one of {', '.join(WINDOWS)}")


def check_dose_fraction(dose_fraction: float) -> float:
    """The fraction of the full dose, in ``(0, 1]``."""
    dose = float(dose_fraction)
    if not 0 < dose <= 1:
        raise DRDDInputError(f"dose_fraction: must be in (0, 1] (a fraction of the full dose), got {dose_fraction}")
    return dose


def check_hounsfield(volume_hu: torch.Tensor | np.ndarray, name: str = "volume") -> None:
    """Refuse NaN/Inf voxels and volumes that are not CT in Hounsfield units.

    A CT volume in HU holds air (0.1 % of its voxels at or below -500 HU) or, when cropped inside
    the body, fat (1 % in -200..-50 HU). MR (never negative), normalised intensities and CT stored
    without rescale slope/intercept (air at 0, water at 1000) hold neither.
    """
    volume = torch.as_tensor(volume_hu)
    finite = torch.isfinite(volume)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise NonFiniteError(f"{name}: {bad} voxels are NaN or infinite; the simulation needs finite HU values")
    air = float((volume <= -500).float().mean())
    fat = float(((volume >= -200) & (volume <= -50)).float().mean())
    if air < 0.001 and fat < 0.01:
        raise DRDDInputError(
            f"{name}: does not look like CT in Hounsfield units (values {float(volume.min()):.4g} to "
            f"{float(volume.max()):.4g}; {air:.2%} of voxels <= -500 HU (air), {fat:.2%} in -200..-50 HU "
            "(fat)); the simulation needs CT in HU, not MR, normalised intensities or raw stored values"
        )


def _check_spacing(spacing_mm: Sequence[float], name: str) -> tuple[float, float]:
    spacing = tuple(float(s) for s in np.ravel(np.asarray(spacing_mm, dtype=float)))
    if len(spacing) not in (2, 3) or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise DRDDInputError(f"{name}: spacing_mm must be 2 or 3 positive numbers (mm), got {spacing_mm}")
    return spacing[0], spacing[1]


def check_ct_slices(
    volume_hu: np.ndarray | torch.Tensor, spacing_mm: Sequence[float], name: str
) -> tuple[torch.Tensor, tuple[float, float]]:
    """``volume_hu`` as a tensor of axial slices in HU, and its in-plane spacing, both checked (``DRDDInputError``)."""
    spacing = _check_spacing(spacing_mm, name)
    volume = torch.as_tensor(volume_hu)
    if volume.ndim not in (2, 3) or min(volume.shape[:2]) < 2:
        raise DRDDInputError(
            f"{name}: expected axial slices (i, j) or a volume (i, j, k), got shape {tuple(volume.shape)}"
        )
    check_hounsfield(volume, name)
    return volume, spacing


def low_dose_noise(
    volume_hu: np.ndarray | torch.Tensor,
    spacing_mm: Sequence[float],
    dose_fraction: float,
    seed: int = 0,
    geometry: FanBeamGeometry | None = None,
    *,
    incident_photons: float = INCIDENT_PHOTONS,
    electronic_noise_counts: float = ELECTRONIC_NOISE_COUNTS,
    window: str = "hann",
    mu_water_per_mm: float = MU_WATER_PER_MM,
    device: torch.device | str | None = None,
    name: str = "volume",
) -> np.ndarray | torch.Tensor:
    """The noise (HU) a scan at ``dose_fraction`` adds to ``volume_hu``: ``FBP(p_low) - FBP(p)`` per axial slice.

    ``volume_hu``: ``(i, j, k)`` with axial slices along the last axis, or one slice ``(i, j)``;
    ``spacing_mm``: the in-plane pixel spacing ``(si, sj)`` (a third value, the slice spacing, is
    ignored). Returns float32 of the input's kind (numpy, or torch on the input's device);
    ``device`` moves the computation (e.g. to CUDA). ``name`` labels error messages.
    """
    dose = check_dose_fraction(dose_fraction)
    _check_window(window)
    volume, spacing = check_ct_slices(volume_hu, spacing_mm, name)
    work = volume.to(device=device or volume.device, dtype=torch.float32)
    slab = work if work.ndim == 3 else work[:, :, None]
    grid = _Grid(tuple(slab.shape[:2]), spacing)
    geometry = (geometry or FanBeamGeometry()).covering(grid.radius_mm)
    generator = torch.Generator(slab.device).manual_seed(int(seed))
    batch = max(1, _MAX_COLUMNS // (grid.n_pixels * grid.folds(geometry.n_views)))
    noise = torch.empty_like(slab)
    for start in range(0, slab.shape[2], batch):
        noise[:, :, start : start + batch] = _noise_hu(
            slab[:, :, start : start + batch],
            grid,
            geometry,
            dose,
            generator,
            incident_photons,
            electronic_noise_counts,
            window,
            mu_water_per_mm,
        )
    noise = noise.reshape(volume.shape)
    return noise.cpu().numpy() if isinstance(volume_hu, np.ndarray) else noise.to(volume.device)


def simulate_low_dose(
    volume_hu: np.ndarray | torch.Tensor,
    spacing_mm: Sequence[float],
    dose_fraction: float,
    seed: int = 0,
    geometry: FanBeamGeometry | None = None,
    *,
    incident_photons: float = INCIDENT_PHOTONS,
    electronic_noise_counts: float = ELECTRONIC_NOISE_COUNTS,
    window: str = "hann",
    mu_water_per_mm: float = MU_WATER_PER_MM,
    device: torch.device | str | None = None,
    name: str = "volume",
) -> np.ndarray | torch.Tensor:
    """A low-dose version of the full-dose CT ``volume_hu``: ``volume_hu + low_dose_noise(...)``.

    Voxels below ``PADDING_BELOW_HU`` (padding outside the scanner's reconstruction circle) are kept.
    Arguments as for ``low_dose_noise``; the same ``seed`` on the same device gives the same output.
    """
    noise = low_dose_noise(
        volume_hu,
        spacing_mm,
        dose_fraction,
        seed,
        geometry,
        incident_photons=incident_photons,
        electronic_noise_counts=electronic_noise_counts,
        window=window,
        mu_water_per_mm=mu_water_per_mm,
        device=device,
        name=name,
    )
    if isinstance(volume_hu, np.ndarray):
        volume = volume_hu.astype(np.float32)
        return np.where(volume < PADDING_BELOW_HU, volume, volume + noise)
    volume = volume_hu.to(torch.float32)
    return torch.where(volume < PADDING_BELOW_HU, volume, volume + noise)
