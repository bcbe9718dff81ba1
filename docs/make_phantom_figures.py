"""Draw the phantom figures of the README: one axial slice per class and a sagittal reconstruction.

Usage::

    python docs/make_phantom_figures.py [--seed 2] [--size 512] [--out docs/img]

Writes ``phantom_axial_levels.png`` (soft-tissue window, level name under each panel) and
``phantom_sagittal.png`` (bone window, through the spine, with the labels as a colour band). Needs Pillow.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from spinelevel.phantom import CLASSES, Anatomy, PhantomOptions, level_at, plan_study
from spinelevel.phantom.anatomy import add_noise, noise_bank

_COLOURS = {
    "T": (230, 159, 0), "L1": (86, 180, 233), "L2": (0, 158, 115), "L3": (240, 228, 66),
    "L4": (0, 114, 178), "L5": (213, 94, 0), "S": (204, 121, 167), None: (60, 60, 60),
}
_PANELS = (("T", "T8"), ("L1", "L1"), ("L2", "L2"), ("L3", "L3"), ("L4", "L4"), ("L5", "L5"), ("S", "S1"))


def _window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    return (np.clip((hu - (center - width / 2)) / width, 0, 1) * 255).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def axial_figure(seed: int, size: int) -> Image.Image:
    spec = plan_study(PhantomOptions(seed=seed, size=size, coverage="chest_abdomen_pelvis", variant="none", contrast="portal_venous"), 0)
    anatomy = Anatomy(spec)
    rng = np.random.default_rng(seed)
    bank = noise_bank(rng, size, 2)
    sigma = spec.series[0].noise_sigma
    tiles = []
    for cls, name in _PANELS:
        v = spec.vertebra(name)
        z = (v.top_z + v.bottom_z) / 2
        assert level_at(spec.vertebrae, z)[0] == cls
        img = Image.fromarray(_window(add_noise(anatomy.render(z), bank, rng, sigma), 40, 400))
        tiles.append((f"{cls}  ({name}, z={z:.0f} mm)" if cls != name else f"{cls}  (z={z:.0f} mm)", img))
    img = Image.fromarray(_window(add_noise(anatomy.render(spec.femoral_head_z), bank, rng, sigma), 40, 400))
    tiles.append((f"{level_at(spec.vertebrae, spec.femoral_head_z)[0]}  (femoral heads)", img))
    label_h = max(24, size // 14)
    cols = 4
    rows = (len(tiles) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * size, rows * (size + label_h)), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    font = _font(max(14, size // 22))
    for k, (text, img) in enumerate(tiles):
        x, y = (k % cols) * size, (k // cols) * (size + label_h)
        sheet.paste(img.convert("RGB"), (x, y))
        draw.text((x + 8, y + size + 4), text, fill=(255, 255, 255), font=font)
    return sheet


def sagittal_figure(seed: int, size: int, step: float = 1.0) -> Image.Image:
    options = PhantomOptions(seed=seed, size=size, coverage="chest_abdomen_pelvis", variant="none", thickness_mm=step)
    spec = plan_study(options, 0)
    anatomy = Anatomy(spec)
    z = spec.series[0].z
    rows = []
    for zi in z:
        img = anatomy.render(float(zi))
        x, _ = anatomy.spine_center(float(zi))
        col = int(round((x - spec.origin[0]) / spec.pixel_spacing))
        rows.append(img[:, min(max(col, 0), size - 1)])
    sag = np.stack(rows)  # (z superior first, y anterior first)
    # resample z to the in-plane pixel spacing so that the image has true proportions
    n_out = int((z[0] - z[-1]) / spec.pixel_spacing) + 1
    zq = z[0] - spec.pixel_spacing * np.arange(n_out)
    idx = np.clip(np.rint((z[0] - zq) / step).astype(int), 0, len(z) - 1)
    sag = sag[idx]
    levels = level_at(spec.vertebrae, zq)
    grey = Image.fromarray(_window(sag, 300, 1500)).convert("RGB")
    band_w = max(60, size // 6)
    out = Image.new("RGB", (grey.width + band_w, grey.height), (0, 0, 0))
    out.paste(grey, (band_w, 0))
    draw = ImageDraw.Draw(out)
    for r, lev in enumerate(levels):
        draw.line([(0, r), (band_w // 3, r)], fill=_COLOURS[lev])
    font = _font(max(14, size // 24))
    rows_of = {c: [r for r, lev in enumerate(levels) if lev == c] for c in CLASSES}
    for cls, rs in rows_of.items():
        if rs:
            draw.text((band_w // 3 + 4, (rs[0] + rs[-1]) // 2 - 6), cls, fill=_COLOURS[cls], font=font)
    assert set(CLASSES) <= set(levels)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "img")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    axial_figure(args.seed, args.size).save(args.out / "phantom_axial_levels.png", optimize=True)
    sagittal_figure(args.seed, args.size).save(args.out / "phantom_sagittal.png", optimize=True)


if __name__ == "__main__":
    main()
