"""Multi-frame CT (Enhanced CT, Legacy Converted Enhanced CT): every frame is a slice.

The geometry, pixel spacing and rescale of a frame live in the Per-frame Functional Groups
(5200,9230) item of that frame, or, when the same for all frames, in the Shared Functional Groups
(5200,9229) (DICOM PS3.3 C.7.6.16). Scan and decode both read them through :func:`frame_value`.
"""

from __future__ import annotations

__all__ = ["MULTIFRAME_CT", "is_multiframe_ct", "frame_value", "frame_count", "encapsulated_frame"]

# SOP classes whose frames are axial CT slices with functional groups.
MULTIFRAME_CT = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT",
}


def is_multiframe_ct(sop_class: str) -> bool:
    """True for the SOP classes whose frames are CT slices."""
    return sop_class in MULTIFRAME_CT


def frame_count(ds) -> int:  # noqa: ANN001 - pydicom Dataset
    """NumberOfFrames (1 when absent or malformed)."""
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def encapsulated_frame(ds, index: int) -> bytes | None:  # noqa: ANN001 - pydicom Dataset
    """The encoded bytes of frame ``index`` (0-based) of encapsulated pixel data, or None if absent.

    pydicom's ``encaps.get_frame`` (Basic or Extended Offset Table, else fragments split by frame).
    """
    from pydicom.encaps import get_frame

    try:
        return bytes(get_frame(ds.PixelData, index, number_of_frames=frame_count(ds)))
    except (ValueError, IndexError):
        return None


def _item(ds, keyword: str):  # noqa: ANN001, ANN202
    seq = ds.get(keyword) if ds is not None else None
    if not seq:
        return None
    return seq[0]


def frame_value(ds, index: int, macro: str, keyword: str):  # noqa: ANN001, ANN201
    """The element ``keyword`` of functional-group ``macro`` for frame ``index`` (0-based).

    The per-frame item wins over the shared one; None when neither has it.
    """
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and 0 <= index < len(per_frame):
        item = _item(per_frame[index], macro)
        if item is not None and keyword in item:
            return item[keyword].value
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    item = _item(shared, macro) if shared is not None else None
    if item is not None and keyword in item:
        return item[keyword].value
    return None
