"""DICOM writers for phantom studies: axial CT slices, localizer images and the radiation dose SR.

Every value comes from the :class:`StudySpec`, so files are byte-identical for the same options.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from pydicom import __version__ as _pydicom_version
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset, write_file_meta_info
from pydicom.pixels import get_encoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    PYDICOM_IMPLEMENTATION_UID,
    JPEGLSLossless,
    RLELossless,
    UID,
)

from spinelevel.phantom.spec import SeriesSpec, StudySpec, _uid

__all__ = [
    "DOSE_SR_STORAGE",
    "TRANSFER_SYNTAX",
    "CTSeriesWriter",
    "hu_to_stored",
    "write_ct_slice",
    "write_dose_report",
    "write_localizer",
]

DOSE_SR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.88.67")
"""X-Ray Radiation Dose SR Storage."""

TRANSFER_SYNTAX: dict[str, UID] = {
    "none": ExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000": JPEG2000Lossless,
    "jpegls": JPEGLSLossless,
}
"""Transfer syntax of each compression option (all lossless)."""

_MANUFACTURER = "spinelevel phantom"
_IMPLEMENTATION_VERSION = f"PYDICOM {_pydicom_version}"[:16]


def _outside_circle(size: int) -> np.ndarray:
    r = (np.arange(size) - (size - 1) / 2.0) / (size / 2.0)
    return r[:, None] ** 2 + r[None, :] ** 2 > 1.0


def hu_to_stored(hu: np.ndarray, spec: StudySpec, outside: np.ndarray | None = None) -> np.ndarray:
    """HU image to stored pixel values (int16 or uint16) with the study's intercept and padding."""
    # round in HU first (exact in float32 for these magnitudes), so values do not depend on the intercept
    stored = np.rint(np.clip(hu, -1024.0, 3071.0, dtype=np.float32))
    stored -= np.float32(spec.rescale_intercept)
    out = stored.astype(np.int16 if spec.signed else np.uint16)
    if spec.padding:
        out[_outside_circle(spec.size) if outside is None else outside] = spec.padding_value
    return out


def _base(spec: StudySpec, sop_class: UID, sop_uid: str, modality: str, transfer: UID) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = spec.study_date
    ds.SeriesDate = spec.study_date
    ds.ContentDate = spec.study_date
    ds.StudyTime = spec.study_time
    ds.SeriesTime = spec.study_time
    ds.ContentTime = spec.study_time
    ds.AccessionNumber = spec.accession
    ds.Modality = modality
    ds.Manufacturer = _MANUFACTURER
    ds.InstitutionName = "PHANTOM GENERAL HOSPITAL"
    ds.ReferringPhysicianName = "PHANTOM^REFERRER"
    ds.StudyDescription = f"CT {spec.coverage.upper().replace('_', ' ')}"
    ds.ManufacturerModelName = "procedural"
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = spec.patient_birth_date
    ds.PatientSex = spec.patient_sex
    ds.StudyInstanceUID = spec.study_uid
    ds.StudyID = f"{spec.index + 1}"
    return ds


