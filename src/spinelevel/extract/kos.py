"""A DICOM Key Object Selection document per series that points at its level picks (highdicom).

The document (TID 2010) carries a title from CID 7010 (default "For Segmentation"), the device that
made the selection (spinelevel) as observer context, one text item naming the levels and the tool
(spinelevel version, model sha256, the pick definitions), and one IMAGE reference per pick, with the
frame number for a frame of a multi-frame file.

From the source instance it takes the patient module (PatientName, PatientID, PatientBirthDate,
PatientSex) and the study identity a PACS needs to file the document with its study
(StudyInstanceUID, StudyDate, StudyTime, AccessionNumber, ReferringPhysicianName, StudyID), plus
SpecificCharacterSet so that the names stay readable. Nothing else of the source header is copied.
The document goes to the PACS, so identity belongs in it; it never goes into the manifest, the
pictures or the logs.

Everything in the document is a function of the run and the picks: UIDs are derived from the
series UID, the picked SOP instance UIDs and the model, and the content date/time is the start of
the run that classified the series, so extracting again writes the same bytes.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

__all__ = ["KosPick", "PATIENT_STUDY_KEYWORDS", "build_kos", "kos_uids"]

# Attributes copied from the source instance into the document.
PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
)

# Series number given to the KOS series (any number not used by scanners' own series would do).
_SERIES_NUMBER = 9301


@dataclass(frozen=True)
class KosPick:
    """A verified pick, as the document references it."""

    level: str
    slice_index: int
    z_mm: float | None
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    # 1-based frame of a multi-frame instance, or None.
    frame: int | None


def kos_uids(series_uid: str, picks: list[KosPick], model_sha256: str | None) -> tuple[str, str]:
    """(series instance UID, SOP instance UID) of the document: fixed for the same selection."""
    from pydicom.uid import generate_uid

    key = [series_uid, model_sha256 or ""] + [f"{p.level}:{p.sop_uid}:{p.frame or ''}" for p in picks]
    return generate_uid(entropy_srcs=["spinelevel-kos-series", series_uid]), generate_uid(entropy_srcs=["spinelevel-kos", *key])


def _usable(keyword: str, value):  # noqa: ANN001, ANN202
    """The source's value, or empty (type 2) where highdicom would refuse it: archives hold
    ``PatientSex = "female"`` and four-digit birth dates, and a KOS must still be written."""
    if value is None:
        return ""
    if keyword == "PatientSex":
        return value if str(value) in ("M", "F", "O") else ""
    if keyword in ("PatientBirthDate", "StudyDate", "StudyTime"):
        from pydicom.valuerep import DA, TM

        try:
            (TM if keyword == "StudyTime" else DA)(value)
        except (TypeError, ValueError):
            return ""
    return value


def _evidence(source, pick: KosPick, study_uid: str, with_patient: bool):  # noqa: ANN001, ANN202
    """A minimal dataset standing for a referenced instance (highdicom reads the patient from the first)."""
    from pydicom.dataset import Dataset

    ev = Dataset()
    ev.SOPClassUID = pick.sop_class_uid
    ev.SOPInstanceUID = pick.sop_uid
    ev.SeriesInstanceUID = pick.series_uid
    ev.StudyInstanceUID = study_uid
    # Rows/Columns make highdicom reference it as an IMAGE (TID 2010 row 4), not a COMPOSITE.
    ev.Rows = int(source.get("Rows", 0) or 0)
    ev.Columns = int(source.get("Columns", 0) or 0)
    if with_patient:
        for kw in PATIENT_STUDY_KEYWORDS:
            if kw == "StudyInstanceUID":
                continue
            setattr(ev, kw, _usable(kw, source.get(kw, None)))
        if "SpecificCharacterSet" in source:
            ev.SpecificCharacterSet = source.SpecificCharacterSet
    return ev


def build_kos(
    source,  # noqa: ANN001 - pydicom Dataset: header of the first pick's source instance
    study_uid: str,
    series_uid: str,
    picks: list[KosPick],
    title_code,  # noqa: ANN001 - pydicom Code from CID 7010
    description: str,
    model_sha256: str | None,
    content_datetime: str,
    version: str,
) -> bytes:
    """The document as DICOM file bytes (explicit VR little endian, with file meta).

    Args:
        source: header of a source instance of the series (its patient and study module are copied).
        study_uid: the study the picks belong to.
        series_uid: the image series the picks belong to.
        picks: at least one; each referenced once in the evidence and once in the content.
        title_code: the document title.
        description: the Key Object Description text.
        model_sha256: model that made the picks (part of the document's UID).
        content_datetime: ``YYYYMMDDTHHMMSSZ`` (UTC): content, series and creation date/time.
        version: spinelevel's version (SoftwareVersions, device model name).
    """
    # highdicom warns (warnings and its logger) about odd person names, quoting them: patient
    # identity must not reach the logs.
    hd_log = logging.getLogger("highdicom")
    was_disabled = hd_log.disabled
    hd_log.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _build(source, study_uid, series_uid, picks, title_code, description, model_sha256, content_datetime, version)
    finally:
        hd_log.disabled = was_disabled


def _build(source, study_uid: str, series_uid: str, picks: list[KosPick], title_code, description: str, model_sha256: str | None, content_datetime: str, version: str) -> bytes:  # noqa: ANN001
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    assert picks, "a KOS needs at least one pick"
    day, time = content_datetime[:8], content_datetime[9:15]
    evidence = []
    seen: set[str] = set()
    for k, pick in enumerate(picks):
        if pick.sop_uid in seen:  # several frames of one multi-frame file: one evidence item
            continue
        seen.add(pick.sop_uid)
        evidence.append(_evidence(source, pick, study_uid, with_patient=k == 0))
    referenced = [_evidence(source, p, study_uid, with_patient=False) for p in picks]
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["spinelevel-device", version]),
            name="spinelevel",
            manufacturer_name="spinelevel",
            model_name=f"spinelevel {version}",
        ),
    )
    content = hd.ko.KeyObjectSelection(
        document_title=title_code,
        referenced_objects=referenced,
        observer_device_context=device,
        description=description,
    )
    # highdicom's KOS content has no frame numbers: add them to the IMAGE references of frames.
    images = [item for item in content[0].ContentSequence if item.ValueType == "IMAGE"]
    assert len(images) == len(picks)
    for item, pick in zip(images, picks):
        if pick.frame is not None:
            item.ReferencedSOPSequence[0].ReferencedFrameNumber = int(pick.frame)
    kos_series, kos_sop = kos_uids(series_uid, picks, model_sha256)
    doc = hd.ko.KeyObjectSelectionDocument(
        evidence=evidence,
        content=content,
        series_instance_uid=kos_series,
        series_number=_SERIES_NUMBER,
        sop_instance_uid=kos_sop,
        instance_number=1,
        manufacturer="spinelevel",
        manufacturer_model_name="spinelevel",
        software_versions=version,
        series_description="spinelevel level picks",
        content_date=day,
        content_time=time,
        series_date=day,
        series_time=time,
    )
    # highdicom stamps the wall clock (creation, its own contribution); the selection's time keeps
    # the document reproducible.
    doc.InstanceCreationDate = day
    doc.InstanceCreationTime = time
    for item in doc.get("ContributingEquipmentSequence", []):
        item.ContributionDateTime = day + time
    doc.TimezoneOffsetFromUTC = "+0000"
    buf = io.BytesIO()
    doc.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
