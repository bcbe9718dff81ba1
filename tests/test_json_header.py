"""DICOM JSON metadata read through its binary encoding (engine.json_header) gives the same scan
headers as pydicom's Dataset.from_json, on every real file of the corpus and on phantoms."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from spinelevel.engine import dicomweb
from spinelevel.engine.dicomweb import DicomwebConnection, _headers_from_json
from spinelevel.engine.json_header import dataset_from_json
from spinelevel.engine.scan import ScanOptions

DATA = Path(__file__).parent / "data"
CONN = DicomwebConnection("http://127.0.0.1:1/dicom-web")


def _items() -> list[tuple[str, dict]]:
    """(name, JSON item) of every DICOM file of the corpus, as a server's metadata would give it."""
    out = []
    for path in sorted(p for p in (DATA / "realworld").rglob("*") if p.is_file() and p.suffix not in (".md", ".txt", ".zip", ".gz", ".tar")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        try:
            item = ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda e: "http://server/bulk")
        except Exception:
            continue
        meta = getattr(ds, "file_meta", None)
        if meta is not None and "TransferSyntaxUID" in meta:
            item["00020010"] = {"vr": "UI", "Value": [str(meta.TransferSyntaxUID)]}
        out.append((str(path.relative_to(DATA)), item))
    return out


ITEMS = _items()


def test_the_corpus_gives_many_items() -> None:
    assert len(ITEMS) >= 50


@pytest.mark.parametrize(("name", "item"), ITEMS, ids=[n for n, _ in ITEMS])
def test_headers_equal_those_of_from_json(name: str, item: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    body = {k: v for k, v in item.items() if not k.startswith("0002")}
    dataset_from_json(dicomweb._no_bulk(body))  # the fast path itself takes every corpus item (no fallback)
    fast = _headers_from_json(CONN, "1.2.3", "1.2.3.4", item, ScanOptions(keep_tags=("PatientName", "InstitutionName", "StudyDescription")))
    def no_fast_path(body):  # noqa: ANN001, ANN202
        raise ValueError("fast path off")

    monkeypatch.setattr(dicomweb, "_dataset", no_fast_path)  # every item through from_json
    slow = _headers_from_json(CONN, "1.2.3", "1.2.3.4", item, ScanOptions(keep_tags=("PatientName", "InstitutionName", "StudyDescription")))
    assert fast == slow


def test_values_of_every_kind_read_back() -> None:
    item = {
        "00080005": {"vr": "CS", "Value": ["ISO_IR 100"]},
        "00080008": {"vr": "CS", "Value": ["ORIGINAL", "PRIMARY", "AXIAL"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Müller^Jürgen"}]},
        "00200032": {"vr": "DS", "Value": [-125.5, 0.30000000000000004, 1e-7]},
        "00200013": {"vr": "IS", "Value": [12]},
        "00280010": {"vr": "US", "Value": [512]},
        "00281052": {"vr": "DS", "Value": ["-1024"]},
        "00209165": {"vr": "AT", "Value": ["00209056"]},
        "00189346": {"vr": "SQ", "Value": [{"00080100": {"vr": "SH", "Value": ["113691"]}}]},
        "00291010": {"vr": "OB", "InlineBinary": "AAEC"},
        "7FE00010": {"vr": "OW", "BulkDataURI": "http://server/bulk"},
    }
    ds = dataset_from_json(item)
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert str(ds.PatientName) == "Müller^Jürgen"
    assert [float(v) for v in ds.ImagePositionPatient][0] == -125.5 and len(ds.ImagePositionPatient) == 3
    assert ds.InstanceNumber == 12 and ds.Rows == 512 and float(ds.RescaleIntercept) == -1024.0
    assert ds[0x00209165].value == 0x00209056
    assert ds[0x00189346][0][0x00080100].value == "113691"
    assert ds[0x00291010].value == b"\x00\x01\x02"
    assert "PixelData" not in ds  # bulk data is never fetched by the scan


def test_invalid_json_falls_back_to_from_json() -> None:
    with pytest.raises(Exception):
        dataset_from_json({"0020000D": {"vr": "US", "Value": ["not a number"]}})
    # the scan still reads the instance (from_json accepts or names the problem)
    headers = _headers_from_json(CONN, "1", "2", {"00080018": {"vr": "UI", "Value": ["1.2.3"]}, "00280010": {"vr": "US", "Value": ["x"]}}, ScanOptions())
    assert len(headers) == 1
