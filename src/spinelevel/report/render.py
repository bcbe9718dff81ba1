"""Draw the review pictures with Pillow: reconstructions with level bands, and the L3 axial slice.

A reconstruction picture is, left to right: the image (bone window, square pixels, superior at the
top) with dashed lines across it where the decoded level changes and the L3 pick as a white line;
the *level band* (one colour per decoded level, every slice of the run's table); the *argmax band*
(a tick, in the argmax's colour, on every slice where the model's raw argmax disagrees with the
decoded level); and the level names. The full-size picture has a legend under it; the thumbnail
keeps the bands and the L3 line and drops the text.

Colours are the Okabe-Ito palette (distinguishable with the common colour-vision deficiencies), in
the order the phantom figures use, so that neighbouring levels never share a hue family.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = [
    "BONE_WINDOW",
    "SOFT_TISSUE_WINDOW",
    "level_colours",
    "Band",
    "window",
    "draw_reconstruction",
    "draw_axial",
    "save_png",
    "overlay_palette",
    "hex_colour",
]

# (center, width) in HU.
BONE_WINDOW = (400.0, 1800.0)
SOFT_TISSUE_WINDOW = (40.0, 400.0)

_OKABE_ITO = {
    "T": (230, 159, 0),
    "L1": (86, 180, 233),
    "L2": (0, 158, 115),
    "L3": (240, 228, 66),
    "L4": (0, 114, 178),
    "L5": (213, 94, 0),
    "S": (204, 121, 167),
}
# For classes of other cards: Paul Tol's muted scheme.
_EXTRA = [(51, 34, 136), (136, 204, 238), (68, 170, 153), (17, 119, 51), (153, 153, 51), (221, 204, 119), (204, 102, 119), (136, 34, 85), (170, 68, 153)]
_UNKNOWN = (128, 128, 128)


def level_colours(classes: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """One fixed RGB colour per class (the seven standard levels always get the same ones)."""
    out: dict[str, tuple[int, int, int]] = {}
    extra = iter(_EXTRA)
    for c in classes:
        out[c] = _OKABE_ITO.get(c) or next(extra, _UNKNOWN)
    return out


def hex_colour(rgb: tuple[int, int, int]) -> str:
    """``#rrggbb``."""
    return "#%02x%02x%02x" % rgb


@dataclass(frozen=True)
class Band:
    """What the bands show, per slice of the run's table (most superior first)."""

    # Distance of each slice below slice 0, mm.
    pos_mm: np.ndarray
    # Decoded level per slice.
    level: tuple[str | None, ...]
    # Raw argmax per slice (None where the model did not run).
    argmax: tuple[str | None, ...]
    # Position (into the table) of the L3 pick, or None.
    l3: int | None
    # Colour per class.
    colours: dict[str, tuple[int, int, int]]


