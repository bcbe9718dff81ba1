"""Write small synthetic CT series as real DICOM files (pydicom), for the engine tests.

Each slice is uniform at a HU value that encodes its level (see ``LEVEL_HU``) plus seeded noise,
so the tiny ONNX model of ``modelgen`` can read the level back.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    UID,
    generate_uid,
)

CLASSES = ("T", "L1", "L2", "L3", "L4", "L5", "S")
# Slice HU per level: inside the soft-tissue window (40, 400) = [-160, 240], evenly spread.
LEVEL_HU = {c: -140.0 + 60.0 * i for i, c in enumerate(CLASSES)}

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian)
COMPRESSED = (RLELossless, JPEG2000Lossless, JPEGLSLossless, JPEG2000)
LOSSLESS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian, RLELossless, JPEG2000Lossless, JPEGLSLossless)


def level_sequence(counts: dict[str, int]) -> list[str]:
    """['T', 'T', 'L1', ...] from per-level slice counts, in anatomical order."""
    return [c for c in CLASSES for _ in range(counts.get(c, 0))]


@dataclass
class SeriesSpec:
    """A synthetic series."""

    levels: list[str]
    size: int = 64
    syntax: str = ExplicitVRLittleEndian
    spacing_mm: float = 5.0
    top_z: float = 100.0
    # Unsigned storage with intercept -1024 when False.
    signed: bool = True
    intercept: float = -1024.0
    slope: float = 1.0
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    modality: str = "CT"
    sop_class: str = CTImageStorage
    pixel_spacing: tuple[float, float] = (0.8, 0.8)
    noise_hu: float = 5.0
    patient_name: str = "DOE^JANE"
    patient_id: str = "PID-123456"
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    seed: int = 0


def make_slice_dataset(spec: SeriesSpec, index: int, hu: np.ndarray, position: tuple[float, float, float], sop_uid: str) -> Dataset:
    """One CT Image Storage dataset, stored with ``spec.syntax``."""
    stored = np.round((hu - spec.intercept) / spec.slope)
    if spec.signed:
        stored = np.clip(stored, -32768, 32767).astype(np.int16)
    else:
        stored = np.clip(stored, 0, 65535).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = spec.sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = spec.sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = spec.series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[spec.study_uid])
    ds.Modality = spec.modality
    ds.ImageType = list(spec.image_type)
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = "19400101"
    ds.AccessionNumber = "ACC-998877"
    ds.InstanceNumber = len(spec.levels) - index  # deliberately reversed: must not be trusted
    ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in spec.orientation]
    ds.PixelSpacing = [str(v) for v in spec.pixel_spacing]
    ds.SliceThickness = str(spec.spacing_mm)
    ds.RescaleIntercept = str(spec.intercept)
    ds.RescaleSlope = str(spec.slope)
    ds.RescaleType = "HU"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if spec.signed else 0
    ds.PixelData = stored.tobytes()
    syntax = UID(spec.syntax)
    if syntax.is_compressed:
        kwargs = {}
        if syntax == JPEG2000:
            kwargs = {"j2k_cr": [5]}
        ds.compress(syntax, stored, **kwargs)
    elif syntax == ExplicitVRBigEndian:
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = stored.astype(stored.dtype.newbyteorder(">")).tobytes()
    else:
        ds.file_meta.TransferSyntaxUID = syntax
    return ds


def slice_hu(spec: SeriesSpec, index: int) -> np.ndarray:
    rng = np.random.default_rng([spec.seed, index])
    base = LEVEL_HU[spec.levels[index]]
    hu = base + rng.normal(0.0, spec.noise_hu, (spec.size, spec.size))
    return np.round(hu).astype(np.float32)


def write_series(root: Path, spec: SeriesSpec, nested: bool = True, rng: random.Random | None = None) -> list[Path]:
    """Write the series with opaque, shuffled file names without extensions; returns the paths."""
    rng = rng or random.Random(spec.series_uid)
    row = np.asarray(spec.orientation[:3])
    col = np.asarray(spec.orientation[3:])
    normal = np.cross(row, col)
    paths = []
    for i in range(len(spec.levels)):
        # position moves inferior (decreasing z) along the normal
        position = tuple(np.asarray([0.0, 0.0, spec.top_z]) - normal * (spec.spacing_mm * i) * np.sign(normal[2] or 1.0))
        ds = make_slice_dataset(spec, i, slice_hu(spec, i), position, generate_uid())
        sub = root / f"d{rng.randrange(3)}" / f"e{rng.randrange(2)}" if nested else root
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"{rng.getrandbits(48):012x}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def syntax_is_deflated(uid: str) -> bool:
    return uid == DeflatedExplicitVRLittleEndian


def write_localizer(root: Path, study_uid: str, name: str = "scout") -> Path:
    spec = SeriesSpec(levels=["T"], image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), study_uid=study_uid, orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
    ds = make_slice_dataset(spec, 0, slice_hu(spec, 0), (0.0, 0.0, 0.0), generate_uid())
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    ds.save_as(path, enforce_file_format=True)
    return path


def write_sr(root: Path, study_uid: str, name: str = "dose") -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientName = "DOE^JANE"
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    ds.save_as(path, enforce_file_format=True)
    return path


def read_back_hu(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
