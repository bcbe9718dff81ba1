"""Augmentation of training slices: rotation, zoom, vertical and horizontal flip (the paper's set),
and, for training on phantoms towards real CT, domain randomisation (off by default): random crops
of the field of view (to non-square slices, as real reconstructions are), HU scale and shift, blur
or sharpening (reconstruction kernels) and extra noise; and, in ``domain-spine``, spine-centred
cut-outs as spine CT is often reconstructed or shared (VerSe: about 105 x 190 mm around the spine);
and, in ``domain-coarse``, resolution augmentation: the slice re-sampled to coarser pixels and back,
as a 3-5 mm reconstruction looks once the engine enlarges it to the model's input.

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

__all__ = ["AugmentSpec", "AugmentParams", "DOMAIN_RANDOMISATION", "DOMAIN_SPINE", "DOMAIN_COARSE", "draw_params", "augment_hu", "spine_centre", "coarsen"]

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
    # Probability of cropping the field of view: each axis independently keeps a uniform share in
    # [crop_min, 1] at a random place (slices become non-square; preprocessing 2 pads them back).
    crop: float = 0.0
    crop_min: float = 0.6
    # HU scale uniform in [1 - hu_scale, 1 + hu_scale] and shift uniform in [-hu_shift, hu_shift]
    # (calibration and contrast differences between scanners), applied to tissue above air.
    hu_scale: float = 0.0
    hu_shift: float = 0.0
    # Gaussian blur of sigma uniform in [0, blur_sigma] pixels, or (with probability sharpen) an
    # unsharp mask of that sigma: soft and sharp reconstruction kernels.
    blur_sigma: float = 0.0
    sharpen: float = 0.0
    # Extra Gaussian noise of standard deviation uniform in [0, noise_hu] HU.
    noise_hu: float = 0.0
    # Probability of a spine-centred cut-out instead of the crop above: a box of a uniform share in
    # spine_width (columns) and spine_height (rows) of the slice, centred on the spine (the median
    # bone pixel of the slice's middle columns) give or take spine_jitter of the box's size.
    spine_crop: float = 0.0
    spine_width: tuple[float, float] = (0.2, 0.5)
    spine_height: tuple[float, float] = (0.25, 0.6)
    spine_jitter: float = 0.15
    # Probability of resolution augmentation: the slice is re-sampled to pixels a factor uniform in
    # coarse_factor larger than its own (low-passed as preprocessing 3 does before a reduction,
    # reduced bilinearly) and enlarged bilinearly back to its own matrix, so its PixelSpacing stays true.
    coarse: float = 0.0
    coarse_factor: tuple[float, float] = (1.3, 2.6)
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
    # Crop: (top, height, left, width) as shares of the slice; (0, 1, 0, 1) keeps it whole.
    crop: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 1.0)
    # HU scale and shift of tissue.
    hu_scale: float = 1.0
    hu_shift: float = 0.0
    # Blur sigma in pixels (0: none); sharpen: unsharp mask instead of blur.
    blur_sigma: float = 0.0
    sharpen: bool = False
    # Extra noise standard deviation in HU, and the seed of that noise.
    noise_hu: float = 0.0
    noise_seed: int = 0
    # Spine-centred cut-out: (height share, width share, row offset, column offset), the offsets as
    # shares of the box; None: none.
    spine_box: tuple[float, float, float, float] | None = None
    # Resolution augmentation: the coarser pixel size as a factor of the slice's own (1: none).
    coarse_factor: float = 1.0


def draw_params(spec: AugmentSpec, rng: np.random.Generator) -> AugmentParams:
    """Draw one slice's augmentation (identity when ``spec.enabled`` is False)."""
    if not spec.enabled:
        return AugmentParams(0.0, 1.0, False, False)
    base = dict(
        rotation_deg=float(rng.uniform(-spec.rotation_deg, spec.rotation_deg)),
        zoom=float(rng.uniform(1.0 - spec.zoom, 1.0 + spec.zoom)),
        vflip=bool(rng.random() < spec.vflip),
        hflip=bool(rng.random() < spec.hflip),
    )
    # The paper's draws come first, so a spec without domain randomisation draws what it always did.
    if spec.crop > 0 and rng.random() < spec.crop:
        h, w = (float(rng.uniform(spec.crop_min, 1.0)) for _ in range(2))
        base["crop"] = (float(rng.uniform(0.0, 1.0 - h)), h, float(rng.uniform(0.0, 1.0 - w)), w)
    if spec.hu_scale > 0:
        base["hu_scale"] = float(rng.uniform(1.0 - spec.hu_scale, 1.0 + spec.hu_scale))
    if spec.hu_shift > 0:
        base["hu_shift"] = float(rng.uniform(-spec.hu_shift, spec.hu_shift))
    if spec.blur_sigma > 0:
        base["blur_sigma"] = float(rng.uniform(0.0, spec.blur_sigma))
        base["sharpen"] = bool(rng.random() < spec.sharpen)
    if spec.noise_hu > 0:
        base["noise_hu"] = float(rng.uniform(0.0, spec.noise_hu))
        base["noise_seed"] = int(rng.integers(0, 2**31))
    # drawn last, so that a spec without it draws what it always did
    if spec.spine_crop > 0 and rng.random() < spec.spine_crop:
        base["crop"] = (0.0, 1.0, 0.0, 1.0)
        j = spec.spine_jitter
        base["spine_box"] = (float(rng.uniform(*spec.spine_height)), float(rng.uniform(*spec.spine_width)),
                             float(rng.uniform(-j, j)), float(rng.uniform(-j, j)))
    # drawn after everything else, so that a spec without it draws what it always did
    if spec.coarse > 0 and rng.random() < spec.coarse:
        base["coarse_factor"] = float(rng.uniform(*spec.coarse_factor))
    return AugmentParams(**base)