def window(hu: np.ndarray, center_width: tuple[float, float]) -> np.ndarray:
    """HU -> uint8 grey through a (center, width) window."""
    c, w = center_width
    return (np.clip((hu - (c - w / 2.0)) / w, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


@lru_cache(maxsize=8)
def _font(size: int):  # noqa: ANN202 - PIL font
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _rows_of(band: Band, n_rows: int, mm_per_px: float) -> np.ndarray:
    """For every output row, the table position of the nearest slice."""
    centres = np.arange(n_rows) * mm_per_px
    pos = band.pos_mm
    j = np.searchsorted(pos, centres).clip(0, len(pos) - 1)
    prev = (j - 1).clip(0, len(pos) - 1)
    return np.where(np.abs(pos[prev] - centres) <= np.abs(pos[j] - centres), prev, j)


def _runs(values: Sequence[str | None]) -> list[tuple[str | None, int, int]]:
    """(value, first, last) of every run of equal values."""
    runs: list[tuple[str | None, int, int]] = []
    for i, v in enumerate(values):
        if runs and runs[-1][0] == v:
            runs[-1] = (v, runs[-1][1], i)
        else:
            runs.append((v, i, i))
    return runs


def draw_reconstruction(hu: np.ndarray, mm_per_px: float, band: Band, *, scale: float = 1.0, text: bool = True, title: str = "", orientation: tuple[str, str] = ("A", "P"), ruler_z_mm: float | None = None, marks_z_mm: Sequence[float] = ()):  # noqa: ANN201 - PIL Image
    """Picture of one reconstruction with its level band, argmax band, level names and L3 line.

    Args:
        hu: (rows, cols) reconstruction in HU, square pixels of ``mm_per_px``, row 0 = slice 0.
        mm_per_px: pixel size of ``hu``.
        band: levels per slice.
        scale: output size relative to ``hu`` (thumbnails < 1).
        text: draw level names, title, legend and orientation letters (full size).
        title: a line above the image (full size only).
        orientation: letters for the left and right edges of the image.
        ruler_z_mm: patient z of slice 0: draw a ruler of patient z down the image's left edge
            (a tick every 10 mm, numbered every 20 mm), so positions can be read off the picture
            (``spinelevel label``); slices run towards the feet, z falling.
        marks_z_mm: patient z of positions to mark with a red tick and their z (suggested discs);
            needs ``ruler_z_mm``.

    Returns:
        An RGB ``PIL.Image``.
    """
    from PIL import Image, ImageDraw

    grey = Image.fromarray(window(hu, BONE_WINDOW), mode="L")
    if scale != 1.0:
        size = (max(1, round(grey.width * scale)), max(1, round(grey.height * scale)))
        grey = grey.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BILINEAR)
    w, h = grey.size
    px_mm = mm_per_px / scale  # mm per output pixel
    rows = _rows_of(band, h, px_mm)
    levels = [band.level[i] for i in rows]
    colours = band.colours
    band_w = 16 if text else max(6, w // 12)
    tick_w = 8 if text else max(4, w // 20)
    gap = 2 if text else 1
    label_w = 40 if text else 0
    top = 22 if text and title else 0
    legend_h = 0
    if text:
        legend_h = 44
    font = _font(13)
    small = _font(11)
    canvas_w = w + gap + band_w + gap + tick_w + label_w
    img = Image.new("RGB", (max(canvas_w, 330 if text else 0), h + top + legend_h), (0, 0, 0))
    img.paste(grey.convert("RGB"), (0, top))
    draw = ImageDraw.Draw(img, "RGBA")
    bx = w + gap
    tx = bx + band_w + gap
    # level band and faint level boundaries across the image
    for lev, a, b in _runs(levels):
        colour = colours.get(lev, _UNKNOWN) if lev is not None else (60, 60, 60)
        draw.rectangle([bx, top + a, bx + band_w - 1, top + b], fill=colour)
        if a > 0:  # dashed and opaque: the anatomy shows between the dashes, the colour stays exact
            dash = 4 if text else 2
            for x0 in range(0, w, 2 * dash):
                draw.line([(x0, top + a), (min(w - 1, x0 + dash - 1), top + a)], fill=colour, width=1)
    # argmax band: white background column, ticks where argmax != decoded
    draw.rectangle([tx, top, tx + tick_w - 1, top + h - 1], fill=(32, 32, 32))
    tick_half = 1 if text else 0
    for i, (lev, arg) in enumerate(zip(band.level, band.argmax)):
        if arg is None or arg == lev:
            continue
        r = int(round(band.pos_mm[i] / px_mm))
        if 0 <= r < h:
            draw.rectangle([tx, top + max(0, r - tick_half), tx + tick_w - 1, top + min(h - 1, r + tick_half)], fill=colours.get(arg, _UNKNOWN))
    # L3 pick line over image and bands
    if band.l3 is not None and 0 <= band.l3 < len(band.pos_mm):
        r = top + int(round(band.pos_mm[band.l3] / px_mm))
        r = min(max(r, top), top + h - 1)
        lw = 1 if not text else 2
        draw.line([(0, r), (tx + tick_w - 1, r)], fill=(0, 0, 0), width=lw + 2)
        draw.line([(0, r), (tx + tick_w - 1, r)], fill=(255, 255, 255), width=lw)
        if text:
            draw.text((3, r - 16), "L3 pick", fill=(255, 255, 255), font=small, stroke_width=2, stroke_fill=(0, 0, 0))
    if text:
        lx = tx + tick_w + 4
        last_y = -100
        for lev, a, b in _runs(levels):
            if lev is None:
                continue
            yc = top + (a + b) // 2 - 7
            if b - a < 8:
                yc = max(yc, last_y + 14)  # short runs: keep the names from overlapping
            if yc - last_y < 12:
                continue
            draw.text((lx, yc), lev, fill=colours.get(lev, _UNKNOWN), font=font)
            last_y = yc
        if ruler_z_mm is not None:
            _ruler(draw, top, h, px_mm, float(ruler_z_mm), small)
            for zm in marks_z_mm:
                r = top + int(round((float(ruler_z_mm) - float(zm)) / px_mm))
                if top <= r < top + h:
                    draw.line([(w - 28, r), (w - 1, r)], fill=(255, 64, 64), width=2)
                    draw.text((w - 66, r - 13), f"{zm:.0f}", fill=(255, 96, 96), font=small, stroke_width=2, stroke_fill=(0, 0, 0))
        draw.text((3, top + 3), orientation[0], fill=(255, 255, 255), font=font, stroke_width=2, stroke_fill=(0, 0, 0))
        draw.text((w - 12, top + 3), orientation[1], fill=(255, 255, 255), font=font, stroke_width=2, stroke_fill=(0, 0, 0))
        if title:
            draw.text((3, 4), title, fill=(230, 230, 230), font=small)
        _legend(draw, 3, top + h + 4, band.colours, font, small, ruler=ruler_z_mm is not None)
    return img


def _ruler(draw, top: int, h: int, px_mm: float, z0: float, small) -> None:  # noqa: ANN001
    """Ticks of patient z every 10 mm down the left edge (row r is z0 - r * px_mm)."""
    z_bottom = z0 - h * px_mm
    for z in range(int(np.ceil(z_bottom / 10.0)) * 10, int(np.floor(z0 / 10.0)) * 10 + 1, 10):
        r = top + int(round((z0 - z) / px_mm))
        if not top <= r < top + h:
            continue
        long = z % 20 == 0
        draw.line([(0, r), (10 if long else 5, r)], fill=(255, 255, 255), width=1)
        if long:
            draw.text((12, r - 6), f"{z}", fill=(255, 255, 255), font=small, stroke_width=2, stroke_fill=(0, 0, 0))


def _legend(draw, x: int, y: int, colours: dict[str, tuple[int, int, int]], font, small, ruler: bool = False) -> None:  # noqa: ANN001
    cx = x
    for c, rgb in colours.items():
        draw.rectangle([cx, y + 2, cx + 11, y + 13], fill=rgb)
        draw.text((cx + 14, y), c, fill=(230, 230, 230), font=font)
        cx += 14 + int(draw.textlength(c, font=font)) + 8
    y2 = y + 20
    if ruler:  # the labelling preview: no model output, a ruler instead
        draw.rectangle([x, y2 + 1, x + 11, y2 + 12], fill=(60, 60, 60))
        draw.text((x + 15, y2), "no label (disc margin)    left ruler: patient z, mm", fill=(200, 200, 200), font=small)
        return
    draw.rectangle([x, y2 + 5, x + 11, y2 + 7], fill=(230, 230, 230))
    draw.text((x + 15, y2), "argmax differs (tick in argmax colour)", fill=(200, 200, 200), font=small)
    lx = x + 15 + int(draw.textlength("argmax differs (tick in argmax colour)", font=small)) + 12
    draw.line([(lx, y2 + 6), (lx + 16, y2 + 6)], fill=(255, 255, 255), width=2)
    draw.text((lx + 20, y2), "L3 pick", fill=(200, 200, 200), font=small)


def draw_axial(hu: np.ndarray, spacing: tuple[float, float], *, height: int, marks: tuple[int, int] | None = None, text: bool = True, caption: str = ""):  # noqa: ANN201
    """The L3 slice in a soft-tissue window at physical aspect ratio, ``height`` pixels tall.

    Args:
        hu: (rows, cols) slice in HU, canonical orientation.
        spacing: (row mm, column mm).
        height: output height in pixels.
        marks: (column x, row y) of the sagittal and coronal planes: short ticks on the edges.
        text: draw orientation letters and the caption.
        caption: a line drawn at the top left.
    """
    from PIL import Image, ImageDraw

    rows, cols = hu.shape
    phys_h, phys_w = rows * spacing[0], cols * spacing[1]
    width = max(1, round(height * phys_w / phys_h))
    grey = Image.fromarray(window(hu, SOFT_TISSUE_WINDOW), mode="L").resize((width, height), Image.Resampling.LANCZOS if height < rows else Image.Resampling.BILINEAR)
    img = grey.convert("RGB")
    draw = ImageDraw.Draw(img)
    if marks is not None:
        mx = round((marks[0] + 0.5) * width / cols)
        my = round((marks[1] + 0.5) * height / rows)
        t = max(4, height // 25)
        for x0, y0, x1, y1 in ((mx, 0, mx, t), (mx, height - 1 - t, mx, height - 1), (0, my, t, my), (width - 1 - t, my, width - 1, my)):
            draw.line([(x0, y0), (x1, y1)], fill=(240, 228, 66), width=2 if text else 1)
    if text:
        font = _font(13)
        draw.text((3, height // 2 - 7), "R", fill=(255, 255, 255), font=font, stroke_width=2, stroke_fill=(0, 0, 0))
        draw.text((width - 12, height // 2 - 7), "L", fill=(255, 255, 255), font=font, stroke_width=2, stroke_fill=(0, 0, 0))
        if caption:
            draw.text((3, 3), caption, fill=(255, 255, 255), font=_font(11), stroke_width=2, stroke_fill=(0, 0, 0))
    return img


def save_png(img, path: Path, palette: Sequence[tuple[int, int, int]] | None = None, greys: int = 224) -> None:  # noqa: ANN001
    """Write a PNG atomically; with ``palette``, as an 8-bit palette image (about 5x smaller).

    The palette is the given overlay colours plus ``greys`` evenly spaced greys (at most what is
    left of 256 entries), and every pixel takes the nearest entry (no dithering): the band colours
    stay exact and the greyscale keeps its levels, where a generic quantiser would posterize it.
    Thumbnails take fewer greys (smaller files; the eye does not miss them at that size).
    """
    from PIL import Image

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if palette:
        img = img.convert("RGB").quantize(palette=_palette_image(tuple(palette), greys), dither=Image.Dither.NONE)
    img.save(tmp, format="PNG", optimize=True)
    tmp.replace(path)


@lru_cache(maxsize=8)
def _palette_image(colours: tuple[tuple[int, int, int], ...], greys: int):  # noqa: ANN202
    from PIL import Image

    colours = tuple(dict.fromkeys(c for c in colours if c[0] != c[1] or c[1] != c[2]))[:32]
    n_grey = max(2, min(greys, 256 - len(colours)))
    greys = [(round(255 * i / (n_grey - 1)),) * 3 for i in range(n_grey)]
    flat = [v for rgb in greys + list(colours) for v in rgb]
    pal = Image.new("P", (1, 1))
    pal.putpalette(flat)
    return pal


def overlay_palette(colours: dict[str, tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """The colours drawn over the images: one per class, plus the plane marks (greys come free)."""
    return list(colours.values()) + [(240, 228, 66), _UNKNOWN]
