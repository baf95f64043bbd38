"""Built-in demo data: seeded, paired MR/CT head phantoms in the SynthRAD2023 layout.

Each subject is built from smooth implicit shapes defined in millimetres in a canonical head frame
(origin near the centre of the brain, +x right, +y anterior, +z superior): a scalp (skin,
subcutaneous fat, temporal muscle), a skull with cortical outer and inner tables around a marrow
(diploe) layer and a thick skull base, a CSF/dura layer, a folded cortical ribbon over white matter,
deep grey nuclei, lateral and third ventricles, cerebellum and brainstem, orbits with eyes, and air
sinuses (frontal, sphenoid, maxillary, nasal cavity, nasopharynx) walled by cortical bone.
Every shape carries an approximate signed depth in mm, so layer thicknesses and cortical walls are
set in mm and the anatomy scales with any grid.

A subject differs from the next by head size, pose, a smooth random deformation, layer thicknesses,
ventricle and sulcus width, sinus size, cortical folding and tissue intensities, all drawn from
its seed. The CT is in HU with partial-volume blur and Gaussian noise (background -1000, as
SynthRAD). The MR is T1-like with a multiplicative bias field and Rician noise (background 0). Bone
and air are both dark in MR, so no monotone intensity map turns this MR into this CT — the point of
``drdd_med.baselines.monotone_intensity_baseline``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from drdd_med.data.writers import write_volume
from drdd_med.errors import OutputExistsError

logger = logging.getLogger(__name__)

DEFAULT_SHAPE = (96, 96, 48)
DEFAULT_SPACING = (2.0, 2.0, 3.0)
CT_RANGE = (-1024.0, 3071.0)

PAIRED_DIR = Path("Task1") / "brain"
POOL_DIR = Path("ct_pool")
MANIFEST_NAME = ".drdd-demo-manifest"  # no .json suffix: dataset readers globbing *.json must not see it
PAIRED_ID = "1BA{:03d}"
UNPAIRED_ID = "1BP{:03d}"
_PAIRED_ID_RE = re.compile(r"^1BA\d{3}$")
_UNPAIRED_FILE_RE = re.compile(r"^1BP\d{3}\.nii\.gz$")
_CASE_FILES = ("mr.nii.gz", "ct.nii.gz", "mask.nii.gz")
MAX_CASES = 999  # ids carry three digits

# ---------------------------------------------------------------------------------------------
# Tissues: label, CT (HU) and T1-weighted MR (arbitrary scanner units) before per-subject jitter.
# ---------------------------------------------------------------------------------------------
AIR, SKIN, FAT, MUSCLE, CORTICAL_BONE, MARROW, CSF, GREY_MATTER, WHITE_MATTER, DEEP_GREY, SINUS_AIR, EYE = range(12)
TISSUE_NAMES = (
    "air", "skin", "fat", "muscle", "cortical bone", "marrow", "csf", "grey matter", "white matter",
    "deep grey matter", "sinus air", "eye",
)
_CT_HU = np.array([-1000, 45, -100, 50, 1500, 450, 5, 40, 25, 38, -1000, 10], dtype=np.float32)
_MR_T1 = np.array([0, 420, 1050, 380, 40, 650, 170, 560, 840, 650, 0, 150], dtype=np.float32)
# Spatial texture amplitude per tissue (CT in HU, MR as a fraction): marrow and bone are heterogeneous.
_CT_TEXTURE = np.array([0, 4, 6, 4, 120, 90, 2, 3, 3, 3, 0, 2], dtype=np.float32)
_MR_TEXTURE = np.array([0, 0.05, 0.04, 0.05, 0.2, 0.08, 0.03, 0.03, 0.03, 0.03, 0, 0.03], dtype=np.float32)

# ---------------------------------------------------------------------------------------------
# Canonical anatomy (mm). The head's canonical origin sits at world (0, 0, HEAD_Z_OFFSET) plus the
# subject's translation, so the default 144 mm axial extent spans vertex to upper maxilla.
# ---------------------------------------------------------------------------------------------
HEAD_Z_OFFSET = -14.0
HEAD_SEMI_AXES = (64.0, 78.0, 82.0, 70.0)  # left-right, anterior, posterior, superior
NECK_START_Z, NECK_TAPER, NECK_SOFTNESS = -25.0, 0.5, 8.0  # below NECK_START_Z the head narrows slowly
SKIN_MM, CORTICAL_TABLE_MM, CSF_LAYER_MM, CORTEX_MM = 2.0, 2.0, 2.2, 3.0


def _sigmoid(u):
    return 1.0 / (1.0 + np.exp(-u))


def _smooth_ramp(u, width):
    """``max(u, 0)`` with the corner rounded over about ``width`` (cheaper than a softplus)."""
    return 0.5 * (u + np.sqrt(u * u + width * width))


def _smooth_ramp_slope(u, width):
    return 0.5 * (1.0 + u / np.sqrt(u * u + width * width))


def _smooth_min(a, b, k):
    """Intersection of two 'positive inside' depths with a rounded crease of size ``k`` mm."""
    h = np.clip(k - np.abs(a - b), 0.0, None) / k
    return np.minimum(a, b) - h * h * (k / 4.0)


def _ellipsoid_depth(x, y, z, centre, semi, yaw_deg=0.0):
    """Approximate signed depth (mm, positive inside) below an ellipsoid's surface.

    First-order distance ``(1 - r) / |grad r|`` of the normalised radius ``r``: exact for a sphere,
    close to the true distance near any ellipsoid surface. ``yaw_deg`` turns the ellipsoid about z.
    """
    u, v, w = x - float(centre[0]), y - float(centre[1]), z - float(centre[2])
    if yaw_deg:
        c, s = float(np.cos(np.radians(yaw_deg))), float(np.sin(np.radians(yaw_deg)))
        u, v = c * u + s * v, -s * u + c * v
    qx, qy, qz = u / float(semi[0]), v / float(semi[1]), w / float(semi[2])
    r = np.sqrt(qx * qx + qy * qy + qz * qz)
    r_grad = np.sqrt((qx / float(semi[0])) ** 2 + (qy / float(semi[1])) ** 2 + (qz / float(semi[2])) ** 2)
    local_radius = np.where(r_grad > 1e-9, r / np.maximum(r_grad, 1e-9), float(min(semi)))
    return (1.0 - r) * local_radius


@dataclass(frozen=True)
class _PlaneWaves:
    """A smooth random field: a normalised sum of plane waves with random direction and phase."""

    wavevectors: np.ndarray  # (n, 3) in rad/mm
    phases: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, count: int, wavelength_mm: tuple[float, float]) -> _PlaneWaves:
        directions = rng.normal(size=(count, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        wavelengths = np.exp(rng.uniform(np.log(wavelength_mm[0]), np.log(wavelength_mm[1]), size=count))
        return cls(directions * (2 * np.pi / wavelengths)[:, None], rng.uniform(0, 2 * np.pi, size=count))

    def _arguments(self, x, y, z):
        for (kx, ky, kz), phase in zip(self.wavevectors.tolist(), self.phases.tolist()):
            yield (kx, ky, kz), kx * x + ky * y + kz * z + phase

    @property
    def _norm(self) -> float:
        return float(np.sqrt(2.0 / len(self.phases)))

    def __call__(self, x, y, z):
        """Field values with unit root-mean-square."""
        return sum(np.cos(arg) for _, arg in self._arguments(x, y, z)) * self._norm

    def grid_factors(self, xs, ys, zs) -> tuple[np.ndarray, np.ndarray]:
        """The field on the grid ``xs`` x ``ys`` x ``zs`` as ``(left @ right).reshape(...)``.

        ``cos(u + kz z) = cos(u) cos(kz z) - sin(u) sin(kz z)`` with ``u = kx x + ky y + phase`` splits
        every wave into an in-plane and an axial factor, so a whole volume is one matrix product.
        """
        kx, ky, kz = (self.wavevectors[:, axis, None, None] for axis in range(3))
        in_plane = kx * xs[None, :, None] + ky * ys[None, None, :] + self.phases[:, None, None]
        left = np.concatenate([np.cos(in_plane), -np.sin(in_plane)]).reshape(2 * len(self.phases), -1).T
        axial = self.wavevectors[:, 2, None] * zs[None, :]
        right = np.concatenate([np.cos(axial), np.sin(axial)]) * self._norm
        return left.astype(np.float32), right.astype(np.float32)

    def distance_to_zero_set(self, x, y, z):
        """Approximate distance (mm) to the field's zero level set: winding sheets used as sulci."""
        value, gx, gy, gz = 0.0, 0.0, 0.0, 0.0
        for (kx, ky, kz), arg in self._arguments(x, y, z):
            value = value + np.cos(arg)
            sine = np.sin(arg)
            gx, gy, gz = gx - kx * sine, gy - ky * sine, gz - kz * sine
        gradient = np.sqrt(gx * gx + gy * gy + gz * gz)
        return np.abs(value) / np.maximum(gradient, 1e-3)


