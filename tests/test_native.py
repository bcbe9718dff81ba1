"""Native reads (engine.native): uncompressed pixels viewed at the offset the scan found.

Parity is exact (same stored values, dtype, rescale and padding as pydicom's full parse), on every
real file of the corpus and on synthetic files for the cases the corpus lacks (padding range, implicit
VR, archive members); a file that changed after the scan is not read at a stale offset.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid

from dicomgen import SeriesSpec, make_slice_dataset, slice_hu
from spinelevel.card import ModelCard
from spinelevel.engine.decode import read_stored
from spinelevel.engine.native import _holds_uid, read_native
from spinelevel.engine.preprocess import PreprocessSpec
from spinelevel.engine.scan import FileHeader, scan_paths
from spinelevel.engine.workers import DecodeTask, prepare

DATA = Path(__file__).parent / "data"


def _same(a, b) -> bool:  # noqa: ANN001 - StoredSlice
    if a.raw.dtype != b.raw.dtype or not np.array_equal(a.raw, b.raw) or (a.slope, a.intercept) != (b.slope, b.intercept):
        return False
    if a.padding is None or b.padding is None:
        return a.padding is None and b.padding is None
    return np.array_equal(a.padding, b.padding)


def _headers(*paths: Path) -> list[FileHeader]:
    return [h for h in scan_paths(paths) if isinstance(h, FileHeader)]


def test_native_reads_equal_full_decode_on_every_real_file() -> None:
    headers = _headers(DATA / "realworld", DATA / "real_ct" / "totalseg_example_dicom")
    native = [h for h in headers if h.native is not None]
    # the corpus has uncompressed CT from several vendors, explicit and implicit VR
    assert len(native) >= 20
    assert {h.transfer_syntax for h in native} == {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
    for h in native:
        stored, sop = read_stored(h.source, 1 << 30, h.frame)
        assert sop == h.sop_uid
        assert _same(read_native(h.source, h.native, h.sop_uid, 1 << 30), stored), h.source.label
    # never for what is not native little-endian single-frame 16-bit pixels
    for h in headers:
        if h.transfer_syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) or h.frames > 1:
            assert h.native is None, h.source.label


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("signed", [True, False])
def test_padding_range_and_rescale_match_full_decode(tmp_path: Path, syntax: str, signed: bool) -> None:
    spec = SeriesSpec(levels=["L3"], syntax=syntax, signed=signed, size=32, slope=0.5, intercept=-1024.0 if not signed else -100.0)
    ds = make_slice_dataset(spec, 0, slice_hu(spec, 0), (0.0, 0.0, 0.0), generate_uid())
    stored = ds.pixel_array.copy()
    pad = -2000 if signed else 0
    stored[:4] = pad
    stored[4:6] = pad + 3  # inside the padding range
    ds.PixelData = stored.tobytes()
    ds.PixelPaddingValue = pad
    ds.PixelPaddingRangeLimit = pad + 5
    path = tmp_path / "slice"
    ds.save_as(path, enforce_file_format=True)
    (h,) = _headers(path)
    assert h.native is not None and h.native.padding == (pad, pad + 5)
    got = read_native(h.source, h.native, h.sop_uid, 1 << 30)
    assert _same(got, read_stored(h.source, 1 << 30)[0])
    assert got.padding[:6].all() and not got.padding[6:].any()


def test_not_native_big_endian_compressed_or_odd_photometric(tmp_path: Path) -> None:
    for name, syntax in (("be", ExplicitVRBigEndian), ("rle", RLELossless)):
        spec = SeriesSpec(levels=["L3"], syntax=syntax, size=16)
        make_slice_dataset(spec, 0, slice_hu(spec, 0), (0.0, 0.0, 0.0), generate_uid()).save_as(tmp_path / name, enforce_file_format=True)
    spec = SeriesSpec(levels=["L3"], size=16)
    ds = make_slice_dataset(spec, 0, slice_hu(spec, 0), (0.0, 0.0, 0.0), generate_uid())
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1", enforce_file_format=True)
    headers = _headers(tmp_path)
    assert len(headers) == 3 and all(h.native is None for h in headers)


def test_archive_members_are_read_natively(tmp_path: Path) -> None:
    spec = SeriesSpec(levels=["L3", "L4"], size=16)
    blobs = []
    for i in range(2):
        buf = io.BytesIO()
        make_slice_dataset(spec, i, slice_hu(spec, i), (0.0, 0.0, -5.0 * i), generate_uid()).save_as(buf, enforce_file_format=True)
        blobs.append(buf.getvalue())
    with zipfile.ZipFile(tmp_path / "a.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for i, blob in enumerate(blobs):
            zf.writestr(f"s/{i}", blob)
    with tarfile.open(tmp_path / "a.tar.gz", "w:gz") as tf:
        for i, blob in enumerate(blobs):
            info = tarfile.TarInfo(f"s/{i}")
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    headers = _headers(tmp_path / "a.zip", tmp_path / "a.tar.gz")
    assert len(headers) == 4 and all(h.native is not None for h in headers)
    for h in headers:
        assert _same(read_native(h.source, h.native, h.sop_uid, 1 << 30), read_stored(h.source, 1 << 30)[0])


def _task(h: FileHeader) -> DecodeTask:
    spec = PreprocessSpec.from_card(ModelCard(input_size=(8, 8)))
    return DecodeTask(0, (0,), (h.source,), (h.sop_uid,), spec, 1 << 30, natives=(h.native,))


def test_a_file_changed_after_the_scan_is_not_read_at_a_stale_offset(tmp_path: Path) -> None:
    spec = SeriesSpec(levels=["L3"], size=16)
    path = tmp_path / "slice"
    make_slice_dataset(spec, 0, slice_hu(spec, 0), (0.0, 0.0, 0.0), generate_uid()).save_as(path, enforce_file_format=True)
    (h,) = _headers(path)
    assert prepare(_task(h)).indices == (0,)
    # another instance written over it (same layout, other SOPInstanceUID)
    make_slice_dataset(spec, 0, slice_hu(spec, 0), (0.0, 0.0, 0.0), generate_uid()).save_as(path, enforce_file_format=True)
    assert read_native(h.source, h.native, h.sop_uid, 1 << 30) is None
    result = prepare(_task(h))
    assert result.indices == () and "file changed since it was scanned" in result.failures[0][1]
    # truncated: the native read declines, the full decode names the problem
    make_slice_dataset(spec, 0, slice_hu(spec, 0), (0.0, 0.0, 0.0), h.sop_uid).save_as(path, enforce_file_format=True)
    (h,) = _headers(path)
    path.write_bytes(path.read_bytes()[:-100])
    assert read_native(h.source, h.native, h.sop_uid, 1 << 30) is None
    assert prepare(_task(h)).failures


def test_a_header_that_grew_moves_the_pixels_and_is_decoded_the_full_way(tmp_path: Path) -> None:
    spec = SeriesSpec(levels=["L3"], size=16)
    path = tmp_path / "slice"
    sop = generate_uid()
    ds = make_slice_dataset(spec, 0, slice_hu(spec, 0), (0.0, 0.0, 0.0), sop)
    ds.save_as(path, enforce_file_format=True)
    (h,) = _headers(path)
    ds.StudyDescription = "x" * 64  # same instance, longer header
    ds.save_as(path, enforce_file_format=True)
    assert read_native(h.source, h.native, sop, 1 << 30) is None
    result = prepare(_task(h))
    assert result.indices == (0,) and not result.failures
    np.testing.assert_array_equal(pydicom.dcmread(path).pixel_array, read_stored(h.source, 1 << 30)[0].raw)


def test_uid_must_be_a_whole_value() -> None:
    data = b"\x08\x00\x18\x00UI\x08\x001.2.3.45\x10\x00"
    assert _holds_uid(data, b"1.2.3.45", len(data))
    assert not _holds_uid(data, b"1.2.3.4", len(data))
    assert not _holds_uid(data, b"2.3.45", len(data))
