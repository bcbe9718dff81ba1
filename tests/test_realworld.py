"""The real-world conformance corpus: real DICOM from public repositories (tests/data/realworld).

One run over the whole corpus; for every file, the outcome it must have: classified (its slice is in
``slices/``, with Hounsfield units in a plausible range) or skipped / error with its specific reason.
Sources, commits and licences: tests/data/realworld/SOURCES.md. These files carry no labels: they
test conformance (is every valid series classified), not accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from spinelevel.engine.decode import read_hu
from spinelevel.engine.sources import Source

CORPUS = Path(__file__).parent / "data" / "realworld"

# file (relative to CORPUS) -> ("classified", None) or (outcome, words of the reason). "duplicate" files
# are the same slice as a kept one; the reason names the file kept.
EXPECTED: dict[str, tuple[str, str | None]] = {
    # GE CT1 (NEMA WG04) in 8 syntaxes: explicit big endian and implicit LE share the SOP UID; the
    # JPEG copies are DERIVED re-encodings at the same position
    "ge_ct1_multisyntax/ct1_explicit_be.dcm": ("classified", None),
    "ge_ct1_multisyntax/ct1_implicit_le.dcm": ("skipped", "duplicate SOPInstanceUID (kept"),
    "ge_ct1_multisyntax/ct1_rle.dcm": ("classified", None),  # its own UIDs: its own series
    "ge_ct1_multisyntax/ct1_jpeg_ll_sv1.dcm": ("skipped", "ORIGINAL image over DERIVED"),
    "ge_ct1_multisyntax/ct1_jpegls_lossless.dcm": ("skipped", "ORIGINAL image over DERIVED"),
    "ge_ct1_multisyntax/ct1_jpegls_near.dcm": ("skipped", "duplicate slice position"),
    "ge_ct1_multisyntax/ct1_j2k_lossless.dcm": ("skipped", "duplicate slice position"),
    "ge_ct1_multisyntax/ct1_j2k_lossy.dcm": ("skipped", "duplicate slice position"),
    # Toshiba CT2 (WG04): the lossless copy is kept over the lossy ones
    "toshiba_ct2_multisyntax/ct2_rle.dcm": ("classified", None),
    "toshiba_ct2_multisyntax/ct2_jpeg_ll_sv1.dcm": ("classified", None),
    "toshiba_ct2_multisyntax/ct2_jpegls_near.dcm": ("skipped", "lossless over lossy compression"),
    "toshiba_ct2_multisyntax/ct2_j2k_lossy.dcm": ("skipped", "lossless over lossy compression"),
    # a real 2-frame Enhanced CT in 5 syntaxes: frames are slices; lossless copies kept
    "enhanced_ct_multiframe/ect_jpeg_lossless_57.dcm": ("classified", None),
    "enhanced_ct_multiframe/ect_jpegls_80_bot.dcm": ("skipped", "duplicate SOPInstanceUID"),
    "enhanced_ct_multiframe/ect_rle_bot.dcm": ("skipped", "duplicate SOPInstanceUID"),
    "enhanced_ct_multiframe/ect_jpeg_extended_51.dcm": ("skipped", "lossless over lossy compression"),
    "enhanced_ct_multiframe/ect_jpegls_near_81.dcm": ("skipped", "lossless over lossy compression"),
    # CT_small: explicit LE and a deflated copy share the SOP UID; pydicom's no_meta.dcm has a stray
    # leading byte and is not parseable
    "ge_ct_small/ct_small_deflated_DERIVED.dcm": ("classified", None),
    "ge_ct_small/ct_small_explicit_le.dcm": ("skipped", "duplicate SOPInstanceUID (kept"),
    "ge_ct_small/ct_small_no_meta_no_preamble.dcm": ("skipped", "not a DICOM file"),
    "ge_ct_small_empty_uids/ct_small_empty_uids_DERIVED.dcm": ("classified", None),
    "ge_ct_pad32768/ct_ge_pad_minus32768.dcm": ("classified", None),
    "ge_ct_localizer/ct_ge_localizer_jpeg_ll_sv1.dcm": ("skipped", "localizer (scout) images"),
    "ge_ct_tiny16_dicomdir_series/ct5n_1.dcm": ("classified", None),
    "ge_ct_tiny16_dicomdir_series/ct5n_2.dcm": ("classified", None),
    "ge_ct_tiny16_dicomdir_series/ct5n_3.dcm": ("classified", None),
    "ge_ct_tiny16_dicomdir_series/ct5n_4.dcm": ("classified", None),
    "ge_ct_tiny16_dicomdir_series/ct5n_5.dcm": ("classified", None),
    "dicomdir/DICOMDIR": ("skipped", "DICOMDIR (media directory), not an image"),
    "siemens_ct_mpr_claims_axial/ct_siemens_mpr_sag_a.dcm": ("skipped", "not axial: sagittal slices"),
    "siemens_ct_axial/ct_siemens_axial.dcm": ("classified", None),
    "philips_ct_axial_jpeg_ll/ct_philips_axial_sv1.dcm": ("classified", None),
    "philips_pmsct_rle1/ct_philips_pmsct_rle1.dcm": ("error", "Philips/Elscint private compression PMSCT_RLE1"),
    "philips_localizer_j2k_lossy/ct_philips_localizer_j2k.dcm": ("skipped", "localizer (scout) images"),
    "toshiba_ct_axial_j2k/ct_toshiba_axial_j2k.dcm": ("classified", None),
    "toshiba_ct_mpr_coronal/ct_toshiba_mpr_cor_j2k.dcm": ("skipped", "not axial: coronal slices"),
    "toshiba_elscint_jp2/ct_jp2_header_in_j2k.dcm": ("classified", None),
    "tcia_pancreas_vr_un/ct_pancreas_j2k_vr_un.dcm": ("classified", None),
    "ct_charset_iso2022_jp/ct_j2k_bits13_iso2022.dcm": ("skipped", "22 degrees from the patient z axis (a tilted gantry"),
    "ct_utf8_not_axial/ct_xeos_utf8_cor.dcm": ("skipped", "not axial: coronal slices"),
    "charset_non_ct/sc_utf8_iso_ir_192.dcm": ("skipped", "secondary capture"),
    "charset_non_ct/sc_latin1_iso_ir_100.dcm": ("skipped", "secondary capture"),
    "charset_non_ct/sc_japanese_iso2022.dcm": ("skipped", "secondary capture"),
    "charset_non_ct/sc_cyrillic_iso_ir_144.dcm": ("skipped", "secondary capture"),
    "non_ct_deflate/sc_deflated.dcm": ("skipped", "secondary capture"),
    "non_ct_mr/mr_small.dcm": ("skipped", "modality MR is not CT"),
}
# 11 members of one zip: one series of 10 positions (CT26 and CT28 are the same slice)
ZIP = "ge_ct_sparse_series_zip/dupe-positions.zip"
EMPTY_UIDS = "siemens_ct_empty_uids"


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> dict:
    from spinelevel.engine.pipeline import RunOptions, run
    from spinelevel.engine.select import SelectOptions

    out = tmp_path_factory.mktemp("corpus") / "out"
    summary = run([CORPUS], model_path, out, RunOptions(workers=0, select=SelectOptions(min_slices=1)))
    slices = pq.read_table(out / "slices").to_pylist()
    series = pq.read_table(out / "series").to_pylist()
    skipped = pq.read_table(out / "skipped").to_pylist()
    return {"summary": summary, "slices": slices, "series": series, "skipped": skipped, "out": out}


def _rel(label: str) -> str:
    return label.split(str(CORPUS) + "/", 1)[1]


def test_every_file_of_the_corpus_is_listed() -> None:
    on_disk = {str(p.relative_to(CORPUS)) for p in CORPUS.rglob("*") if p.is_file() and p.name != "SOURCES.md"}
    listed = set(EXPECTED) | {ZIP} | {f"{EMPTY_UIDS}/slice_{i:02d}.dcm" for i in range(1, 21)}
    assert on_disk == listed


def test_corpus_is_small() -> None:
    assert sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file()) <= 15 * 1024 * 1024


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_file_outcome(corpus_run: dict, name: str) -> None:
    outcome, words = EXPECTED[name]
    classified = {_rel(r["source"]) for r in corpus_run["slices"]}
    reasons = [r["reason"] for r in corpus_run["skipped"] if _rel(r["source"]) == name]
    if outcome == "classified":
        assert name in classified, reasons
        hu, _ = read_hu(Source(str(CORPUS / name)), 1 << 30, 1 if name.startswith("enhanced_ct") else None)
        _plausible_hu(hu)
    else:
        assert name not in classified
        assert reasons, f"{name} is neither classified nor skipped"
        assert any(words in r for r in reasons), reasons
        if outcome == "error":
            (row,) = [s for s in corpus_run["series"] if s["status"] == "error" and any(words in r for r in reasons)]
            assert words in row["reason"]


def _plausible_hu(hu: np.ndarray) -> None:
    # out-of-field-of-view marks (-2000, -2048, -3024 HU) are air; CT HU of bone reach ~3000
    assert hu.min() >= -1100.0 and hu.max() <= 4000.0
    air = np.mean((hu >= -1100) & (hu <= -900))
    fat = np.mean((hu >= -150) & (hu <= -50))
    soft = np.mean((hu >= 0) & (hu <= 100))
    assert air + fat + soft > 0.2, (air, fat, soft)
    assert fat + soft > 0.05, (fat, soft)  # a body, not an empty field


def test_enhanced_ct_frames_are_slices(corpus_run: dict) -> None:
    rows = [r for r in corpus_run["slices"] if "enhanced_ct_multiframe" in r["source"]]
    assert sorted(r["frame"] for r in rows) == [1, 2]
    assert {_rel(r["source"]) for r in rows} == {"enhanced_ct_multiframe/ect_jpeg_lossless_57.dcm"}
    assert sorted(r["z_mm"] for r in rows) == [-159.0, -149.0]
    # the rescale comes from the functional groups: air is -1024 + noise, not the stored 0
    hu1, _ = read_hu(Source(str(CORPUS / "enhanced_ct_multiframe/ect_jpeg_lossless_57.dcm")), 1 << 30, 1)
    assert np.percentile(hu1, 5) == -1024.0
    single = [r for r in corpus_run["slices"] if r["frame"] is None]
    assert single and all(r["frame"] is None for r in single)


def test_empty_uids_get_derived_ones(corpus_run: dict) -> None:
    rows = [r for r in corpus_run["slices"] if EMPTY_UIDS in r["source"]]
    assert len(rows) == 20
    (series,) = {r["series_uid"] for r in rows}
    (row,) = [s for s in corpus_run["series"] if s["series_uid"] == series]
    assert row["status"] == "ok" and row["n_slices"] == 20
    assert {"derived_series_uid", "derived_study_uid"} <= set(row["flags"])
    assert series.startswith("2.25.") and row["study_uid"].startswith("2.25.")
    # SOP instance UIDs from the file meta (the dataset's are empty)
    assert all(r["sop_uid"].startswith("1.3.12.2.1107.5.1.4.60064.") for r in rows)
    assert len({r["sop_uid"] for r in rows}) == 20
    # and the small pydicom file with empty UIDs, alone in its folder: its own derived series
    (small,) = [r for r in corpus_run["slices"] if "ge_ct_small_empty_uids" in r["source"]]
    assert small["series_uid"] != series


def test_duplicate_positions_in_a_zip(corpus_run: dict) -> None:
    rows = [r for r in corpus_run["slices"] if ZIP in r["source"]]
    assert len(rows) == 10 and len({r["z_mm"] for r in rows}) == 10
    (dup,) = [r for r in corpus_run["skipped"] if ZIP in r["source"]]
    assert "duplicate slice position z=-90.00 mm (kept" in dup["reason"] and "::CT26.dcm" in dup["reason"]
    (row,) = [s for s in corpus_run["series"] if s["series_uid"] == rows[0]["series_uid"]]
    assert row["n_slices"] == 10 and "duplicate_positions" in row["flags"]


def test_run_completes_and_every_series_has_a_status(corpus_run: dict) -> None:
    assert {s["status"] for s in corpus_run["series"]} == {"ok", "skipped", "error"}
    assert corpus_run["summary"].series_error == 1  # the private compression
    assert all(s["reason"] for s in corpus_run["series"] if s["status"] != "ok")


def test_resume_gives_the_same_rows(corpus_run: dict, model_path: Path) -> None:
    from spinelevel.engine.pipeline import RunOptions, run
    from spinelevel.engine.select import SelectOptions

    again = run([CORPUS], model_path, corpus_run["out"], RunOptions(workers=0, select=SelectOptions(min_slices=1)))
    assert again.series_already_done == len(corpus_run["series"])
    assert again.series_ok == 0 and again.slices == 0
    assert pq.read_table(corpus_run["out"] / "slices").num_rows == len(corpus_run["slices"])
