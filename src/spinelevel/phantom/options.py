"""What the phantom generator is asked to make (:class:`PhantomOptions`) and what it made."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from spinelevel.errors import InputError

__all__ = [
    "COMPRESSIONS",
    "CONTRASTS",
    "COVERAGES",
    "VARIANTS",
    "PhantomOptions",
    "PhantomSummary",
]

COMPRESSIONS: tuple[str, ...] = ("none", "rle", "jpeg2000", "jpegls", "mixed")
"""Pixel-data encodings: uncompressed, RLE, JPEG 2000 and JPEG-LS (all lossless), or one per series."""

COVERAGES: tuple[str, ...] = ("chest_abdomen_pelvis", "abdomen_pelvis", "abdomen", "lumbar", "partial")
"""Fields of view along z; ``partial`` misses L3 (a chest that stops above it or a pelvis below it)."""

CONTRASTS: tuple[str, ...] = ("none", "arterial", "portal_venous", "delayed")
"""Intravenous contrast phases."""

VARIANTS: tuple[str, ...] = ("six_lumbar", "sacralised_L5")
"""Rare lumbosacral variants, marked in ``vertebrae.parquet``."""


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"phantom option {name}={value!r} is not one of {', '.join(choices)}")


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise InputError(f"phantom option {name}={value!r} must be a probability between 0 and 1")


@dataclass(frozen=True)
class PhantomOptions:
    """Everything that decides a set of phantom studies; the same options always give the same files.

    Each study draws its own random numbers from ``(seed, study index)``, so study ``k`` is the same
    whatever ``studies`` or the number of workers.
    """

    studies: int = 1  # number of studies to write
    seed: int = 0  # root of every random choice
    size: int = 512  # rows = columns of every axial image (64-1024)
    compression: str = "none"  # one of COMPRESSIONS; 'mixed' picks one per series from the seed
    coverage: str = "random"  # one of COVERAGES, or 'random' (weighted draw per study)
    contrast: str = "random"  # one of CONTRASTS, or 'random'
    thickness_mm: float | None = None  # slice thickness for the primary series; None draws 0.625-5 mm
    spacing_mm: float | None = None  # spacing between slices; None: drawn, or = thickness_mm if given
    second_thickness_mm: float | None = None  # thickness of the second reconstruction; None: drawn
    fov_mm: float | None = None  # reconstruction diameter; None draws 300-500 mm from patient size
    variant: str = "random"  # 'random' (with variant_probability), 'none', or one of VARIANTS
    variant_probability: float = 0.05  # chance of a variant when variant='random'
    localizer_probability: float = 0.3  # chance that a study holds a localizer series (1-3 images)
    dose_report_probability: float = 0.3  # chance that a study holds an X-ray radiation dose SR
    second_recon_probability: float = 0.25  # chance of a second reconstruction (thin <-> thick)
    padding_probability: float = 0.3  # chance that pixels outside the reconstruction circle are padding
    noise: float = 1.0  # scale of scanner noise (0 gives clean images)
    # How loosely organs sit on the spine, 0..1 (issue 14: a model trained on 0 read the level off the
    # kidneys and the iliac crest). 0 keeps the narrow ranges every earlier set was written with; 1 draws
    # kidney tops at T12's centre -40..+25 mm (not +-10), the liver's lower edge from 30 mm above to
    # 60 mm below L2's lower end plate (not 10 above to 25 below), lung bases and diaphragm domes +-25 mm
    # (not +-10) and the iliac crest from L3's lower end plate to the middle of the last lumbar vertebra
    # (not from the middle of the second-last to the upper third of the last); in between, linearly.
    # The random draws are the same whatever its value, so a seed keeps its patients.
    organ_spread: float = 0.0

    def __post_init__(self) -> None:
        if self.studies < 1:
            raise InputError(f"phantom option studies={self.studies} must be at least 1")
        if not 64 <= self.size <= 1024:
            raise InputError(f"phantom option size={self.size} must be between 64 and 1024 pixels")
        _check_choice("compression", self.compression, COMPRESSIONS)
        _check_choice("coverage", self.coverage, ("random", *COVERAGES))
        _check_choice("contrast", self.contrast, ("random", *CONTRASTS))
        _check_choice("variant", self.variant, ("random", "none", *VARIANTS))
        for name in (
            "variant_probability",
            "localizer_probability",
            "dose_report_probability",
            "second_recon_probability",
            "padding_probability",
        ):
            _check_probability(name, getattr(self, name))
        if self.thickness_mm is not None and not 0.5 <= self.thickness_mm <= 10.0:
            raise InputError(f"phantom option thickness_mm={self.thickness_mm} must be between 0.5 and 10 mm")
        if self.spacing_mm is not None and not 0.3 <= self.spacing_mm <= 10.0:
            raise InputError(f"phantom option spacing_mm={self.spacing_mm} must be between 0.3 and 10 mm")
        if self.second_thickness_mm is not None and not 0.5 <= self.second_thickness_mm <= 10.0:
            raise InputError(
                f"phantom option second_thickness_mm={self.second_thickness_mm} must be between 0.5 and 10 mm"
            )
        if self.fov_mm is not None and not 150.0 <= self.fov_mm <= 700.0:
            raise InputError(f"phantom option fov_mm={self.fov_mm} must be between 150 and 700 mm")
        if self.noise < 0:
            raise InputError(f"phantom option noise={self.noise} must not be negative")
        if not 0.0 <= self.organ_spread <= 1.0:
            raise InputError(f"phantom option organ_spread={self.organ_spread!r} must be between 0 and 1")


@dataclass(frozen=True)
class PhantomSummary:
    """What :func:`spinelevel.phantom.generate` wrote."""

    out: Path  # the output folder
    studies: int  # studies written
    series: int  # series written (CT axial, localizer and SR)
    slices: int  # CT axial slices written (the rows of labels.parquet)
    files: int  # DICOM files written
    seconds: float  # wall time of the whole run

    @property
    def slices_per_second(self) -> float:
        """Axial slices written per second of wall time."""
        return self.slices / self.seconds if self.seconds > 0 else float("inf")
