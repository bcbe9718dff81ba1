"""Decode: pixel data of one CT slice to Hounsfield units.

pydicom's pixel handlers do the transfer syntaxes (uncompressed, deflated, big endian natively; RLE,
JPEG lossless, JPEG-LS, JPEG 2000 and HTJ2K through the pylibjpeg, pylibjpeg-openjpeg,
pylibjpeg-libjpeg, pylibjpeg-rle and pyjpegls plugins). JPEG 2000 and HTJ2K may instead go to a GPU
decoder (``j2k``: a :class:`spinelevel.engine.gpu_j2k.GpuJ2kPath`, which keeps this CPU decoder as its
reference and fallback). A file that cannot be decoded raises
:class:`DecodeError` naming the transfer syntax and what is missing; the pipeline records it and
carries on.
"""

from __future__ import annotations

import functools
import io
import math
import threading
import warnings
from dataclasses import dataclass

import numpy as np

from spinelevel.engine.sources import Source, read_source
from spinelevel.errors import DecodeError

__all__ = [
    "AIR_HU",
    "BELOW_AIR_HU",
    "StoredSlice",
    "decode_stored",
    "decode_hu",
    "hu_from_stored",
    "outside_fov",
    "read_dataset",
    "read_hu",
    "read_stored",
    "transfer_syntax_name",
]

# Hounsfield value given to padding pixels (outside the scanned field of view).
AIR_HU = -1000.0

# Values below this are not tissue nor air but the scanner's mark for "outside the reconstructed
# circle" (-2000, -2048, -3024 HU are common) that the file does not declare as PixelPaddingValue,
# or such padding smeared by lossy compression. Air reads about -1000 (noise to about -1024), so
# they become air (AIR_HU) for the model in every window; see outside_fov.
BELOW_AIR_HU = -1100.0


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


