"""Scanning folders and archives: recognition by content, archives read in place, odd entries."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import pydicom.data
import pytest

from spinelevel.engine.decode import read_hu
from spinelevel.engine.scan import FileHeader, ScanOptions, SkippedFile, scan_paths
from spinelevel.errors import InputError

PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"


def _scan(*paths: Path, **kw) -> tuple[list[FileHeader], list[SkippedFile]]:  # noqa: ANN003
    items = list(scan_paths(paths, ScanOptions(**kw)))
    return [i for i in items if isinstance(i, FileHeader)], [i for i in items if isinstance(i, SkippedFile)]


def test_folder_names_do_not_matter(series_dir: Path) -> None:
    headers, skipped = _scan(series_dir)
    assert len(headers) == 60 and not skipped
    assert all("." not in Path(h.source.path).name for h in headers)
    assert {h.series_uid for h in headers} == {"1.2.826.0.1.3680043.8.498.1.1", "1.2.826.0.1.3680043.8.498.1.2"}


def test_dicom_without_preamble_is_recognised(tmp_path: Path) -> None:
    shutil.copy(PYDICOM_FILES / "ExplVR_LitEndNoMeta.dcm", tmp_path / "noext")  # no preamble, no DICM
    (tmp_path / "junk").write_text("patient list, not dicom\n" * 20)
    (tmp_path / "empty").write_bytes(b"")
    headers, skipped = _scan(tmp_path)
    assert [Path(h.source.path).name for h in headers] == ["noext"]
    reasons = {Path(s.source.path).name: s.reason for s in skipped}
    assert reasons == {"junk": "not a DICOM file", "empty": "empty file"}


def _archive_members(series_dir: Path) -> list[tuple[str, bytes]]:
    files = sorted(p for p in series_dir.rglob("*") if p.is_file())
    return [(str(p.relative_to(series_dir)), p.read_bytes()) for p in files]


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
def test_archives_are_read_in_place(tmp_path: Path, series_dir: Path, kind: str) -> None:
    members = _archive_members(series_dir)
    # hostile member names: never used as paths
    members[0] = ("../../escaped_" + members[0][0].replace("/", "_"), members[0][1])
    members[1] = ("/abs/" + members[1][0], members[1][1])
    archive = tmp_path / "archive_without_extension"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members:
                zf.writestr(name, data)
    else:
        with tarfile.open(archive, "w:gz" if kind == "tar.gz" else "w") as tf:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    before = set(os.listdir(tmp_path)) | set(os.listdir(tmp_path.parent))
    headers, skipped = _scan(archive)
    assert not skipped
    assert len(headers) == 60
    assert {h.source.kind for h in headers} == {"zip" if kind == "zip" else "tar"}
    assert any(h.source.member.startswith("../../escaped_") for h in headers)
    assert set(os.listdir(tmp_path)) | set(os.listdir(tmp_path.parent)) == before
    # pixel data comes back from the archive in any order
    for h in reversed(headers[:5]):
        hu, sop = read_hu(h.source, 1 << 30)
        assert sop == h.sop_uid and hu.shape == (64, 64)


def test_nested_archive_and_zip_bomb_are_skipped(tmp_path: Path) -> None:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        zf.writestr("a", b"x")
    archive = tmp_path / "outer.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("inner.zip", inner.getvalue())
        zf.writestr("bomb", b"\0" * (20 << 20))
    _, skipped = _scan(archive)
    reasons = {s.source.member: s.reason for s in skipped}
    assert "nested archive" in reasons["inner.zip"]
    assert "zip bomb" in reasons["bomb"]


def test_size_limit(tmp_path: Path) -> None:
    shutil.copy(PYDICOM_FILES / "CT_small.dcm", tmp_path / "ct")
    _, skipped = _scan(tmp_path, max_file_bytes=1000)
    assert "over the 1000-byte limit" in skipped[0].reason


def test_symlink_loop_does_not_hang(tmp_path: Path, series_dir: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(series_dir, root)
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "dangling").symlink_to(tmp_path / "nowhere")
    headers, skipped = _scan(root)
    assert len(headers) == 60
    reasons = sorted(s.reason for s in skipped)
    assert reasons == ["broken symbolic link", "symbolic link to a directory (not followed)"]


def test_missing_input_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        _scan(tmp_path / "absent")


def test_damaged_archives_are_recorded(tmp_path: Path, series_dir: Path) -> None:
    archive = tmp_path / "cut.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(series_dir, arcname="s")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    headers, skipped = _scan(archive)
    assert skipped and "damaged" in skipped[-1].reason
    assert len(headers) < 60
