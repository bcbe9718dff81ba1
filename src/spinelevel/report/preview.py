"""One series's sagittal and coronal reconstructions side by side, with a patient-z ruler.

The picture of ``spinelevel label``: before labelling, to read the disc positions off it (no DICOM
viewer needed); after, to check the labelled levels (the band) against the anatomy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["draw_preview"]


def draw_preview(sources: Sequence[str], z_mm: Sequence[float], levels: Sequence[str | None], classes: Sequence[str], path: Path,
                 title: str = "", frames: Sequence[int | None] = (), marks_z_mm: Sequence[float] = ()) -> Path:
    """Write ``path`` (PNG): sagittal and coronal slab MIPs with the level band and a z ruler.

    Args:
        sources: ``source`` label per slice, most superior first (the engine's order).
        z_mm: patient z per slice, same order.
        levels: class per slice (None: not labelled; a grey band).
        classes: the classes, for the colours.
        path: the PNG to write.
        title: a line above each reconstruction.
        frames: 1-based frame per slice for multi-frame files.
        marks_z_mm: patient z of positions to mark (suggested discs).

    Raises:
        DecodeError: the series's files cannot be read.
        OutputError: ``path`` cannot be written.
    """
    from PIL import Image

    from spinelevel.errors import OutputError

    from spinelevel.report.render import Band, draw_reconstruction, level_colours
    from spinelevel.report.volume import VolumeOptions, positions, read_views

    z = np.asarray(z_mm, dtype=np.float64)
    views = read_views(tuple(sources), z, None, VolumeOptions(), tuple(frames))
    band = Band(positions(z), tuple(levels), tuple([None] * len(levels)), None, level_colours(tuple(classes)))
    pictures = [
        draw_reconstruction(hu, views.mm_per_px, band, title=f"{name} {title}".strip(), orientation=orient, ruler_z_mm=float(z[0]), marks_z_mm=marks_z_mm)
        for name, hu, orient in (("sagittal", views.sagittal, ("A", "P")), ("coronal", views.coronal, ("R", "L")))
    ]
    gap = 8
    out = Image.new("RGB", (sum(p.width for p in pictures) + gap, max(p.height for p in pictures)), (0, 0, 0))
    out.paste(pictures[0], (0, 0))
    out.paste(pictures[1], (pictures[0].width + gap, 0))
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        out.save(path, format="PNG")
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the preview ({exc.strerror or exc})") from None
    return path