def _ensure_transfer_syntax(ds) -> str:  # noqa: ANN001 - pydicom Dataset
    """The transfer syntax of ``ds``; files without file meta get the encoding the parser detected.

    pydicom decodes pixel data by the file meta's TransferSyntaxUID, which old exports (no preamble,
    no file meta, implicit VR little endian) do not have.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID

    from spinelevel.engine.identity import detected_transfer_syntax

    meta = getattr(ds, "file_meta", None)
    current = str(getattr(meta, "TransferSyntaxUID", "") or "") if meta is not None else ""
    if current:
        return current
    detected = detected_transfer_syntax(ds)
    if detected:
        if meta is None:
            ds.file_meta = meta = FileMetaDataset()
        meta.TransferSyntaxUID = UID(detected)
    return detected


# pydicom's decoder plugins in the order the engine tries them: pydicom's own order without GDCM
# (which pydicom puts first once installed), except for JPEG-LS (_JLS_ORDER).
_PLUGIN_ORDER = ("pylibjpeg", "pyjpegls", "pillow", "pydicom")
# JPEG-LS: pyjpegls (CharLS) decodes a 512 px CT slice about 4x faster than pylibjpeg's libjpeg,
# which pydicom tries first; both give the same values (tested on every JPEG-LS file of the corpus).
_JLS_SYNTAXES = ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81")
_JLS_ORDER = ("pyjpegls", "pylibjpeg")


@functools.lru_cache(maxsize=64)
def _plugins(tsyntax: str) -> tuple[str, ...]:
    """pydicom's available decoder plugins for ``tsyntax`` (() for native syntaxes); asked once per
    syntax and process, not per slice (what is installed does not change during a run)."""
    from pydicom.pixels.decoders.base import get_decoder

    try:
        return tuple(get_decoder(tsyntax).available_plugins)
    except (NotImplementedError, ValueError, AttributeError):
        return ()


def _pixel_array(ds, tsyntax: str, index: int | None):  # noqa: ANN001, ANN202
    """Decode one frame; with python-gdcm installed, GDCM is only the fallback.

    pydicom puts GDCM first among the plugins once it is installed; the engine keeps its tested
    decoders (pylibjpeg, pyjpegls) first and tries GDCM only when they fail, so installing the
    optional GDCM (for the retired JPEG syntaxes) changes no result that decoded before.
    """
    from pydicom.pixels import pixel_array

    plugins = _plugins(tsyntax)
    order = _JLS_ORDER if tsyntax in _JLS_SYNTAXES else _PLUGIN_ORDER
    if "gdcm" not in plugins and (order is _PLUGIN_ORDER or "pyjpegls" not in plugins):
        return pixel_array(ds, index=index)
    # the engine's order (pydicom's without GDCM, pyjpegls first for JPEG-LS), GDCM last
    preferred = sorted((p for p in plugins if p != "gdcm"), key=lambda p: (order.index(p) if p in order else len(order), p))
    if not preferred:
        return pixel_array(ds, index=index, decoding_plugin="gdcm")
    try:
        return pixel_array(ds, index=index, decoding_plugin=preferred[0])
    except Exception:
        for plugin in preferred[1:] + ["gdcm"]:
            try:
                return pixel_array(ds, index=index, decoding_plugin=plugin)
            except Exception:
                continue
        raise


def _no_pixel_data(ds) -> str:  # noqa: ANN001 - pydicom Dataset
    """Why a file without PixelData has no pixels we can read: name a known private compression."""
    from pydicom.tag import Tag

    # Philips (formerly Elscint) CT: compressed pixels in private (07a1,xx0a), the method in (07a1,xx11).
    for elem in ds.group_dataset(0x07A1) if hasattr(ds, "group_dataset") else ():
        if elem.tag.element >= 0x1000 and elem.tag.element & 0xFF == 0x11 and isinstance(elem.value, (str, bytes)):
            method = elem.value.decode("ascii", "replace") if isinstance(elem.value, bytes) else elem.value
            method = method.strip().strip("\x00")
            if method:
                return (
                    f"no PixelData (7fe0,0010): the pixels are in Philips/Elscint private compression {method} "
                    f"(private group 07a1), which no decoder installed here reads; export the series uncompressed"
                )
    if Tag(0x07A1, 0x100A) in ds:
        return "no PixelData (7fe0,0010): the pixels are in a Philips/Elscint private element (07a1,100a); export the series uncompressed"
    return "no pixel data (PixelData (7fe0,0010) is absent)"


def decode_stored(ds, frame: int | None = None, j2k=None) -> StoredSlice:  # noqa: ANN001 - pydicom Dataset, GpuJ2kPath
    """Decode the pixel data and check the rescale tags, without converting to HU.

    Args:
        frame: for a multi-frame CT file, the 1-based frame to decode (only that frame is decoded;
            its rescale comes from the functional groups).
        j2k: a GPU JPEG 2000 path (:class:`spinelevel.engine.gpu_j2k.GpuJ2kPath`) for JPEG 2000 and
            HTJ2K pixel data; None decodes everything on the CPU.

    Raises:
        DecodeError: no pixel data, undecodable pixel data, or unusable rescale tags.
    """
    from spinelevel.engine import retired_jpeg

    tsyntax = _ensure_transfer_syntax(ds)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DecodeError(_no_pixel_data(ds))
    try:
        if retired_jpeg.is_retired_jpeg(tsyntax):
            raw = retired_jpeg.decode_frame(ds, 0 if frame is None else frame - 1)
        elif j2k is not None and _is_j2k(tsyntax):
            from spinelevel.engine.gpu_j2k import extract_frame

            index = None if frame is None else frame - 1
            raw = j2k.decode(extract_frame(ds, index or 0, tsyntax), lambda: _pixel_array(ds, tsyntax, index))
        else:
            raw = _pixel_array(ds, tsyntax, None if frame is None else frame - 1)
    except DecodeError:
        raise
    except Exception as exc:  # pydicom raises RuntimeError, NotImplementedError, ValueError...
        raise DecodeError(f"cannot decode pixel data in {transfer_syntax_name(tsyntax)}: {_first_line(exc)}") from None
    if raw.ndim != 2:
        raise DecodeError(f"pixel data has shape {raw.shape}, expected one grey-scale frame")
    try:
        if frame is not None:
            from spinelevel.engine.frames import frame_value

            slope_value = frame_value(ds, frame - 1, "PixelValueTransformationSequence", "RescaleSlope")
            intercept_value = frame_value(ds, frame - 1, "PixelValueTransformationSequence", "RescaleIntercept")
            if slope_value is None and intercept_value is None:
                slope_value, intercept_value = ds.get("RescaleSlope", None), ds.get("RescaleIntercept", None)
        else:
            slope_value = ds.get("RescaleSlope", None)
            intercept_value = ds.get("RescaleIntercept", None)
    except (TypeError, ValueError):
        raise DecodeError("RescaleSlope or RescaleIntercept is not numeric") from None
    slope, intercept = rescale_values(slope_value, intercept_value)
    return StoredSlice(raw, slope, intercept, padding_mask(raw, padding_range(ds, raw.dtype.kind == "i")))


def rescale_values(slope_value, intercept_value) -> tuple[float, float]:  # noqa: ANN001 - element values
    """(slope, intercept) from RescaleSlope and RescaleIntercept values (absent or empty: 1 and 0).

    Raises:
        DecodeError: not numeric, a zero slope, or not finite.
    """
    try:
        slope = 1.0 if slope_value in (None, "") else float(slope_value)
        intercept = 0.0 if intercept_value in (None, "") else float(intercept_value)
    except (TypeError, ValueError):
        raise DecodeError("RescaleSlope or RescaleIntercept is not numeric") from None
    if slope == 0.0 or not math.isfinite(slope) or not math.isfinite(intercept):
        raise DecodeError(f"unusable rescale: RescaleSlope={slope:g}, RescaleIntercept={intercept:g}")
    return slope, intercept


def _is_j2k(tsyntax: str) -> bool:
    from spinelevel.engine.gpu_j2k import is_j2k

    return is_j2k(tsyntax)


def decode_hu(ds, frame: int | None = None, j2k=None) -> np.ndarray:  # noqa: ANN001 - pydicom Dataset, GpuJ2kPath
    """The slice as float32 Hounsfield units, shape (Rows, Columns).

    Padding (PixelPaddingValue) and values below BELOW_AIR_HU (undeclared out-of-field-of-view
    marks) are air.

    Raises:
        DecodeError: no pixel data, undecodable pixel data, or unusable rescale tags.
    """
    stored = decode_stored(ds, frame, j2k)
    return hu_from_stored(stored.raw, stored.slope, stored.intercept, stored.padding)


def hu_from_stored(raw: np.ndarray, slope: float, intercept: float, padding: np.ndarray | None = None) -> np.ndarray:
    """float32 HU = raw * slope + intercept; padding and values below BELOW_AIR_HU become air."""
    hu = raw.astype(np.float32)
    if slope != 1.0:
        hu *= np.float32(slope)
    if intercept != 0.0:
        hu += np.float32(intercept)
    if padding is not None:
        hu[padding] = AIR_HU
    np.copyto(hu, np.float32(AIR_HU), where=hu < np.float32(BELOW_AIR_HU))
    return hu


def outside_fov(raw: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Stored values whose HU is below BELOW_AIR_HU, by the same float32 arithmetic as decode_hu."""
    hu = raw.astype(np.float32)
    if slope != 1.0:
        hu *= np.float32(slope)
    if intercept != 0.0:
        hu += np.float32(intercept)
    return hu < np.float32(BELOW_AIR_HU)