@dataclass(frozen=True)
class _Subject:
    """Everything random about one subject, drawn in a fixed order from its seed."""

    scale: np.ndarray
    rotation: np.ndarray
    translation: np.ndarray
    deformation: tuple[_PlaneWaves, _PlaneWaves, _PlaneWaves]
    deformation_mm: float
    fat_factor: float
    skull_factor: float
    atrophy: float
    frontal_sinus: float
    sinus_factor: float
    gyri: _PlaneWaves
    folia: _PlaneWaves
    texture: _PlaneWaves
    bias: _PlaneWaves
    bias_strength: float
    ct_hu: np.ndarray
    mr_t1: np.ndarray
    ct_noise_hu: float
    mr_noise_fraction: float

    @classmethod
    def draw(cls, seed: int) -> _Subject:
        rng = np.random.default_rng(seed)
        scale = rng.uniform(0.9, 1.1) * rng.uniform(0.97, 1.03, size=3)
        angles = np.radians(rng.uniform(-4.0, 4.0, size=3))
        translation = rng.uniform(-4.0, 4.0, size=3)
        deformation = tuple(_PlaneWaves.draw(rng, 4, (80.0, 200.0)) for _ in range(3))
        deformation_mm = rng.uniform(1.5, 3.0)
        fat_factor, skull_factor = rng.uniform(0.6, 1.5), rng.uniform(0.85, 1.2)
        atrophy, frontal_sinus, sinus_factor = rng.uniform(0.8, 1.6), rng.uniform(0.4, 1.2), rng.uniform(0.85, 1.15)
        gyri = _PlaneWaves.draw(rng, 12, (12.0, 20.0))
        folia = _PlaneWaves.draw(rng, 8, (6.0, 9.0))
        texture = _PlaneWaves.draw(rng, 8, (10.0, 40.0))
        bias = _PlaneWaves.draw(rng, 4, (150.0, 300.0))
        bias_strength = rng.uniform(0.08, 0.2)
        ct_hu = _CT_HU + rng.uniform(-4.0, 4.0, size=_CT_HU.size).astype(np.float32)
        ct_hu[[AIR, SINUS_AIR]] = -1000.0
        ct_hu[FAT] += rng.uniform(-10.0, 10.0)
        ct_hu[CORTICAL_BONE] = rng.uniform(1250.0, 1750.0)
        ct_hu[MARROW] = rng.uniform(350.0, 550.0)
        mr_t1 = _MR_T1 * rng.uniform(0.93, 1.07, size=_MR_T1.size).astype(np.float32) * rng.uniform(0.8, 1.2)
        return cls(
            scale=scale,
            rotation=_rotation_matrix(angles),
            translation=translation,
            deformation=deformation,
            deformation_mm=deformation_mm,
            fat_factor=fat_factor,
            skull_factor=skull_factor,
            atrophy=atrophy,
            frontal_sinus=frontal_sinus,
            sinus_factor=sinus_factor,
            gyri=gyri,
            folia=folia,
            texture=texture,
            bias=bias,
            bias_strength=bias_strength,
            ct_hu=ct_hu.astype(np.float32),
            mr_t1=mr_t1.astype(np.float32),
            ct_noise_hu=rng.uniform(10.0, 20.0),
            mr_noise_fraction=rng.uniform(0.015, 0.03),
        )