def spine_centre(hu: np.ndarray, bone_hu: float = 300.0) -> tuple[float, float] | None:
    """(row, column) of the spine in an axial HU slice as stored (anterior at the top), or None.

    Dense structures (above ``bone_hu``) in the middle 40 % of the columns, where ribs, pelvis and
    arms rarely are, split into connected parts; the table (a thin band across the strip) and specks
    are dropped; of the parts at least a quarter the size of the largest, the most posterior one is
    the vertebra (contrast-filled bowel, the aorta, the sternum and the symphysis all lie in front of
    it). The point 40 % of the way down its bounding box, in the middle of its width, is returned.
    """
    from scipy.ndimage import find_objects, label

    h, w = hu.shape
    c0, c1 = int(0.3 * w), max(int(0.3 * w) + 1, int(round(0.7 * w)))
    parts, n = label(hu[:, c0:c1] > bone_hu, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return None
    sizes = np.bincount(parts.ravel())[1:]
    boxes = find_objects(parts)
    keep = []
    for i, (box, size) in enumerate(zip(boxes, sizes)):
        rows, cols = box[0].stop - box[0].start, box[1].stop - box[1].start
        if size < 10 or (cols >= 0.8 * (c1 - c0) and rows <= 0.05 * h):
            continue
        keep.append(i)
    if not keep:
        return None
    biggest = max(sizes[i] for i in keep)
    i = max((i for i in keep if sizes[i] >= 0.25 * biggest), key=lambda i: boxes[i][0].start + boxes[i][0].stop)
    box = boxes[i]
    # 40 % down the vertebra's box: between the body (in front) and the arch, nearer the body
    return box[0].start + 0.4 * (box[0].stop - box[0].start - 1), (box[1].start + box[1].stop - 1) / 2.0 + c0


def augment_hu(hu: np.ndarray, params: AugmentParams) -> np.ndarray:
    """Apply ``params`` to one (H, W) HU slice; returns a new float32 (H, W) array."""
    hu = np.asarray(hu, dtype=np.float32)
    if params.spine_box is not None:
        # cut out first, while the slice lies as stored (anterior at the top): the warp and the
        # flips then act on the cut-out as on any slice
        centre = spine_centre(hu)
        if centre is not None:  # no bone (above the shoulders, an empty slice): left whole
            h, w = hu.shape
            bh, bw, dr, dc = params.spine_box
            rows, cols = max(8, int(round(bh * h))), max(8, int(round(bw * w)))
            r0 = int(np.clip(round(centre[0] + dr * rows - rows / 2), 0, max(0, h - rows)))
            c0 = int(np.clip(round(centre[1] + dc * cols - cols / 2), 0, max(0, w - cols)))
            hu = hu[r0 : r0 + rows, c0 : c0 + cols]
    out = hu
    if params.rotation_deg != 0.0 or params.zoom != 1.0:
        out = _affine(hu, params.rotation_deg, params.zoom)
    if params.vflip:
        out = out[::-1, :]
    if params.hflip:
        out = out[:, ::-1]
    if params.crop != (0.0, 1.0, 0.0, 1.0):
        h, w = out.shape
        top, ch, left, cw = params.crop
        r0, c0 = int(round(top * h)), int(round(left * w))
        out = out[r0 : r0 + max(8, int(round(ch * h))), c0 : c0 + max(8, int(round(cw * w)))]
    out = np.array(out, dtype=np.float32)  # a copy: the steps below work in place
    if params.hu_scale != 1.0 or params.hu_shift != 0.0:
        tissue = out > -900.0  # air stays air: only the calibration of matter differs
        out[tissue] = out[tissue] * np.float32(params.hu_scale) + np.float32(params.hu_shift)
    if params.blur_sigma > 0.05:
        from scipy.ndimage import gaussian_filter

        smooth = gaussian_filter(out, params.blur_sigma, mode="nearest")
        out = (2.0 * out - smooth) if params.sharpen else smooth
    if params.coarse_factor > 1.0:
        # before the noise: a coarse reconstruction is coarse in its structures, while the
        # phantom's own noise and the extra noise stand for the scanner's at the new pixel size
        out = coarsen(out, params.coarse_factor)
    if params.noise_hu > 0:
        out += np.random.default_rng(params.noise_seed).normal(0.0, params.noise_hu, out.shape).astype(np.float32)
    return np.ascontiguousarray(out, dtype=np.float32)


def coarsen(hu: np.ndarray, factor: float) -> np.ndarray:
    """``hu`` as it looks reconstructed with pixels ``factor`` times larger and enlarged back to its
    own (H, W) matrix: the engine's antialiasing low-pass and bilinear resize down, bilinear up.

    The reduction is the one a real coarse reconstruction goes through in the engine (preprocessing
    resizes a 3 mm, 122 x 101 slice bilinearly to the model's input); the way back keeps the matrix,
    so the slice's PixelSpacing stays true for preprocessing 2's field of view.
    """
    from spinelevel.engine.preprocess import antialias_sigmas, gaussian_blur, resize_bilinear

    h, w = hu.shape
    small = (max(2, int(round(h / factor))), max(2, int(round(w / factor))))
    if small == (h, w):
        return np.asarray(hu, dtype=np.float32)
    low = gaussian_blur(np.asarray(hu, dtype=np.float32), antialias_sigmas(h, w, small))
    return np.ascontiguousarray(resize_bilinear(resize_bilinear(low, small), (h, w)), dtype=np.float32)


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


# The paper's augmentation plus domain randomisation, for training on phantoms towards real CT
# (spinelevel train --augment domain; the bundled demo model's recipe).
DOMAIN_RANDOMISATION = AugmentSpec(
    rotation_deg=10.0, zoom=0.25, vflip=0.5, hflip=0.5,
    crop=0.5, crop_min=0.55, hu_scale=0.05, hu_shift=30.0, blur_sigma=1.2, sharpen=0.3, noise_hu=20.0,
)

# Domain randomisation plus spine-centred cut-outs in a quarter of the slices (spinelevel train
# --augment domain-spine): real spine CT shared as a cut-out around the spine (VerSe, TPTBox) shows
# the vertebra without the abdomen, and the phantom's abdomen is its least realistic part.
DOMAIN_SPINE = AugmentSpec(
    rotation_deg=10.0, zoom=0.25, vflip=0.5, hflip=0.5,
    crop=0.5, crop_min=0.55, hu_scale=0.05, hu_shift=30.0, blur_sigma=1.2, sharpen=0.3, noise_hu=20.0,
    spine_crop=0.25,
)

# Domain randomisation plus resolution augmentation in half the slices (spinelevel train --augment
# domain-coarse): the phantoms are drawn at 1.2-2.0 mm per pixel, real body CT is often reconstructed
# at 3 mm or more and enlarged by the engine, and a 256 px model read such a scan worse than a 128 px
# one (tests/data/real_ct/results_demo_v11.md). Measured in issue 14's eleventh round: it did not
# close that gap; the whole-trunk real scans read worse with it at 192 and 256 px (results_demo_v12.md).
DOMAIN_COARSE = AugmentSpec(
    rotation_deg=10.0, zoom=0.25, vflip=0.5, hflip=0.5,
    crop=0.5, crop_min=0.55, hu_scale=0.05, hu_shift=30.0, blur_sigma=1.2, sharpen=0.3, noise_hu=20.0,
    coarse=0.5,
)
