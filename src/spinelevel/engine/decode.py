"""Decode: pixel data of one CT slice to Hounsfield units.

pydicom's pixel handlers do the transfer syntaxes (uncompressed, deflated, big endian natively; RLE,
JPEG lossless, JPEG-LS, JPEG 2000 and HTJ2K through the pylibjpeg, pylibjpeg-openjpeg,
pylibjpeg-libjpeg, pylibjpeg-rle and pyjpegls plugins). A file that cannot be decoded raises
:class:`DecodeError` naming the transfer syntax and what is missing; the pipeline records it and
carries on.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np

from spinelevel.engine.sources import Source, read_source
from spinelevel.errors import DecodeError

__all__ = ["AIR_HU", "StoredSlice", "decode_stored", "decode_hu", "read_hu", "read_stored", "transfer_syntax_name"]

# Hounsfield value given to padding pixels (outside the scanned field of view).
AIR_HU = -1000.0


def transfer_syntax_name(uid: str) -> str:
    """'JPEG 2000 Image Compression (Lossless Only) (1.2.840.10008.1.2.4.90)' style label."""
    from pydicom.uid import UID

    if not uid:
        return "unknown transfer syntax"
    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else uid


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return " ".join(line.strip() for line in text if line.strip())[:400] or type(exc).__name__


@dataclass(frozen=True)
class StoredSlice:
    """Decoded pixel data before rescaling: HU = raw * slope + intercept (padding -> air)."""

    raw: np.ndarray
    slope: float
    intercept: float
    # Pixels marked by PixelPaddingValue (None when there are none).
    padding: np.ndarray | None


def decode_stored(ds) -> StoredSlice:  # noqa: ANN001 - pydicom Dataset
    """Decode the pixel data and check the rescale tags, without converting to HU.

    Raises:
        DecodeError: no pixel data, undecodable pixel data, or unusable rescale tags.
    """
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DecodeError("no pixel data")
    tsyntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    try:
        raw = ds.pixel_array
    except Exception as exc:  # pydicom raises RuntimeError, NotImplementedError, ValueError...
        raise DecodeError(f"cannot decode pixel data in {transfer_syntax_name(tsyntax)}: {_first_line(exc)}") from None
    if raw.ndim != 2:
        raise DecodeError(f"pixel data has shape {raw.shape}, expected one grey-scale frame")
    try:
        slope_value = ds.get("RescaleSlope", None)
        intercept_value = ds.get("RescaleIntercept", None)
        slope = 1.0 if slope_value in (None, "") else float(slope_value)
        intercept = 0.0 if intercept_value in (None, "") else float(intercept_value)
    except (TypeError, ValueError):
        raise DecodeError("RescaleSlope or RescaleIntercept is not numeric") from None
    if slope == 0.0 or not math.isfinite(slope) or not math.isfinite(intercept):
        raise DecodeError(f"unusable rescale: RescaleSlope={slope:g}, RescaleIntercept={intercept:g}")
    return StoredSlice(raw, slope, intercept, _padding_mask(ds, raw))


def decode_hu(ds) -> np.ndarray:  # noqa: ANN001 - pydicom Dataset
    """The slice as float32 Hounsfield units, shape (Rows, Columns).

    Raises:
        DecodeError: no pixel data, undecodable pixel data, or unusable rescale tags.
    """
    stored = decode_stored(ds)
    hu = stored.raw.astype(np.float32)
    if stored.slope != 1.0:
        hu *= np.float32(stored.slope)
    if stored.intercept != 0.0:
        hu += np.float32(stored.intercept)
    if stored.padding is not None:
        hu[stored.padding] = AIR_HU
    return hu


def _padding_mask(ds, raw: np.ndarray) -> np.ndarray | None:  # noqa: ANN001
    """Pixels equal to PixelPaddingValue (or within its range limit), in stored values."""
    if "PixelPaddingValue" not in ds:
        return None
    try:
        pad = int(ds.PixelPaddingValue)
        limit = int(ds.PixelPaddingRangeLimit) if "PixelPaddingRangeLimit" in ds else pad
    except (TypeError, ValueError):
        return None
    # The tag is US or SS by the pixel representation; an unsigned read of a signed value wraps.
    if raw.dtype.kind == "i":
        bits = int(ds.get("BitsAllocated", 16) or 16)
        pad = pad - (1 << bits) if pad >= (1 << (bits - 1)) else pad
        limit = limit - (1 << bits) if limit >= (1 << (bits - 1)) else limit
    lo, hi = min(pad, limit), max(pad, limit)
    mask = (raw >= lo) & (raw <= hi)
    return mask if mask.any() else None


def read_hu(src: Source, max_bytes: int) -> tuple[np.ndarray, str]:
    """Read and decode one slice; returns (HU array, SOPInstanceUID).

    Raises:
        DecodeError: the file cannot be read, parsed or decoded.
    """
    return _read(src, max_bytes, decode_hu)


def read_stored(src: Source, max_bytes: int) -> tuple[StoredSlice, str]:
    """Read and decode one slice without rescaling (for DALI); returns (stored slice, SOPInstanceUID)."""
    return _read(src, max_bytes, decode_stored)


def _read(src: Source, max_bytes: int, convert):  # noqa: ANN001, ANN202
    # pydicom warns about odd values and quotes them: that text may hold patient data.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pydicom

        try:
            data = read_source(src, max_bytes)
        except OSError as exc:
            raise DecodeError(f"cannot read file: {exc.strerror or exc}") from None
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
        except Exception as exc:
            raise DecodeError(f"DICOM file is unreadable ({type(exc).__name__})") from None
        try:
            return convert(ds), str(ds.get("SOPInstanceUID", ""))
        except DecodeError:
            raise
        except Exception as exc:  # a malformed element surfaces on access
            # the exception text may quote element values (patient data): name its type only
            raise DecodeError(f"malformed DICOM element ({type(exc).__name__})") from None
