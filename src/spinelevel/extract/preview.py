"""PNG preview of a pick: the slice (or the picked frame of a multi-frame file) in a soft-tissue window.

The picture shows the image in the standard axial view (patient right on the left, anterior at the
top) at its physical aspect ratio, R/L letters and one caption in the corner: the level, the offset
when it is not the pick, and z. Only pixel data and geometry are read from the file; nothing that
identifies the patient is drawn.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np

from spinelevel.errors import DecodeError

__all__ = ["frame_hu", "render_preview"]


def _functional(ds, index: int, sequence: str):  # noqa: ANN001, ANN202 - pydicom Dataset or None
    """Item of a functional group macro for frame ``index`` (per-frame first, then shared)."""
    for groups, pos in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq is not None and len(seq) > pos:
            inner = seq[pos].get(sequence)
            if inner is not None and len(inner):
                return inner[0]
    return None


def frame_hu(ds, data: bytes, frame: int | None) -> tuple[np.ndarray, tuple[float, float], np.ndarray]:  # noqa: ANN001
    """(HU array, (row mm, column mm), ImageOrientationPatient) of a slice or of one frame.

    Args:
        ds: the parsed file.
        data: the file's bytes (a multi-frame file decodes just the one frame from them).
        frame: 1-based frame of a multi-frame file, or None.

    Raises:
        DecodeError: the pixel data or the frame cannot be decoded.
    """
    from spinelevel.engine.decode import decode_hu

    if frame is None:
        hu = decode_hu(ds)
        spacing_src, orient_src = ds, ds
    else:
        import pydicom.pixels

        n = int(ds.get("NumberOfFrames", 1) or 1)
        if not 1 <= frame <= n:
            raise DecodeError(f"frame {frame} is not in the file ({n} frames)")
        try:
            raw = pydicom.pixels.pixel_array(io.BytesIO(data), index=frame - 1)
        except Exception as exc:
            raise DecodeError(f"cannot decode frame {frame} ({type(exc).__name__})") from None
        transform = _functional(ds, frame - 1, "PixelValueTransformationSequence") or ds
        slope = float(transform.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(transform.get("RescaleIntercept", 0.0) or 0.0)
        hu = raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        spacing_src = _functional(ds, frame - 1, "PixelMeasuresSequence") or ds
        orient_src = _functional(ds, frame - 1, "PlaneOrientationSequence") or ds
    try:
        row, col = (float(v) for v in spacing_src.PixelSpacing[:2])
        spacing = (row, col) if row > 0 and col > 0 and math.isfinite(row + col) else (1.0, 1.0)
    except (AttributeError, TypeError, ValueError):
        spacing = (1.0, 1.0)
    try:
        iop = np.asarray([float(v) for v in orient_src.ImageOrientationPatient], dtype=np.float64)
        if iop.shape != (6,) or not np.all(np.isfinite(iop)):
            raise ValueError
    except (AttributeError, TypeError, ValueError):
        iop = np.asarray([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    return hu, spacing, iop


def render_preview(ds, data: bytes, frame: int | None, caption: str, height: int = 512) -> bytes:  # noqa: ANN001
    """The preview of one slice or frame as PNG bytes (deterministic: the same input, the same bytes).

    Raises:
        DecodeError: the pixel data cannot be decoded.
    """
    from spinelevel.report.render import draw_axial
    from spinelevel.report.volume import canonical_axial

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings may quote header values
        hu, spacing, iop = frame_hu(ds, data, frame)
    hu, spacing = canonical_axial(hu, spacing, iop)
    img = draw_axial(hu, spacing, height=height, caption=caption)
    buf = io.BytesIO()
    # Grey only (white caption, no colour marks): an 8-bit grey PNG. Pillow's optimize=True tries
    # every filter and took ~100 ms per 512 px picture here; zlib level 6 alone takes a few ms.
    img.convert("L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
