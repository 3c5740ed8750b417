"""Synthetic MRI-like phantoms with two adjacent labelled structures (Decathlon layout).

Each volume holds a curved, elongated structure (a "hippocampus") split into a thick
head (label 1, "anterior") and a thinner tail (label 2, "posterior"), embedded in a
textured brain-like blob with unlabelled distractor ellipsoids, a smooth multiplicative
bias field and Rician noise. Geometry is defined in millimetres, so anisotropic spacing
is honoured; it is scaled to the field of view so other shapes stay comparable.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from seg_transfer.atomic import write_atomic

log = logging.getLogger(__name__)

__all__ = ["make_phantom_dataset", "make_phantom_volume"]

DEFAULT_SHAPE = (48, 48, 32)
DEFAULT_SPACING = (1.0, 1.0, 1.5)
LABELS = {"0": "background", "1": "anterior", "2": "posterior"}
_CENTERLINE_POINTS = 48
_REFERENCE_FOV_MM = 48.0


# ----------------------------------------------------------------------------- geometry
def _grid_mm(shape, spacing) -> np.ndarray:
    """Voxel-centre coordinates in mm, centred on the volume: array (3, *shape)."""
    axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing)]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def _smooth_field(rng: np.random.Generator, shape, order: int = 4) -> np.ndarray:
    """Smooth random field of `shape`, unit standard deviation: random low-order cosine series."""
    bases = [np.cos(np.pi * np.arange(order)[:, None] * (np.arange(n)[None, :] + 0.5) / n) for n in shape]
    k = np.arange(order)
    damping = 1.0 / (1.0 + k[:, None, None] + k[None, :, None] + k[None, None, :])
    coef = rng.standard_normal((order, order, order)) * damping
    field = np.einsum("abc,ai,bj,ck->ijk", coef, *bases, optimize=True)
    return field / max(float(field.std()), 1e-6)


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation matrix Rz(yaw) @ Ry(pitch) @ Rx(roll); its columns are the local u, v, w axes."""
    cz, sz, cy, sy, cx, sx = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ ry @ rx