def _rotation_matrix(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    about_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    about_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    about_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return about_z @ about_y @ about_x


def demo_affine(shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING) -> np.ndarray:
    """RAS affine of the demo grid: axis-aligned ``spacing``, volume centred on the world origin."""
    shape, spacing = np.asarray(shape, dtype=np.float64), np.asarray(spacing, dtype=np.float64)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(shape - 1) / 2 * spacing
    return affine


def _canonical_coordinates(subject: _Subject, shape, spacing, affine):
    """Canonical head coordinates (mm) of every voxel: undo pose, size and the smooth deformation.

    ``p = R^T (world - origin - d(world)) / scale``. The deformation ``d`` and its rotation are sums
    of plane waves, evaluated on the whole grid as matrix products (see ``grid_factors``).
    """
    world = [affine[axis, 3] + spacing[axis] * np.arange(n) for axis, n in enumerate(shape)]
    origin = np.array([0.0, 0.0, HEAD_Z_OFFSET]) + subject.translation
    relative = [world[axis] - origin[axis] for axis in range(3)]
    factors = [field.grid_factors(*world) for field in subject.deformation]
    left = np.concatenate([f[0] for f in factors], axis=1)
    coordinates = []
    for axis in range(3):
        column = subject.rotation[:, axis]
        right = np.concatenate([column[j] * subject.deformation_mm * factors[j][1] for j in range(3)])
        rotated_displacement = (left @ right.astype(np.float32)).reshape(shape)
        rotated_position = (
            (column[0] * relative[0]).astype(np.float32)[:, None, None]
            + (column[1] * relative[1]).astype(np.float32)[None, :, None]
            + (column[2] * relative[2]).astype(np.float32)[None, None, :]
        )
        coordinates.append((rotated_position - rotated_displacement) * np.float32(1.0 / subject.scale[axis]))
    return coordinates


def _skin_depth(x, y, z):
    """Depth (mm) below the skin of an egg-shaped cranium that narrows slowly into face and neck."""
    a, b_ant, b_post, c = HEAD_SEMI_AXES
    b = np.where(y > 0, np.float32(b_ant), np.float32(b_post))
    z_eff = z + (1.0 - NECK_TAPER) * _smooth_ramp(NECK_START_Z - z, NECK_SOFTNESS)
    dz_eff = 1.0 - (1.0 - NECK_TAPER) * _smooth_ramp_slope(NECK_START_Z - z, NECK_SOFTNESS)
    qx, qy, qz = x / a, y / b, z_eff / c
    r = np.sqrt(qx * qx + qy * qy + qz * qz)
    r_grad = np.sqrt((qx / a) ** 2 + (qy / b) ** 2 + (qz * dz_eff / c) ** 2)
    return (1.0 - r) * r / np.maximum(r_grad, 1e-6)


def _cranial_floor(x, y):
    """Height (mm) of the floor of the cranial cavity: posterior, middle and anterior fossae, sella.

    The steps between the fossae run obliquely like the petrous ridges (back and out) and the
    sphenoid wings (forward and out); the middle fossae deepen laterally into bowls.
    """
    lateral = np.abs(x)
    petrous_ridge = _sigmoid((y + 5.0 + 0.5 * lateral) / 6.0)
    sphenoid_wing = _sigmoid((y - 18.0 - 0.3 * lateral) / 6.0)
    floor = -56.0 + (22.0 - 6.0 * (lateral / 45.0) ** 2) * petrous_ridge + 28.0 * sphenoid_wing
    return floor + 12.0 * np.exp(-(x * x + (y - 5.0) ** 2) / 144.0)


def _skull_base_thickness(x, y):
    return 9.0 + 9.0 * np.exp(-((x / 16.0) ** 2) - ((y - 10.0) / 18.0) ** 2)  # thick sphenoid body


def _label_head(subject: _Subject, x, y, z, skin_depth) -> np.ndarray:
    """Tissue label of each point (flat arrays of canonical coordinates inside or near the head)."""
    labels = np.zeros(x.shape, dtype=np.uint8)
    depth = skin_depth

    # Scalp: skin, subcutaneous fat, then galea / temporal muscle (thick over the temporal fossa).
    fat_mm = 3.5 * subject.fat_factor
    lateral = x * x / (x * x + y * y + 1.0)
    muscle_mm = 1.0 + 5.0 * np.exp(-(((z + 5.0) / 20.0) ** 2) - ((y - 10.0) / 40.0) ** 2) * lateral
    soft_mm = SKIN_MM + fat_mm + muscle_mm
    labels[depth > 0] = SKIN
    labels[depth > SKIN_MM] = FAT
    labels[depth > SKIN_MM + fat_mm] = MUSCLE  # also the deep soft tissue of face and neck

    # Skull: vault of varying thickness (thicker over the frontal sinus and the occiput), skull base.
    skull_mm = subject.skull_factor * (
        6.5
        + 8.0 * np.exp(-((x / 25.0) ** 2) - ((z - 6.0) / 12.0) ** 2) * _sigmoid(y / 10.0)
        + 4.0 * np.exp(-((x / 20.0) ** 2) - ((z + 18.0) / 15.0) ** 2) * _sigmoid(-y / 10.0)
    )
    below_scalp = depth - soft_mm
    floor = _cranial_floor(x, y)
    cranial_depth = _smooth_min(below_scalp - skull_mm, z - floor, 12.0)  # positive inside the cavity
    base_bottom = floor - _skull_base_thickness(x, y)
    vault_bone_depth = np.minimum(np.minimum(below_scalp, -cranial_depth), z - base_bottom)
    face_bone_depth = np.minimum(
        _ellipsoid_depth(x, y, z, (0, 46, -50), (35, 27, 19)), depth - SKIN_MM - fat_mm - 1.0
    )
    vertebra_bone_depth = np.minimum(
        np.maximum(  # body and dens of the upper cervical spine, ring of the atlas
            _ellipsoid_depth(x, y, z, (0, 6, -80), (11, 9, 22)), _ellipsoid_depth(x, y, z, (0, -10, -72), (17, 17, 6))
        ),
        base_bottom - 4.0 - z,
    )
    bone_depth = np.maximum(np.maximum(vault_bone_depth, face_bone_depth), vertebra_bone_depth)

    # Cavities in and below the skull: air sinuses, orbits, spinal canal. Their walls are cortical.
    sf = subject.sinus_factor
    frontal_sinus = np.minimum(
        _ellipsoid_depth(x, y, z, (0, 60, 8), (17 * subject.frontal_sinus, 40, 10 * subject.frontal_sinus)),
        np.minimum(below_scalp - 2.2, skull_mm - 2.2 - below_scalp),
    )
    air = [
        frontal_sinus,
        _ellipsoid_depth(x, y, z, (0, 12, -32), (9 * sf, 9 * sf, 5.5 * sf)),  # sphenoid
        _ellipsoid_depth(x, y, z, (0, 46, -24), (7 * sf, 15 * sf, 10 * sf)),  # ethmoid cells, between the orbits
        _ellipsoid_depth(x, y, z, (17, 46, -50), (11 * sf, 15 * sf, 13 * sf)),  # maxillary, right
        _ellipsoid_depth(x, y, z, (-17, 46, -50), (11 * sf, 15 * sf, 13 * sf)),  # maxillary, left
        _ellipsoid_depth(x, y, z, (0, 50, -50), (4.5, 22, 14)),  # nasal cavity
        _ellipsoid_depth(x, y, z, (0, 22, -60), (10, 7, 12)),  # nasopharynx
    ]
    air_depth = np.maximum.reduce(air)
    orbit_depth = np.maximum(
        _ellipsoid_depth(x, y, z, (29, 44, -20), (15, 24, 14), yaw_deg=-20.0),
        _ellipsoid_depth(x, y, z, (-29, 44, -20), (15, 24, 14), yaw_deg=20.0),
    )
    eye_depth = np.maximum(
        _ellipsoid_depth(x, y, z, (31, 54, -20), (11.5, 11.5, 11.5)),
        _ellipsoid_depth(x, y, z, (-31, 54, -20), (11.5, 11.5, 11.5)),
    )
    canal_radius = np.sqrt(x * x + (y + 12.0) ** 2)
    canal_depth = np.where(z < floor + 2.0, 10.0 - canal_radius, -100.0)
    cavity_depth = np.maximum(np.maximum(air_depth, orbit_depth), canal_depth)

    bone_depth = np.minimum(bone_depth, -cavity_depth)
    in_bone = (bone_depth > 0) & (depth > SKIN_MM + fat_mm)
    labels[in_bone] = MARROW
    labels[in_bone & (bone_depth < CORTICAL_TABLE_MM * subject.skull_factor)] = CORTICAL_BONE

    under_fat = depth > SKIN_MM + fat_mm
    labels[under_fat & (air_depth > 0)] = SINUS_AIR
    outside_cranium = cranial_depth <= 0
    labels[(depth > SKIN_MM) & (orbit_depth > 0) & outside_cranium] = FAT
    labels[(depth > SKIN_MM) & (eye_depth > 0) & outside_cranium] = EYE
    labels[under_fat & (canal_depth > 0)] = CSF
    labels[under_fat & (canal_depth > 4.0)] = WHITE_MATTER  # spinal cord

    inside = cranial_depth > 0
    labels[inside] = CSF
    _label_brain(subject, labels, inside, x, y, z, cranial_depth)
    return labels


def _label_brain(subject: _Subject, labels, inside, x, y, z, cranial_depth) -> None:
    """Paint the cranial cavity: CSF/dura layer, cortex and white matter, deep nuclei, ventricles."""
    idx = np.flatnonzero(inside)
    x, y, z, cranial_depth = x[idx], y[idx], z[idx], cranial_depth[idx]
    brain = np.full(idx.shape, CSF, dtype=np.uint8)
    atrophy = subject.atrophy
    brain_depth = cranial_depth - CSF_LAYER_MM * atrophy

    # Cerebrum: cortex ribbon folded by sulci (zero sheets of a random field) over white matter.
    sulcus = subject.gyri.distance_to_zero_set(x, y, z)
    sulcus_mm, sulcus_depth = 0.6 * atrophy, 12.0
    fissure = np.abs(x) * np.where((z > 16.0) | (y > 34.0) | (y < -40.0), 1.0, 100.0)
    # The lateral (Sylvian) fissure: a sheet rising backwards at 30 degrees, cut in from the side.
    sylvian = np.abs(0.866 * (z + 5.0) - 0.5 * (y - 10.0)) / 1.5
    sylvian = np.where((brain_depth < 25.0) & (np.abs(x) > 25.0) & (y > -35.0) & (y < 30.0), sylvian, 100.0)
    cleft = np.minimum(np.minimum(np.where(brain_depth < sulcus_depth, sulcus, 100.0), fissure), sylvian)
    brain[brain_depth > 0] = WHITE_MATTER
    brain[(brain_depth > 0) & ((brain_depth < CORTEX_MM) | (cleft < sulcus_mm + CORTEX_MM))] = GREY_MATTER
    brain[(brain_depth > 0) & (cleft < sulcus_mm)] = CSF

    # Deep grey nuclei (caudate, lentiform, thalamus) and the basal cisterns.
    nuclei = np.maximum.reduce(
        [
            _ellipsoid_depth(np.abs(x), y, z, (12, 14, 8), (5, 8, 8)),
            _ellipsoid_depth(np.abs(x), y, z, (22, 4, 0), (6, 14, 10)),
            _ellipsoid_depth(np.abs(x), y, z, (9, -14, 2), (8, 11, 8)),
        ]
    )
    brain[(nuclei > 0) & (brain_depth > CORTEX_MM)] = DEEP_GREY
    brain[_ellipsoid_depth(x, y, z, (0, 4, -21), (13, 10, 5)) > 0] = CSF

    # Ventricles: lateral ventricles curve out and down towards their horns; a slit-like third.
    bend = (y + 2.0) ** 2
    lateral_ventricle = _ellipsoid_depth(
        np.abs(x) - (7.0 + 0.003 * bend), y, z + 0.006 * bend, (0, -2, 10), (4.5 * atrophy, 26, 7 * atrophy)
    )
    third_ventricle = _ellipsoid_depth(x, y, z, (0, -4, -2), (1.5 * atrophy, 10, 8))
    brain[np.maximum(lateral_ventricle, third_ventricle) > 0] = CSF

    # Posterior fossa below the tentorium: foliated cerebellum around a white-matter core, brainstem.
    tentorium = -14.0 + 0.3 * (y + 12.0)
    below_tentorium = (y < -12.0) & (z < tentorium)
    cerebellar_depth = np.minimum(brain_depth, tentorium - z)
    folium = subject.folia.distance_to_zero_set(x, y, z)
    cerebellum = np.where(
        (cerebellar_depth > 9.0) | ((folium > 2.0) & (cerebellar_depth > 5.0)), WHITE_MATTER, GREY_MATTER
    ).astype(np.uint8)
    cerebellum[(folium < 0.35 * atrophy) & (cerebellar_depth < 9.0)] = CSF
    cerebellum[brain_depth <= 0] = CSF
    cerebellum[np.abs(tentorium - z) < 1.0] = CSF
    brain[below_tentorium] = cerebellum[below_tentorium]
    brainstem = _ellipsoid_depth(x, y + 14.0, (z + 36.0) + 0.25 * (y + 14.0), (0, 0, 0), (11, 12, 26))
    brain[brainstem > 0] = WHITE_MATTER
    brain[_ellipsoid_depth(x, y, z, (0, -27, -34), (5, 3.5, 6)) > 0] = CSF  # fourth ventricle
    labels[idx] = brain


def _blur(volume: np.ndarray, spacing, psf_mm: float) -> np.ndarray:
    """Partial-volume and scanner blur: the voxel box (std spacing/sqrt(12)) plus a Gaussian PSF."""
    sigma = [float(np.sqrt(1.0 / 12.0 + (psf_mm / s) ** 2)) for s in spacing]
    return ndimage.gaussian_filter(volume, sigma, mode="nearest", truncate=3.0)


def generate_head_phantom(seed: int, shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING) -> dict:
    """One subject's paired head phantom on a ``shape`` grid of ``spacing`` mm, axial slices along k.

    Returns ``mr`` (float32 T1-like, background 0), ``ct`` (float32 HU in [-1024, 3071], background
    -1000), ``mask`` (uint8 body mask: the head grown by twice the finest spacing), ``affine`` (4x4
    RAS, volume centred near the origin) and ``labels`` (uint8 tissue at each voxel centre, indexing
    ``TISSUE_NAMES``; ground truth for per-tissue checks). The same seed gives identical arrays; the
    anatomy is defined in mm, so a seed gives the same subject on any grid (noise aside).
    """
    shape, spacing = _check_grid(shape, spacing)
    subject = _Subject.draw(int(seed))
    affine = demo_affine(shape, spacing)
    x, y, z = _canonical_coordinates(subject, shape, spacing, affine)
    skin_depth = _skin_depth(x, y, z)
    mask = (skin_depth > -2.0 * min(spacing)).astype(np.uint8)

    # Tissues, texture and noise are computed on the voxels near the head only.
    near = np.flatnonzero(skin_depth > -2.0 * min(spacing) - 3.0)
    x, y, z = x.ravel()[near], y.ravel()[near], z.ravel()[near]
    labels = _label_head(subject, x, y, z, skin_depth.ravel()[near])
    texture = subject.texture(x, y, z)
    ct_near = subject.ct_hu[labels] + texture * _CT_TEXTURE[labels]
    mr_near = subject.mr_t1[labels] * (1.0 + texture * _MR_TEXTURE[labels])
    mr_near *= np.exp(subject.bias_strength * subject.bias(x, y, z))
    label_map = np.zeros(int(np.prod(shape)), dtype=np.uint8)
    label_map[near] = labels
    ct = np.full(int(np.prod(shape)), -1000.0, dtype=np.float32)
    mr = np.zeros(int(np.prod(shape)), dtype=np.float32)
    ct[near], mr[near] = ct_near, mr_near
    ct, mr = _blur(ct.reshape(shape), spacing, 0.7), _blur(mr.reshape(shape), spacing, 0.9)

    rng = np.random.default_rng([int(seed), *shape])  # noise depends on the grid, anatomy does not
    inside = mask.astype(bool)
    n_inside = int(inside.sum())
    ct[inside] += rng.normal(0.0, subject.ct_noise_hu, n_inside).astype(np.float32)
    ct[~inside] = -1000.0
    mr_sigma = subject.mr_noise_fraction * float(subject.mr_t1[WHITE_MATTER])
    real = mr[inside] + rng.normal(0.0, mr_sigma, n_inside).astype(np.float32)
    imaginary = rng.normal(0.0, mr_sigma, n_inside).astype(np.float32)
    mr[inside] = np.sqrt(real * real + imaginary * imaginary)  # magnitude of complex noise: Rician
    mr[~inside] = 0.0
    return {
        "mr": mr,
        "ct": np.clip(ct, *CT_RANGE).astype(np.float32),
        "mask": mask,
        "affine": affine,
        "labels": label_map.reshape(shape),
    }


def _check_grid(shape, spacing) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    shape, spacing = tuple(shape), tuple(spacing)
    if len(shape) != 3 or any(int(n) != n or n < 1 for n in shape):
        raise ValueError(f"demo shape must be three positive integers, got {shape}")
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"demo spacing must be three positive finite numbers (mm), got {spacing}")
    return tuple(int(n) for n in shape), tuple(float(s) for s in spacing)


