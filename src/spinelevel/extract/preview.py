"""PNG preview of a pick: the slice (or the picked frame of a multi-frame file) in a soft-tissue window.

The picture shows the image in the standard axial view (patient right on the left, anterior at the
top) at its physical aspect ratio, R/L letters and one caption in the corner: the level, the offset
when it is not the pick, and z. Only pixel data and geometry are read from the file; nothing that
identifies the patient is drawn.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

from spinelevel.errors import DecodeError

__all__ = ["frame_hu", "render_preview"]


def frame_hu(ds, frame: int | None) -> tuple[np.ndarray, tuple[float, float], np.ndarray]:  # noqa: ANN001
    """(HU array, (row mm, column mm), ImageOrientationPatient) of a slice or of one frame.

    The engine's own decoding (``decode_hu``: rescale from the functional groups for a frame,
    padding and out-of-field-of-view values as air) and geometry (``report.volume.slice_geometry``).

    Args:
        ds: the parsed file.
        frame: 1-based frame of a multi-frame file, or None (only that frame is decoded).

    Raises:
        DecodeError: the pixel data or the frame cannot be decoded.
    """
    from spinelevel.engine.decode import decode_hu
    from spinelevel.engine.frames import frame_count
    from spinelevel.report.volume import slice_geometry

    if frame is not None and not 1 <= frame <= frame_count(ds):
        raise DecodeError(f"frame {frame} is not in the file ({frame_count(ds)} frames)")
    hu = decode_hu(ds, frame)
    spacing, iop = slice_geometry(ds, frame)
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
        hu, spacing, iop = frame_hu(ds, frame)
    hu, spacing = canonical_axial(hu, spacing, iop)
    img = draw_axial(hu, spacing, height=height, caption=caption)
    buf = io.BytesIO()
    # Grey only (white caption, no colour marks): an 8-bit grey PNG. Pillow's optimize=True tries
    # every filter and took ~100 ms per 512 px picture here; zlib level 6 alone takes a few ms.
    img.convert("L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