def _to_local(coords: np.ndarray, center: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """Express (3, *shape) world coordinates in the frame with origin `center` and axes rot[:, k]."""
    rel = coords - center.reshape(3, 1, 1, 1)
    return np.einsum("ji,j...->i...", rot, rel)


def _ellipsoid_sdf(coords: np.ndarray, center, semi_axes, rot) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to a rotated ellipsoid."""
    local = _to_local(coords, np.asarray(center, float), rot)
    semi = np.asarray(semi_axes, float).reshape(3, 1, 1, 1)
    rho = np.sqrt(np.sum((local / semi) ** 2, axis=0))
    return (rho - 1.0) * float(np.min(semi_axes))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random-ish rotation from three random Euler angles (used for distractors)."""
    return _rotation(*rng.uniform(-np.pi, np.pi, size=3))


def _structure_labels(rng: np.random.Generator, coords: np.ndarray, scale: float) -> np.ndarray:
    """Label map (uint8) of a curved tube: thick head = 1, thin tail = 2, touching at a cut.

    The centreline is a parabolic arc along local u, bent towards local v; the tube radius
    tapers from head to tail with a mild smooth wobble and an elliptical cross-section.
    Pose: yaw/roll vary around a canonical orientation, the head points downwards (pitch),
    so both halves are cut by a reasonable share of the axial (last-axis) slices.
    """
    length = rng.uniform(26.0, 34.0) * scale
    sagitta = rng.uniform(2.0, 6.0) * scale
    r_head, r_tail = rng.uniform(5.0, 6.5) * scale, rng.uniform(3.5, 4.5) * scale
    flatten = rng.uniform(0.75, 1.0)
    wobble_amp, wobble_freq, wobble_phase = rng.uniform(0.0, 0.12), rng.uniform(1.0, 2.5), rng.uniform(0, 2 * np.pi)
    t_split = rng.uniform(0.42, 0.55)
    rot = _rotation(rng.uniform(-0.5, 0.5) + np.pi / 6, rng.uniform(0.3, 0.55), rng.uniform(-0.5, 0.5))
    center = rng.uniform([-5.0, -5.0, -4.0], [5.0, 5.0, 4.0]) * scale

    local = _to_local(coords, center, rot)
    local[2] /= flatten  # elliptical cross-section: thinner along w
    t_all = np.linspace(0.0, 1.0, _CENTERLINE_POINTS)
    u_c = (t_all - 0.5) * length
    v_c = sagitta * (1.0 - (2.0 * u_c / length) ** 2)
    best_d2 = np.full(coords.shape[1:], np.inf)
    best_t = np.zeros(coords.shape[1:])
    for t, u, v in zip(t_all, u_c, v_c):
        d2 = (local[0] - u) ** 2 + (local[1] - v) ** 2 + local[2] ** 2
        closer = d2 < best_d2
        best_d2 = np.where(closer, d2, best_d2)
        best_t = np.where(closer, t, best_t)
    taper = r_head + (r_tail - r_head) * best_t ** 0.8
    radius = taper * (1.0 + wobble_amp * np.sin(2 * np.pi * wobble_freq * best_t + wobble_phase))
    # Past either end the nearest centreline point is the end point, so the ends are rounded caps.
    inside = best_d2 <= radius ** 2
    labels = np.zeros(coords.shape[1:], np.uint8)
    labels[inside & (best_t < t_split)] = 1
    labels[inside & (best_t >= t_split)] = 2
    return labels


# ----------------------------------------------------------------------------- appearance
def _soft_mask(sdf: np.ndarray, width: float = 0.7) -> np.ndarray:
    """Partial-volume-like occupancy in [0, 1] from a signed distance (mm)."""
    return 1.0 / (1.0 + np.exp(np.clip(sdf / width, -40, 40)))


def _bias_field(rng: np.random.Generator, coords: np.ndarray, strength: float) -> np.ndarray:
    """Smooth multiplicative bias: exp of a random 2nd-order polynomial; ~±strength at the edges."""
    half = np.abs(coords).reshape(3, -1).max(axis=1).reshape(3, 1, 1, 1)
    x = coords / np.maximum(half, 1e-6)
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    linear = np.einsum("i,i...->...", direction, x) * rng.uniform(0.6, 1.0)
    quad_coef = rng.uniform(-0.4, 0.4, size=3)
    quadratic = np.einsum("i,i...->...", quad_coef, x ** 2 - 1.0 / 3.0)
    return np.exp(strength * (linear + quadratic)).astype(np.float32)


def make_phantom_volume(
    rng: np.random.Generator,
    shape=DEFAULT_SHAPE,
    *,
    spacing=DEFAULT_SPACING,
    bias_strength: float = 0.3,
    noise_level: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (image float32 >= 0, label uint8 in {0, 1, 2}) of `shape`.

    Deterministic given the generator state. The random draws do not depend on
    `bias_strength` or `noise_level`, so the same seed with a different bias strength yields
    the same anatomy (useful for tests). `spacing` (mm) sets the physical voxel size.
    """
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    coords = _grid_mm(shape, spacing)
    scale = min(n * s for n, s in zip(shape, spacing)) / _REFERENCE_FOV_MM
    warp = np.stack([_smooth_field(rng, shape) for _ in range(3)]) * (1.5 * scale)
    warped = coords + warp

    labels = _structure_labels(rng, warped, scale)

    brain_level = rng.uniform(300.0, 400.0)
    brain_sdf = _ellipsoid_sdf(warped, rng.uniform(-2, 2, 3) * scale,
                               rng.uniform(24.0, 30.0, 3) * scale, _rotation(*rng.uniform(-0.3, 0.3, 3)))
    image = 15.0 + (brain_level - 15.0) * _soft_mask(brain_sdf, 1.5 * scale)

    for _ in range(int(rng.integers(4, 8))):
        bright = rng.random() < 0.5
        level = brain_level * (rng.uniform(1.1, 1.4) if bright else rng.uniform(0.35, 0.8))
        sdf = _ellipsoid_sdf(warped, rng.uniform(-16, 16, 3) * scale,
                             rng.uniform(2.5, 8.0, 3) * scale, _random_rotation(rng))
        occ = _soft_mask(sdf, 0.8 * scale)
        image = image * (1 - occ) + level * occ

    head_level = brain_level * rng.uniform(1.5, 1.8)
    tail_level = head_level * rng.uniform(0.8, 0.9)
    structure = np.where(labels == 1, head_level, tail_level)
    occ = ndimage.gaussian_filter((labels > 0).astype(float), 0.6)  # partial-volume edge
    image = image * (1 - occ) + structure * occ

    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 1.2)
    image *= 1.0 + 0.08 * texture / max(float(texture.std()), 1e-6)
    bias = _bias_field(rng, coords, bias_strength)
    gain = rng.uniform(0.6, 1.8)
    noise = rng.standard_normal((2, *shape)) * (noise_level * brain_level)  # drawn even if unused
    image = np.hypot(image * bias + noise[0], noise[1]) * gain
    return image.astype(np.float32), labels


# ----------------------------------------------------------------------------- writing
def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Save a gzipped NIfTI-1 atomically; bytes are reproducible (gzip mtime = 0)."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    write_atomic(path, gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))


def _affine(shape, spacing) -> np.ndarray:
    """diag(spacing) with the origin chosen so the volume centre sits at (0, 0, 0) mm."""
    aff = np.diag([*map(float, spacing), 1.0])
    aff[:3, 3] = [-(n - 1) / 2.0 * s for n, s in zip(shape, spacing)]
    return aff


def make_phantom_dataset(
    out_dir: str | Path,
    n_train: int = 24,
    n_test: int = 4,
    shape=DEFAULT_SHAPE,
    spacing=DEFAULT_SPACING,
    seed: int = 0,
) -> Path:
    """Write a Decathlon-layout dataset (dataset.json, imagesTr/, labelsTr/, imagesTs/); return out_dir.

    Training case i uses generator ``default_rng([seed, 0, i])`` and test case j
    ``default_rng([seed, 1, j])``, so cases do not depend on the counts. Every file is
    written atomically; dataset.json is written last.
    """
    if n_train < 0 or n_test < 0:
        raise ValueError("n_train and n_test must be non-negative")
    out = Path(out_dir)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    affine = _affine(shape, spacing)
    log.info("writing %d training + %d test phantom cases (%s voxels) to %s", n_train, n_test,
             "x".join(str(n) for n in shape), out)
    training, test = [], []
    for i in range(n_train):
        name = f"phantom_{i:03d}.nii.gz"
        image, label = make_phantom_volume(np.random.default_rng([seed, 0, i]), shape, spacing=spacing)
        _save_nifti(out / "imagesTr" / name, image, affine)
        _save_nifti(out / "labelsTr" / name, label, affine)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    for j in range(n_test):
        name = f"phantom_{n_train + j:03d}.nii.gz"
        image, _ = make_phantom_volume(np.random.default_rng([seed, 1, j]), shape, spacing=spacing)
        _save_nifti(out / "imagesTs" / name, image, affine)
        test.append(f"./imagesTs/{name}")
    meta = {
        "name": "Phantom",
        "description": "Synthetic MRI-like phantoms: curved structure split into anterior/posterior parts",
        "reference": "seg_transfer.data.phantoms",
        "licence": "CC0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": dict(LABELS),
        "numTraining": n_train,
        "numTest": n_test,
        "training": training,
        "test": test,
    }
    write_atomic(out / "dataset.json", (json.dumps(meta, indent=4) + "\n").encode())
    return out