def _save(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


_DYNAMIC = (0x00080018, 0x00200013, 0x00200032, 0x00201041)  # SOPInstanceUID, InstanceNumber, IPP, SliceLocation


def _encode_elements(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return fp.getvalue()


class CTSeriesWriter:
    """Writes the slices of one axial series; the header is built and encoded once per series.

    Only SOPInstanceUID, InstanceNumber, ImagePositionPatient, SliceLocation and the pixel data change
    from slice to slice, so the rest of the data set is encoded once and spliced in tag order.
    """

    def __init__(self, spec: StudySpec, series: SeriesSpec) -> None:
        self.spec = spec
        self.series = series
        self.transfer = TRANSFER_SYNTAX[series.compression]
        ds = self._header()
        tags = sorted(int(t) for t in ds.keys())
        bounds = [*_DYNAMIC, 0x7FE00010]
        self._chunks: list[bytes] = []
        lo = 0
        for hi in bounds:
            part = Dataset()
            for t in tags:
                if lo < t < hi:
                    part.add(ds[t])
            self._chunks.append(_encode_elements(part))
            lo = hi
        self._outside = _outside_circle(spec.size) if spec.padding else None
        self._encoder = None if self.transfer == ExplicitVRLittleEndian else get_encoder(self.transfer)

    def _header(self) -> Dataset:
        spec, series = self.spec, self.series
        ds = _base(spec, CTImageStorage, series.sop_uids[0], "CT", ExplicitVRLittleEndian)
        del ds.SOPInstanceUID
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.AcquisitionDate = spec.study_date
        ds.AcquisitionTime = spec.study_time
        ds.SeriesDescription = series.description
        ds.BodyPartExamined = {"lumbar": "LSPINE", "partial": "CHEST" if series.z[-1] > spec.vertebra("L3").top_z else "PELVIS"}.get(spec.coverage, "ABDOMEN")
        ds.SliceThickness = f"{series.thickness:g}"
        ds.KVP = f"{spec.kvp:g}"
        ds.SpacingBetweenSlices = f"{series.spacing:g}"
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = f"{spec.fov:g}"
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = f"{spec.table_y:.1f}"
        ds.XRayTubeCurrent = int(spec.ma)
        ds.ConvolutionKernel = series.kernel
        ds.PatientPosition = spec.patient_position
        ds.SeriesInstanceUID = series.series_uid
        ds.SeriesNumber = series.index
        ds.AcquisitionNumber = 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = spec.frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = spec.size
        ds.Columns = spec.size
        ps = f"{spec.pixel_spacing:.6f}".rstrip("0")
        ds.PixelSpacing = [ps, ps]
        ds.BitsAllocated = 16
        ds.BitsStored = spec.bits_stored
        ds.HighBit = spec.bits_stored - 1
        ds.PixelRepresentation = 1 if spec.signed else 0
        if spec.padding:
            ds.add_new(0x00280120, "SS" if spec.signed else "US", spec.padding_value)
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = f"{spec.rescale_intercept:g}"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        return ds

    def _pixel_element(self, arr: np.ndarray) -> bytes:
        tag = b"\xe0\x7f\x10\x00"
        if self._encoder is None:
            data = arr.astype("<i2" if self.spec.signed else "<u2").tobytes()
            return tag + b"OW\x00\x00" + struct.pack("<I", len(data)) + data
        frame = self._encoder.encode(
            arr,
            rows=self.spec.size,
            columns=self.spec.size,
            samples_per_pixel=1,
            number_of_frames=1,
            bits_allocated=16,
            bits_stored=self.spec.bits_stored,
            pixel_representation=1 if self.spec.signed else 0,
            photometric_interpretation="MONOCHROME2",
        )
        # undefined length: items (offset table, one fragment) then the sequence delimiter
        return tag + b"OB\x00\x00\xff\xff\xff\xff" + encapsulate([frame]) + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"

    def write(self, path: Path, k: int, hu: np.ndarray) -> None:
        """Write slice ``k`` (0 = most superior) with pixel values ``hu`` (float HU)."""
        series = self.series
        z = float(series.z[k])
        sop = series.sop_uids[k]
        n = len(series.z)
        x0, y0 = self.spec.origin
        dyn = [
            DataElement(0x00080018, "UI", sop),
            DataElement(0x00200013, "IS", k + 1 if series.instance_ascending else n - k),
            DataElement(0x00200032, "DS", [f"{x0:.3f}", f"{y0:.3f}", f"{z:.3f}"]),
            DataElement(0x00201041, "DS", f"{z:.3f}"),
        ]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = self.transfer
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = _IMPLEMENTATION_VERSION
        fp = DicomBytesIO()
        fp.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fp, meta, enforce_standard=True)
        fp.is_little_endian = True
        fp.is_implicit_VR = False
        for chunk, elem in zip(self._chunks, dyn):
            fp.write(chunk)
            write_data_element(fp, elem)
        fp.write(self._chunks[-1])
        fp.write(self._pixel_element(hu_to_stored(hu, self.spec, self._outside)))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(fp.getvalue())


def write_ct_slice(path: Path, spec: StudySpec, series: SeriesSpec, k: int, hu: np.ndarray) -> None:
    """Write slice ``k`` (0 = most superior) of ``series`` (one-off; use :class:`CTSeriesWriter` in loops)."""
    CTSeriesWriter(spec, series).write(path, k, hu)


def write_localizer(path: Path, spec: StudySpec, k: int, image: np.ndarray, lateral: bool, top_z: float, dz: float) -> None:
    """Write localizer image ``k`` (projection values 0-4095, rows superior to inferior)."""
    sop = _uid("localizer-image", spec.seed, spec.index, k)
    ds = _base(spec, CTImageStorage, sop, "CT", ExplicitVRLittleEndian)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SeriesDescription = "TOPOGRAM LAT" if lateral else "TOPOGRAM AP"
    ds.KVP = "120"
    ds.PatientPosition = spec.patient_position
    ds.SeriesInstanceUID = spec.localizer_series_uid
    ds.SeriesNumber = 1
    ds.InstanceNumber = k + 1
    x0, y0 = spec.origin
    if lateral:
        ds.ImagePositionPatient = [f"{spec.center_x:.3f}", f"{y0:.3f}", f"{top_z:.3f}"]
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    else:
        ds.ImagePositionPatient = [f"{x0:.3f}", f"{spec.center_y:.3f}", f"{top_z:.3f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.FrameOfReferenceUID = spec.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(image.shape[0]), int(image.shape[1])
    ds.PixelSpacing = [f"{dz:.6f}".rstrip("0"), f"{spec.pixel_spacing:.6f}".rstrip("0")]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "2048"
    ds.WindowWidth = "4096"
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.PixelData = np.clip(image, 0, 4095).astype(np.uint16).tobytes()
    _save(ds, path)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _num(concept: Dataset, value: float, unit: Dataset) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "NUM"
    item.ConceptNameCodeSequence = Sequence([concept])
    measured = Dataset()
    measured.NumericValue = f"{value:.2f}"
    measured.MeasurementUnitsCodeSequence = Sequence([unit])
    item.MeasuredValueSequence = Sequence([measured])
    return item


def write_dose_report(path: Path, spec: StudySpec, ctdi_vol: float, dlp: float) -> None:
    """Write an X-Ray Radiation Dose SR (TID 10011 outline: accumulated DLP and CTDIvol)."""
    sop = _uid("dose-report", spec.seed, spec.index)
    ds = _base(spec, DOSE_SR_STORAGE, sop, "SR", ExplicitVRLittleEndian)
    ds.SeriesDescription = "Dose Report"
    ds.SeriesInstanceUID = spec.dose_series_uid
    ds.SeriesNumber = 999
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([_code("113701", "DCM", "X-Ray Radiation Dose Report")])
    ds.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "10011"
    ds.ContentTemplateSequence = Sequence([template])
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    mgy_cm = _code("mGy.cm", "UCUM", "mGy.cm")
    mgy = _code("mGy", "UCUM", "mGy")
    ds.ContentSequence = Sequence([
        _num(_code("113813", "DCM", "CT Dose Length Product Total"), dlp, mgy_cm),
        _num(_code("113830", "DCM", "Mean CTDIvol"), ctdi_vol, mgy),
    ])
    _save(ds, path)
