"""Uncompressed pixel data read at the offset the header scan found, without parsing the file again.

The scan parses every header once (``dcmread(stop_before_pixels=True)``); for an uncompressed,
little-endian, single-frame, 16-bit grey-scale file it also notes where the PixelData value starts
and the few facts decoding needs (:class:`NativePixels`). A decode worker then reads the file's
bytes and views the pixels at that offset (``np.frombuffer``) instead of parsing the whole file a
second time with pydicom and going through its pixel handlers: the same stored values (pydicom's
native decoder is ``np.frombuffer`` with the dtype of BitsAllocated and PixelRepresentation, no
masking or sign correction), the same rescale and padding, at a fraction of the cost (BENCHMARKS.md).

The file must still be the one scanned: the bytes before the offset must hold the scanned
SOPInstanceUID as a whole value and the PixelData element header with the scanned length. When any
of that does not hold (the file was rewritten, or is shorter), :func:`read_native` returns None and
the caller decodes the file the full way, which reports what changed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from spinelevel.engine.decode import StoredSlice, padding_mask, padding_range, rescale_values
from spinelevel.engine.sources import Source, read_source
from spinelevel.errors import DecodeError

__all__ = ["NativePixels", "native_layout", "read_native"]

# Uncompressed little-endian transfer syntaxes whose pixel data starts right after its element header.
_NATIVE_SYNTAXES = {"1.2.840.10008.1.2": True, "1.2.840.10008.1.2.1": False}  # uid -> implicit VR
_PIXEL_TAG = b"\xe0\x7f\x10\x00"
_UID_CHARS = frozenset(b"0123456789.")


@dataclass(frozen=True, slots=True)
class NativePixels:
    """Where the pixels of an uncompressed single-frame 16-bit grey-scale file are, and their rescale."""

    # Offset of the PixelData value in the file's (or archive member's) bytes.
    offset: int
    # Bytes of the PixelData element header before the value (8 implicit VR, 12 explicit VR).
    header_bytes: int
    rows: int
    columns: int
    # PixelRepresentation 1: two's complement int16; 0: uint16.
    signed: bool
    slope: float
    intercept: float
    # (low, high) stored values marked by PixelPaddingValue / PixelPaddingRangeLimit, or None.
    padding: tuple[int, int] | None

    @property
    def nbytes(self) -> int:
        return 2 * self.rows * self.columns


def native_layout(ds, tsyntax: str, element_header: bytes, offset: int) -> NativePixels | None:  # noqa: ANN001
    """The native layout of a scanned single-frame file, or None when the full decode path is needed.

    Args:
        ds: the dataset as the scan parsed it (stopped before the pixel data).
        tsyntax: its transfer syntax (from the file meta, or detected for files without one).
        element_header: the 12 bytes at ``offset``, where the scan stopped (the PixelData element
            header if the next element is PixelData).
        offset: position of those bytes in the file's bytes.
    """
    implicit = _NATIVE_SYNTAXES.get(tsyntax)
    if implicit is None or len(element_header) < 12 or element_header[:4] != _PIXEL_TAG:
        return None
    if implicit:
        (length,), header_bytes = struct.unpack_from("<I", element_header, 4), 8
    else:
        if element_header[4:6] not in (b"OW", b"OB") or element_header[6:8] != b"\x00\x00":
            return None
        (length,), header_bytes = struct.unpack_from("<I", element_header, 8), 12
    try:
        if int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            return None
        if int(ds.BitsAllocated) != 16 or str(ds.get("PhotometricInterpretation", "")).strip() != "MONOCHROME2":
            return None
        rows, columns, representation = int(ds.Rows), int(ds.Columns), int(ds.get("PixelRepresentation", 0) or 0)
    except (AttributeError, TypeError, ValueError):
        return None
    if rows <= 0 or columns <= 0 or representation not in (0, 1) or length != 2 * rows * columns:
        return None
    try:
        slope, intercept = rescale_values(ds.get("RescaleSlope", None), ds.get("RescaleIntercept", None))
    except DecodeError:  # the full decode path names the problem
        return None
    return NativePixels(offset + header_bytes, header_bytes, rows, columns, representation == 1, slope, intercept, padding_range(ds, representation == 1))


def _holds_uid(data: bytes, uid: bytes, end: int) -> bool:
    """Whether ``data[:end]`` holds ``uid`` as a whole value (not as the prefix of a longer UID)."""
    at = data.find(uid, 0, end)
    while at >= 0:
        after = at + len(uid)
        if (after >= end or data[after] not in _UID_CHARS) and (at == 0 or data[at - 1] not in _UID_CHARS):
            return True
        at = data.find(uid, at + 1, end)
    return False


def read_native(src: Source, native: NativePixels, sop_uid: str, max_bytes: int) -> StoredSlice | None:
    """The stored pixels of a scanned native file, or None when the file is not as scanned.

    Raises:
        OSError, KeyError: the file cannot be read (the caller's full path reports it).
    """
    data = read_source(src, max_bytes)
    start = native.offset - native.header_bytes
    if len(data) < native.offset + native.nbytes or data[start : start + 4] != _PIXEL_TAG:
        return None
    if not _holds_uid(data, sop_uid.encode("ascii", "replace"), start):
        return None
    raw = np.frombuffer(data, dtype="<i2" if native.signed else "<u2", count=native.rows * native.columns, offset=native.offset)
    raw = raw.reshape(native.rows, native.columns)
    return StoredSlice(raw, native.slope, native.intercept, padding_mask(raw, native.padding))