# ---------------------------------------------------------------------------------------------
# Writing the dataset
# ---------------------------------------------------------------------------------------------
def _case_seed(seed: int, pool: int, index: int) -> int:
    """Independent per-case seeds: paired (pool 0) and unpaired (pool 1) subjects never coincide."""
    return int(np.random.SeedSequence([int(seed), pool, index]).generate_state(1)[0])


def has_demo_dataset(out_dir: str | os.PathLike) -> bool:
    """True when ``out_dir`` holds a demo dataset that was written completely."""
    manifest = _read_manifest(Path(out_dir))
    return bool(manifest and manifest.get("complete"))


def _read_manifest(out_dir: Path) -> dict | None:
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"complete": False}


def _write_manifest(out_dir: Path, content: dict) -> None:
    tmp = out_dir / f"{MANIFEST_NAME}.partial"
    tmp.write_text(json.dumps(content, indent=1))
    os.replace(tmp, out_dir / MANIFEST_NAME)


def _existing_demo_entries(out_dir: Path) -> list[Path]:
    """Files and folders at the places a demo dataset writes to."""
    paired, pool = out_dir / PAIRED_DIR, out_dir / POOL_DIR
    entries = sorted(p for p in paired.iterdir() if _PAIRED_ID_RE.match(p.name)) if paired.is_dir() else []
    return entries + (sorted(pool.iterdir()) if pool.is_dir() else [])


