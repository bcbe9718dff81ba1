"""Augmentation of training slices: rotation, zoom, vertical and horizontal flip (the paper's set).

Augmentation is applied to the **HU image**, before the engine's own preprocessing
(:func:`spinelevel.engine.preprocess.preprocess_slice`), so the windowing, resize and normalisation
that the model sees in training are byte-for-byte the ones of inference. The affine warp (rotation
about the image centre and isotropic zoom) resamples bilinearly in numpy; pixels that come from
outside the image are air (-1000 HU), as outside a CT reconstruction circle.

Every slice draws its parameters from its own generator, seeded from (seed, epoch, item), so an
epoch's augmentation is the same whatever the number of loader workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["AugmentSpec", "AugmentParams", "draw_params", "augment_hu"]

_AIR_HU = -1000.0


@dataclass(frozen=True)
class AugmentSpec:
    """What augmentation draws from."""

    # Largest rotation in degrees; each slice rotates by a uniform draw in [-rotation, rotation].
    rotation_deg: float = 10.0
    # Zoom factor range: uniform in [1 - zoom, 1 + zoom] (> 1 enlarges the anatomy).
    zoom: float = 0.1
    # Probability of flipping the image top-bottom (anterior-posterior).
    vflip: float = 0.5
    # Probability of flipping the image left-right.
    hflip: float = 0.5
    # False switches augmentation off (validation, export parity, tests).
    enabled: bool = True


@dataclass(frozen=True)
class AugmentParams:
    """The draw for one slice."""

    # Rotation in degrees (clockwise on the displayed image, rows running downwards).
    rotation_deg: float
    # Isotropic zoom factor.
    zoom: float
    # Flip top-bottom.
    vflip: bool
    # Flip left-right.
    hflip: bool


def draw_params(spec: AugmentSpec, rng: np.random.Generator) -> AugmentParams:
    """Draw one slice's augmentation (identity when ``spec.enabled`` is False)."""
    if not spec.enabled:
        return AugmentParams(0.0, 1.0, False, False)
    return AugmentParams(
        rotation_deg=float(rng.uniform(-spec.rotation_deg, spec.rotation_deg)),
        zoom=float(rng.uniform(1.0 - spec.zoom, 1.0 + spec.zoom)),
        vflip=bool(rng.random() < spec.vflip),
        hflip=bool(rng.random() < spec.hflip),
    )


def augment_hu(hu: np.ndarray, params: AugmentParams) -> np.ndarray:
    """Apply ``params`` to one (H, W) HU slice; returns a new float32 (H, W) array."""
    hu = np.asarray(hu, dtype=np.float32)
    out = hu
    if params.rotation_deg != 0.0 or params.zoom != 1.0:
        out = _affine(hu, params.rotation_deg, params.zoom)
    if params.vflip:
        out = out[::-1, :]
    if params.hflip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out, dtype=np.float32)


def _affine(hu: np.ndarray, rotation_deg: float, zoom: float) -> np.ndarray:
    """Rotate about the image centre and zoom, bilinearly; outside the image is air.

    Plain numpy (a few ms for 512 x 512): torch's grid_sample would compete with the training
    step for the same cores.
    """
    h, w = hu.shape
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    theta = math.radians(rotation_deg)
    c, s = math.cos(theta) / zoom, math.sin(theta) / zoom
    y = np.arange(h, dtype=np.float32)[:, None] - np.float32(cy)
    x = np.arange(w, dtype=np.float32)[None, :] - np.float32(cx)
    # Source position of each output pixel (inverse map), +1 for the air border added below.
    sx = np.float32(c) * x + np.float32(s) * y + np.float32(cx + 1.0)
    sy = np.float32(-s) * x + np.float32(c) * y + np.float32(cy + 1.0)
    padded = np.pad(hu, 1, constant_values=np.float32(_AIR_HU))
    np.clip(sx, 0.0, w + 1.0, out=sx)
    np.clip(sy, 0.0, h + 1.0, out=sy)
    x0 = np.minimum(sx.astype(np.intp), w)
    y0 = np.minimum(sy.astype(np.intp), h)
    fx = sx - x0
    fy = sy - y0
    top = padded[y0, x0] * (1 - fx) + padded[y0, x0 + 1] * fx
    bottom = padded[y0 + 1, x0] * (1 - fx) + padded[y0 + 1, x0 + 1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)