def padding_range(ds, signed: bool) -> tuple[int, int] | None:  # noqa: ANN001 - pydicom Dataset
    """(low, high) stored values marked by PixelPaddingValue (and PixelPaddingRangeLimit); None
    when there is no usable padding value (a malformed one is ignored)."""
    if "PixelPaddingValue" not in ds:
        return None
    try:
        pad = int(ds.PixelPaddingValue)
        limit = int(ds.PixelPaddingRangeLimit) if "PixelPaddingRangeLimit" in ds else pad
    except (TypeError, ValueError):
        return None
    # The tag is US or SS by the pixel representation; an unsigned read of a signed value wraps.
    if signed:
        bits = int(ds.get("BitsAllocated", 16) or 16)
        pad = pad - (1 << bits) if pad >= (1 << (bits - 1)) else pad
        limit = limit - (1 << bits) if limit >= (1 << (bits - 1)) else limit
    return min(pad, limit), max(pad, limit)


def padding_mask(raw: np.ndarray, padding: tuple[int, int] | None) -> np.ndarray | None:
    """Pixels of ``raw`` inside the padding range, or None when there are none."""
    if padding is None:
        return None
    lo, hi = padding
    mask = (raw >= lo) & (raw <= hi)
    return mask if mask.any() else None


def read_hu(src: Source, max_bytes: int, frame: int | None = None, j2k=None) -> tuple[np.ndarray, str]:  # noqa: ANN001
    """Read and decode one slice (or one frame of a multi-frame file); returns (HU, SOPInstanceUID).

    ``j2k``: optional GPU JPEG 2000 path (see :func:`decode_stored`).

    Raises:
        DecodeError: the file cannot be read, parsed or decoded.
    """
    return _read(src, max_bytes, frame, lambda ds, fr: decode_hu(ds, fr, j2k))


