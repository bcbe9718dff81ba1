"""Identity of DICOM instances as real archives hold them, and the encoding a parser detected.

De-identification profiles often empty the dataset's SOPInstanceUID, SOPClassUID, SeriesInstanceUID
and StudyInstanceUID while the file meta still holds MediaStorageSOPInstanceUID and
MediaStorageSOPClassUID; old exports have no file meta at all. Scan and decode must agree on who an
instance is, so both use these functions.

Derived UIDs (``2.25.<uuid>``, DICOM PS3.5 B.2) come from a key of header values that identify a
series or study without patient data; the same key always gives the same UID, so re-runs derive the
same UIDs and resume works. The keys are documented in README ("Real archives").
"""

from __future__ import annotations

import uuid

__all__ = ["instance_uids", "derived_uid", "detected_transfer_syntax", "missing_identity"]

# Namespace of the uuid5 behind every derived UID (fixed: changing it would change every derived UID).
_NAMESPACE = uuid.UUID("5b0b6f8e-3c1d-4d5e-9a58-6c2f1f3b7a10")


def _text(ds, keyword: str) -> str:  # noqa: ANN001 - pydicom Dataset
    if ds is None:
        return ""
    try:
        value = ds.get(keyword, "")
    except Exception:  # a malformed element surfaces on access
        return ""
    return str(value).strip() if value is not None else ""


def instance_uids(ds) -> tuple[str, str]:  # noqa: ANN001 - pydicom Dataset
    """(SOPInstanceUID, SOPClassUID): the dataset's, else the file meta's Media Storage UIDs."""
    meta = getattr(ds, "file_meta", None)
    sop = _text(ds, "SOPInstanceUID") or _text(meta, "MediaStorageSOPInstanceUID")
    cls = _text(ds, "SOPClassUID") or _text(meta, "MediaStorageSOPClassUID")
    return sop, cls


def missing_identity(ds) -> str:  # noqa: ANN001 - pydicom Dataset
    """The reason for a file that no UID identifies, naming the tags that were looked at."""
    meta = getattr(ds, "file_meta", None)
    where = "empty" if "SOPInstanceUID" in ds else "absent"
    meta_where = "no file meta" if meta is None or len(meta) == 0 else ("MediaStorageSOPInstanceUID (0002,0003) empty" if "MediaStorageSOPInstanceUID" in meta else "MediaStorageSOPInstanceUID (0002,0003) absent")
    return f"DICOM file without an instance UID: SOPInstanceUID (0008,0018) {where}, {meta_where}"


def derived_uid(kind: str, parts: tuple[object, ...]) -> str:
    """A deterministic ``2.25.`` UID for a series or study that has none, from its key ``parts``."""
    key = "\x1f".join([kind] + ["" if p is None else str(p) for p in parts])
    return f"2.25.{uuid.uuid5(_NAMESPACE, key).int}"


def detected_transfer_syntax(ds) -> str:  # noqa: ANN001 - pydicom Dataset
    """The file meta's TransferSyntaxUID, else the encoding the parser found in the dataset.

    Files without file meta (old implicit VR little endian exports) can only be native encodings:
    implicit little endian, explicit little endian or explicit big endian.
    """
    meta = getattr(ds, "file_meta", None)
    ts = _text(meta, "TransferSyntaxUID")
    if ts:
        return ts
    try:
        implicit, little = ds.original_encoding
    except AttributeError:
        implicit, little = ds.is_implicit_VR, ds.is_little_endian
    if implicit is None or little is None:
        return ""
    if implicit:
        return "1.2.840.10008.1.2"
    return "1.2.840.10008.1.2.1" if little else "1.2.840.10008.1.2.2"
