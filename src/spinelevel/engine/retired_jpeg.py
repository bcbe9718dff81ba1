"""Retired JPEG transfer syntaxes, decoded with GDCM where python-gdcm is installed.

pydicom's decoders cover the JPEG processes DICOM still defines (baseline .50, extended .51,
lossless .57 and .70). Archives also hold the retired ones (PS3.5 2006 and earlier: spectral
selection .53/.54/.58/.59, full progression .55/.56/.60/.61, hierarchical .62-.66 and the extended
variants .52/.54/.56): GDCM, through its IJG libjpeg builds for 8, 12 and 16 bits, decodes them. GDCM
is an optional dependency (``pip install python-gdcm``); without it such a file is refused with a
reason that names the syntax and the package.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from spinelevel.errors import DecodeError

__all__ = ["RETIRED_JPEG", "GDCM_REQUIRES", "gdcm_available", "is_retired_jpeg", "decode_frame"]

# The retired JPEG transfer syntaxes (1.2.840.10008.1.2.4.52 to .66, except .57 which is current).
RETIRED_JPEG = frozenset(f"1.2.840.10008.1.2.4.{n}" for n in range(52, 67) if n != 57)

# The package that decodes them.
GDCM_REQUIRES = "python-gdcm"


def gdcm_available() -> bool:
    """True when GDCM's Python module can be imported."""
    try:
        return importlib.util.find_spec("gdcm") is not None
    except (ImportError, ValueError):
        return False


def is_retired_jpeg(transfer_syntax: str) -> bool:
    """True for a retired JPEG transfer syntax UID."""
    return transfer_syntax in RETIRED_JPEG


def decode_frame(ds, index: int) -> np.ndarray:  # noqa: ANN001 - pydicom Dataset
    """Stored values of frame ``index`` (0-based) of a file in a retired JPEG transfer syntax.

    Raises:
        DecodeError: GDCM is not installed, or it cannot decode the frame.
    """
    from spinelevel.engine.decode import transfer_syntax_name

    tsyntax = str(ds.file_meta.TransferSyntaxUID)
    if not gdcm_available():
        raise DecodeError(f"{transfer_syntax_name(tsyntax)} is a retired JPEG transfer syntax; pip install {GDCM_REQUIRES} to decode it")
    import gdcm

    from spinelevel.engine.frames import encapsulated_frame

    rows, columns = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise DecodeError(f"{transfer_syntax_name(tsyntax)}: {samples} samples per pixel, expected a grey-scale CT frame")
    bits_allocated = int(ds.BitsAllocated)
    bits_stored = int(ds.get("BitsStored", bits_allocated) or bits_allocated)
    signed = int(ds.get("PixelRepresentation", 0) or 0)
    encoded = encapsulated_frame(ds, index)
    if encoded is None:
        raise DecodeError(f"{transfer_syntax_name(tsyntax)}: the pixel data holds fewer than {index + 1} frames")

    # The same construction as pydicom's own GDCM plugin (pydicom/pixels/decoders/gdcm.py).
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(encoded)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    elem = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    elem.SetValue(fragments.__ref__())
    img = gdcm.Image()
    img.SetNumberOfDimensions(2)
    img.SetDimensions((columns, rows, 1))
    img.SetDataElement(elem)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    img.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(gdcm.PhotometricInterpretation.GetPIType(photometric)))
    img.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(tsyntax)))
    img.SetPixelFormat(gdcm.PixelFormat(1, bits_allocated, bits_stored, bits_stored - 1, signed))
    buffer = img.GetBuffer()
    data = buffer.encode("utf-8", "surrogateescape") if isinstance(buffer, str) else bytes(buffer)
    dtype = np.dtype(f"{'<i' if signed else '<u'}{bits_allocated // 8}")
    if len(data) != rows * columns * dtype.itemsize:
        raise DecodeError(f"{transfer_syntax_name(tsyntax)}: GDCM could not decode the frame ({len(data)} bytes for {rows}x{columns})")
    return np.frombuffer(data, dtype=dtype).reshape(rows, columns).copy()
