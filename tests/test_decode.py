"""Decoding pixel data to HU for every transfer syntax, signedness, padding and broken tags."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, generate_uid

from dicomgen import COMPRESSED, LOSSLESS, UNCOMPRESSED, SeriesSpec, make_slice_dataset
from spinelevel.engine.decode import AIR_HU, decode_hu, read_hu
from spinelevel.engine.sources import Source
from spinelevel.errors import DecodeError


def _hu(size: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1024, 2000, size=(size, size)).astype(np.float32)
    hu[:4, :4] = -1024
    hu[-4:, -4:] = 1999
    return hu


def _write(tmp_path: Path, spec: SeriesSpec, hu: np.ndarray) -> Path:
    ds = make_slice_dataset(spec, 0, hu, (0.0, 0.0, 0.0), generate_uid())
    path = tmp_path / "slice"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("syntax", sorted(set(UNCOMPRESSED) | set(COMPRESSED)))
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_transfer_syntaxes_decode_to_hu(tmp_path: Path, syntax: str, signed: bool) -> None:
    hu = _hu()
    if syntax not in LOSSLESS:  # lossy coding needs an image, not white noise
        yy, xx = np.mgrid[:48, :48]
        hu = np.round(1000 * np.sin(xx / 9.0) * np.cos(yy / 7.0)).astype(np.float32)
    spec = SeriesSpec(levels=["L3"], syntax=syntax, signed=signed, intercept=-1024.0)
    path = _write(tmp_path, spec, hu)
    assert str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax
    got, sop = read_hu(Source(str(path)), 1 << 30)
    assert got.dtype == np.float32 and got.shape == hu.shape
    if syntax in LOSSLESS:
        np.testing.assert_array_equal(got, hu)
    else:  # lossy JPEG 2000 at 5:1 keeps HU close
        assert np.abs(got - hu).mean() < 20


def test_intercept_minus_8192_and_slope(tmp_path: Path) -> None:
    hu = _hu()
    spec = SeriesSpec(levels=["L3"], signed=True, intercept=-8192.0, slope=1.0)
    np.testing.assert_array_equal(read_hu(Source(str(_write(tmp_path, spec, hu))), 1 << 30)[0], hu)
    spec = SeriesSpec(levels=["L3"], signed=True, intercept=-1000.0, slope=0.5)
    got = read_hu(Source(str(_write(tmp_path, spec, hu))), 1 << 30)[0]
    np.testing.assert_allclose(got, np.round((hu + 1000) / 0.5) * 0.5 - 1000)


@pytest.mark.parametrize("signed", [True, False])
def test_pixel_padding_value_becomes_air(signed: bool) -> None:
    spec = SeriesSpec(levels=["L3"], signed=signed, intercept=-1024.0)
    hu = np.maximum(_hu(), -1000.0)  # no real pixel at the padding value
    ds = make_slice_dataset(spec, 0, hu, (0.0, 0.0, 0.0), generate_uid())
    stored = ds.pixel_array.copy()
    pad = -2000 if signed else 0
    stored[:8, :] = pad
    ds.PixelData = stored.tobytes()
    ds.PixelPaddingValue = pad
    got = decode_hu(ds)
    assert np.all(got[:8] == AIR_HU)
    np.testing.assert_array_equal(got[8:], hu[8:])


def test_zero_slope_and_missing_pixels_are_decode_errors() -> None:
    spec = SeriesSpec(levels=["L3"])
    ds = make_slice_dataset(spec, 0, _hu(), (0.0, 0.0, 0.0), generate_uid())
    ds.RescaleSlope = "0"
    with pytest.raises(DecodeError, match="RescaleSlope=0"):
        decode_hu(ds)
    del ds.PixelData
    with pytest.raises(DecodeError, match="no pixel data"):
        decode_hu(ds)


def test_undecodable_syntax_names_it(tmp_path: Path) -> None:
    spec = SeriesSpec(levels=["L3"])
    ds = make_slice_dataset(spec, 0, _hu(), (0.0, 0.0, 0.0), generate_uid())
    ds.file_meta.TransferSyntaxUID = JPEG2000
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51garbage codestream"])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "bad"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DecodeError) as info:
        read_hu(Source(str(path)), 1 << 30)
    assert "JPEG 2000" in str(info.value) and "1.2.840.10008.1.2.4.91" in str(info.value)


def test_truncated_pixel_data(tmp_path: Path) -> None:
    spec = SeriesSpec(levels=["L3"], syntax=ExplicitVRLittleEndian)
    ds = make_slice_dataset(spec, 0, _hu(), (0.0, 0.0, 0.0), generate_uid())
    ds.PixelData = ds.PixelData[:100]
    path = tmp_path / "short"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DecodeError, match="cannot decode"):
        read_hu(Source(str(path)), 1 << 30)


def test_pydicom_bundled_files_decode_or_raise_decode_error() -> None:
    """Every real odd file pydicom ships either decodes or gives a DecodeError, never anything else."""
    import pydicom.data

    root = Path(pydicom.data.__file__).parent / "test_files"
    decoded = failed = 0
    for path in sorted(p for p in root.iterdir() if p.is_file()):
        try:
            hu, _ = read_hu(Source(str(path)), 1 << 30)
            assert hu.ndim == 2 and hu.dtype == np.float32
            decoded += 1
        except DecodeError as exc:
            assert str(exc)
            failed += 1
    assert decoded >= 10 and failed >= 10