def read_stored(src: Source, max_bytes: int, frame: int | None = None, j2k=None) -> tuple[StoredSlice, str]:  # noqa: ANN001
    """Read and decode one slice without rescaling (for DALI); returns (stored slice, SOPInstanceUID)."""
    return _read(src, max_bytes, frame, lambda ds, fr: decode_stored(ds, fr, j2k))


class _ParsedCache(threading.local):
    """The last multi-frame file parsed by this thread, so its frames are not re-read one by one.

    Per thread, because decode threads of one process must not share a pydicom Dataset.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.ds = None


_PARSED = _ParsedCache()


def clear_parsed_cache() -> None:
    """Forget this thread's cached multi-frame file (its pixel data can be large)."""
    _PARSED.key = _PARSED.ds = None


def read_dataset(src: Source, max_bytes: int, frame: int | None = None):  # noqa: ANN201 - pydicom Dataset
    """Read and parse one file; the last multi-frame file (``frame`` given) is kept per thread.

    Raises:
        DecodeError: the file cannot be read or parsed.
    """
    import pydicom

    key = (src, max_bytes)
    if frame is not None and _PARSED.key == key:
        return _PARSED.ds
    if src.kind == "dicomweb":
        from spinelevel.engine.dicomweb import retrieve_dataset

        # the client parses what it retrieves: no detour through bytes (RemoteReadError passes up)
        ds = retrieve_dataset(src, max_bytes)
    else:
        try:
            data = read_source(src, max_bytes)
        except KeyError:
            raise DecodeError("member not found in the archive") from None
        except OSError as exc:
            raise DecodeError(f"cannot read file: {exc.strerror or exc}") from None
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
        except Exception as exc:
            raise DecodeError(f"DICOM file is unreadable ({type(exc).__name__})") from None
    if frame is not None:
        _PARSED.key, _PARSED.ds = key, ds
    else:
        _PARSED.key = _PARSED.ds = None
    return ds


def _read(src: Source, max_bytes: int, frame: int | None, convert):  # noqa: ANN001, ANN202
    from spinelevel.engine.identity import instance_uids

    # pydicom warns about odd values and quotes them: that text may hold patient data.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = read_dataset(src, max_bytes, frame)
        try:
            return convert(ds, frame), instance_uids(ds)[0]
        except DecodeError:
            raise
        except Exception as exc:  # a malformed element surfaces on access
            # the exception text may quote element values (patient data): name its type only
            raise DecodeError(f"malformed DICOM element ({type(exc).__name__})") from None