def _remove_demo_files(out_dir: Path) -> None:
    """Delete what a (possibly interrupted) demo run wrote; leave anything else untouched."""
    def is_ours(path: Path, names) -> bool:
        # Completed files, and temporaries of writes killed before their atomic rename.
        return path.is_file() and (path.name in names or any(path.name.startswith(f".{n}.") for n in names))

    paired = out_dir / PAIRED_DIR
    for case in sorted(paired.iterdir()) if paired.is_dir() else []:
        if case.is_dir() and _PAIRED_ID_RE.match(case.name):
            for path in case.iterdir():
                if is_ours(path, _CASE_FILES):
                    path.unlink()
    pool = out_dir / POOL_DIR
    for path in sorted(pool.iterdir()) if pool.is_dir() else []:
        if _UNPAIRED_FILE_RE.match(path.name) or (path.name.startswith(".1BP") and ".partial" in path.name):
            path.unlink()
    for folder in [*(sorted(paired.iterdir()) if paired.is_dir() else []), pool, paired, paired.parent]:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)


def _prepare_output(out_dir: Path, overwrite: bool) -> None:
    manifest = _read_manifest(out_dir)
    if manifest is None:
        existing = _existing_demo_entries(out_dir) if out_dir.is_dir() else []
        if existing:
            raise OutputExistsError(
                f"{out_dir}: holds {existing[0].relative_to(out_dir)}, which drdd-med did not write as demo "
                "data; write the demo dataset to an empty folder"
            )
        return
    if not overwrite:
        if manifest.get("complete"):
            raise OutputExistsError(
                f"{out_dir}: holds a demo dataset already ({manifest.get('num_paired')} paired, "
                f"{manifest.get('num_unpaired')} unpaired cases); pass overwrite (--overwrite) to regenerate it"
            )
        raise OutputExistsError(
            f"{out_dir}: holds a partially written demo dataset (an interrupted run); rerun with overwrite "
            "(--overwrite) to regenerate it, or delete the folder"
        )
    _remove_demo_files(out_dir)


