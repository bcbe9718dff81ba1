"""Preprocess: Hounsfield units to the model's input tensor, as the model card says.

The card math (DESIGN.md 3.1), in this order:

0. preprocessing version 2 only (card ``"preprocess": 2``, ``"fov_mm"``): a fixed physical field
   of view. The slice is cropped or padded with air (-1000 HU), centred, to ``fov_mm`` x ``fov_mm``
   by its PixelSpacing (``fov_box``: ``round(fov_mm / spacing)`` pixels per axis, the offset
   ``(H - rows) // 2``), so that the resize gives every series the same mm per pixel: anatomy has
   one size whatever the reconstruction diameter or matrix, and non-square slices or pixels keep
   their aspect. Without a PixelSpacing the slice is padded to a square instead. Version 1 (cards
   without the field) resizes the slice as it is, exactly as before;
0b. preprocessing version 3 only (card ``"preprocess": 3``): as version 2, then an antialiasing
   low-pass of the HU slice before the windows (``antialias_sigmas``): a separable Gaussian of
   ``max(0, (f - 1) / 2)`` source pixels per axis, ``f`` the source pixels per output pixel along
   it (scikit-image's ``rescale(anti_aliasing=True)`` rule), radius ``ceil(3 * sigma)``, normalised
   taps, borders mirrored without repeating the edge pixel (reflect-101, DALI's and OpenCV's
   default). Without it a 512 x 512 slice of 0.7-1 mm shrunk to 128 px is sampled, not averaged, and
   its fine texture and noise alias into the input (tests/data/real_ct/results_demo_v6.md);
1. one channel per HU window: ``clip((HU - (center - width / 2)) / width, 0, 1) * scale``;
2. bilinear resize to ``input_size`` with half-pixel centres and no antialiasing (the convention of
   OpenCV ``INTER_LINEAR``, PyTorch ``interpolate(mode="bilinear", align_corners=False)`` and DALI
   ``resize(interp_type=LINEAR, antialias=False)``), edge pixels replicated;
3. ``(x - mean) / std`` per channel; NCHW float32.

This is the one CPU implementation: the engine, training and the parity tests of other
implementations (DALI, torch) all call it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from spinelevel.card import ModelCard

__all__ = ["PreprocessSpec", "fov_box", "fit_fov", "antialias_sigmas", "gaussian_blur", "window_channels", "resize_bilinear", "preprocess_slice", "preprocess_batch"]

# HU of the padding of version-2 preprocessing (air, as decode.AIR_HU; not imported: decode pulls in pydicom).
_AIR_HU = -1000.0


@dataclass(frozen=True)
class PreprocessSpec:
    """The part of a model card that preprocessing needs (small, picklable for worker processes)."""

    # (center, width) in HU per channel.
    windows: tuple[tuple[float, float], ...]
    # Output (height, width).
    input_size: tuple[int, int]
    # Multiplier after windowing.
    scale: float = 1.0
    # Per-channel mean and std of the normalisation.
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    # Card preprocessing version 2: the field of view (mm, square) every slice is cropped or padded
    # to before windowing; None is version 1 (no crop or pad).
    fov_mm: float | None = None
    # Card preprocessing version 3: low-pass the HU slice before the resize (antialias_sigmas).
    antialias: bool = False

    @classmethod
    def from_card(cls, card: ModelCard) -> PreprocessSpec:
        """Take the preprocessing fields of a card."""
        return cls(
            windows=tuple((float(c), float(w)) for c, w in card.windows),
            input_size=(int(card.input_size[0]), int(card.input_size[1])),
            scale=float(card.scale),
            mean=tuple(float(v) for v in card.mean),
            std=tuple(float(v) for v in card.std),
            fov_mm=float(card.fov_mm) if int(card.preprocess) >= 2 else None,
            antialias=int(card.preprocess) >= 3,
        )


def fov_box(height: int, width: int, spacing: tuple[float, float] | None, fov_mm: float) -> tuple[int, int, int, int]:
    """(rows, cols, top, left) of the fixed field of view in the pixels of a (height, width) slice.

    ``rows x cols`` source pixels span ``fov_mm`` at ``spacing`` (row mm, column mm); ``top, left``
    is where that box starts in the slice (negative: padding above / left, positive: a crop), centred.
    Without a spacing the box is the square that holds the slice.
    """
    if spacing is None or not all(v > 0 for v in spacing):
        rows = cols = max(height, width)
    else:
        rows = max(1, int(round(fov_mm / float(spacing[0]))))
        cols = max(1, int(round(fov_mm / float(spacing[1]))))
    return rows, cols, (height - rows) // 2, (width - cols) // 2


def fit_fov(hu: np.ndarray, spacing: tuple[float, float] | None, fov_mm: float) -> np.ndarray:
    """The slice cropped or padded with air, centred, to ``fov_box`` (float32)."""
    h, w = hu.shape
    rows, cols, top, left = fov_box(h, w, spacing, fov_mm)
    if (rows, cols, top, left) == (h, w, 0, 0):
        return np.asarray(hu, dtype=np.float32)
    out = np.full((rows, cols), _AIR_HU, dtype=np.float32)
    r0, c0 = max(top, 0), max(left, 0)  # first source pixel inside the box
    r1, c1 = min(h, top + rows), min(w, left + cols)
    out[r0 - top : r1 - top, c0 - left : c1 - left] = hu[r0:r1, c0:c1]
    return out


def antialias_sigmas(height: int, width: int, size: tuple[int, int]) -> tuple[float, float]:
    """Gaussian sigmas (rows, columns), in source pixels, that low-pass a (height, width) slice
    before it is resized to ``size``: ``max(0, (f - 1) / 2)`` with ``f`` source pixels per output
    pixel (0 where the slice is enlarged)."""
    return (max(0.0, (height / float(size[0]) - 1.0) / 2.0), max(0.0, (width / float(size[1]) - 1.0) / 2.0))


def _gaussian_taps(sigma: float) -> np.ndarray:
    radius = int(math.ceil(3.0 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def gaussian_blur(hu: np.ndarray, sigmas: tuple[float, float]) -> np.ndarray:
    """Separable Gaussian of a 2-D float32 image: ``sigmas`` (rows, columns) in pixels, radius
    ``ceil(3 * sigma)``, reflect-101 borders; an axis with sigma 0 is left as it is."""
    out = np.asarray(hu, dtype=np.float32)
    cv2 = _cv2()
    for axis, sigma in enumerate(sigmas):
        if sigma <= 0.0:
            continue
        taps = _gaussian_taps(float(sigma))
        r = len(taps) // 2
        if cv2 is not None and out.shape[axis] > r:
            kx, ky = (taps, np.ones(1, np.float32)) if axis == 1 else (np.ones(1, np.float32), taps)
            out = cv2.sepFilter2D(out, cv2.CV_32F, kx, ky, borderType=cv2.BORDER_REFLECT_101)
            continue
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        padded = np.pad(out, pad, mode="reflect") if out.shape[axis] > 1 else np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        acc = np.zeros(out.shape, dtype=np.float32)
        for i, t in enumerate(taps):
            acc += t * (padded[i : i + n, :] if axis == 0 else padded[:, i : i + n])
        out = acc
    return out


def window_channels(hu: np.ndarray, windows: tuple[tuple[float, float], ...], scale: float = 1.0) -> np.ndarray:
    """(H, W) HU -> (C, H, W) float32, one clipped [0, scale] channel per (center, width)."""
    hu = np.asarray(hu, dtype=np.float32)
    out = np.empty((len(windows),) + hu.shape, dtype=np.float32)
    for i, (center, width) in enumerate(windows):
        low = np.float32(center - width / 2.0)
        np.subtract(hu, low, out=out[i])
        out[i] *= np.float32(1.0 / width)
        np.clip(out[i], 0.0, 1.0, out=out[i])
        if scale != 1.0:
            out[i] *= np.float32(scale)
    return out


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and weight of i1 for half-pixel-centre linear interpolation."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, w1


@lru_cache(maxsize=1)
def _cv2():  # noqa: ANN202
    """OpenCV when installed (its INTER_LINEAR is this module's convention, about 3x faster)."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize the last two axes of ``x`` to ``size`` (height, width) bilinearly, float32.

    Half-pixel centres, no antialiasing, edges replicated. Returns ``x`` itself (as float32) when
    the size already matches. Uses OpenCV's ``INTER_LINEAR`` (the same convention; agreement with
    the numpy path below is tested to 1e-5) when it is installed.
    """
    x = np.asarray(x, dtype=np.float32)
    h_out, w_out = int(size[0]), int(size[1])
    h_in, w_in = x.shape[-2], x.shape[-1]
    if (h_in, w_in) == (h_out, w_out):
        return x
    cv2 = _cv2()
    if cv2 is not None and x.ndim in (2, 3):
        if x.ndim == 2:
            return cv2.resize(x, (w_out, h_out), interpolation=cv2.INTER_LINEAR)
        return np.stack([cv2.resize(c, (w_out, h_out), interpolation=cv2.INTER_LINEAR) for c in x])
    return _resize_numpy(x, h_out, w_out)


def _resize_numpy(x: np.ndarray, h_out: int, w_out: int) -> np.ndarray:
    h_in, w_in = x.shape[-2], x.shape[-1]
    y0, y1, wy = _axis_weights(h_in, h_out)
    x0, x1, wx = _axis_weights(w_in, w_out)
    # np.take is faster than fancy indexing for these gathers
    top = np.take(x, y0, axis=-2)
    rows = top + (np.take(x, y1, axis=-2) - top) * wy[:, None]
    left = np.take(rows, x0, axis=-1)
    return left + (np.take(rows, x1, axis=-1) - left) * wx


def preprocess_slice(hu: np.ndarray, spec: PreprocessSpec, spacing: tuple[float, float] | None = None) -> np.ndarray:
    """(H, W) HU -> (C, h, w) float32 model input for one slice.

    ``spacing``: PixelSpacing (row mm, column mm) of the slice; used by preprocessing version 2.
    """
    if spec.fov_mm is not None:
        hu = fit_fov(np.asarray(hu, dtype=np.float32), spacing, spec.fov_mm)
    if spec.antialias:
        hu = gaussian_blur(hu, antialias_sigmas(hu.shape[0], hu.shape[1], spec.input_size))
    x = resize_bilinear(window_channels(hu, spec.windows, spec.scale), spec.input_size)
    if not x.flags.writeable or x.base is not None:
        x = np.array(x, dtype=np.float32)
    for i, (m, s) in enumerate(zip(spec.mean, spec.std)):
        if m != 0.0 or s != 1.0:
            x[i] -= np.float32(m)
            x[i] *= np.float32(1.0 / s)
    return x


def preprocess_batch(slices: list[np.ndarray], spec: PreprocessSpec, spacings: list[tuple[float, float] | None] | None = None) -> np.ndarray:
    """A list of (H, W) HU slices (sizes may differ) -> (N, C, h, w) float32."""
    out = np.empty((len(slices), len(spec.windows)) + tuple(spec.input_size), dtype=np.float32)
    for i, hu in enumerate(slices):
        out[i] = preprocess_slice(hu, spec, spacings[i] if spacings else None)
    return out