def write_demo_dataset(
    out_dir: str | os.PathLike,
    num_paired: int = 16,
    num_unpaired: int = 8,
    shape=DEFAULT_SHAPE,
    spacing=DEFAULT_SPACING,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Write a demo dataset: paired cases in the SynthRAD2023 layout and an unpaired CT pool.

    ``OUT/Task1/brain/1BA001/{mr,ct,mask}.nii.gz`` ... for ``num_paired`` subjects and
    ``OUT/ct_pool/1BP001.nii.gz`` ... (CT only) for ``num_unpaired`` other subjects. Every file is
    written atomically; a hidden manifest (``.drdd-demo-manifest``) marks the run as in progress and
    then complete, so an interrupted run is recognised. An existing demo dataset raises
    ``OutputExistsError`` unless ``overwrite``, which deletes the old demo files first; data that
    drdd-med did not write is never overwritten. The same arguments give identical voxel data.

    Returns a summary: counts, grid, seed and, per case, its id and paths relative to ``out_dir``.
    """
    out_dir = Path(out_dir)
    for name, count in (("num_paired", num_paired), ("num_unpaired", num_unpaired)):
        if int(count) != count or not 0 <= count <= MAX_CASES:
            raise ValueError(f"{name} must be an integer from 0 to {MAX_CASES}, got {count}")
    if num_paired + num_unpaired == 0:
        raise ValueError("a demo dataset needs at least one case")
    shape, spacing = _check_grid(shape, spacing)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir}: exists and is not a folder")
    _prepare_output(out_dir, overwrite)

    started = time.perf_counter()
    summary = {
        "num_paired": int(num_paired),
        "num_unpaired": int(num_unpaired),
        "shape": list(shape),
        "spacing": list(spacing),
        "seed": int(seed),
        "paired": [],
        "unpaired": [],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_manifest(out_dir, {**summary, "complete": False})
    for index in range(num_paired):
        case_id = PAIRED_ID.format(index + 1)
        phantom = generate_head_phantom(_case_seed(seed, 0, index), shape, spacing)
        case = {"id": case_id}
        for key, dtype in (("mr", np.float32), ("ct", np.int16), ("mask", np.uint8)):
            relative = PAIRED_DIR / case_id / f"{key}.nii.gz"
            write_volume(phantom[key], phantom["affine"], out_dir / relative, dtype=dtype)
            case[key] = relative.as_posix()
        summary["paired"].append(case)
    for index in range(num_unpaired):
        case_id = UNPAIRED_ID.format(index + 1)
        phantom = generate_head_phantom(_case_seed(seed, 1, index), shape, spacing)
        relative = POOL_DIR / f"{case_id}.nii.gz"
        write_volume(phantom["ct"], phantom["affine"], out_dir / relative, dtype=np.int16)
        summary["unpaired"].append({"id": case_id, "ct": relative.as_posix()})
    _write_manifest(out_dir, {**summary, "complete": True})
    logger.info(
        "wrote demo dataset to %s: %d paired and %d unpaired head phantoms, %s voxels at %s mm, seed %d, in %.1f s",
        out_dir,
        num_paired,
        num_unpaired,
        "x".join(map(str, shape)),
        "x".join(f"{s:g}" for s in spacing),
        seed,
        time.perf_counter() - started,
    )
    return summary
