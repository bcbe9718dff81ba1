"""Random study plans: the spine, the patient, the scanner settings and the series of one study.

A :class:`StudySpec` is drawn once per study from ``(seed, study index)`` and holds every number the
renderer and the DICOM writer need, so rendering and writing are pure functions of it.

Geometry: patient coordinates are DICOM LPS (x to the patient's left, y posterior, z superior), so
z decreases going inferior. Vertebral end plates are horizontal, so a slice's level depends on its z
only: the level of a slice is the class of the vertebra whose body contains the slice centre, and
``None`` where the centre lies in an intervertebral disc.

Labelling rules (also written to ``vertebrae.parquet``):

* T1-T12 are ``T``; sacral segments S1-S5 and the coccyx are ``S``; slices below the coccyx tip (the
  lowest pelvis, femoral necks) are ``S`` as well, since the classes end with ``S``.
* ``six_lumbar``: vertebrae are counted from the top (T1-T12, then L1-L6). L1-L5 keep their labels; the
  sixth lumbar vertebra ``L6`` has level ``None`` (excluded like a disc), because none of the classes
  names it and calling it ``L5`` or ``S`` would teach a model a wrong count.
* ``sacralised_L5``: L5 is fused to the sacrum (rudimentary, ossified L5-S1 disc, broad transverse
  processes fused to the sacral alae); its body is still labelled ``L5``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydicom.uid import generate_uid

from spinelevel.levels import CLASSES
from spinelevel.phantom.options import COMPRESSIONS, CONTRASTS, COVERAGES, VARIANTS, PhantomOptions

__all__ = [
    "CLASSES",
    "SeriesSpec",
    "StudySpec",
    "Vertebra",
    "level_at",
    "plan_study",
]

# Mean body heights (mm) and the disc below each vertebra, adult; scaled per patient.
_THORACIC_HEIGHT = (14.0, 15.0, 16.0, 17.0, 17.5, 18.0, 19.0, 20.0, 20.5, 21.5, 23.0, 24.0)
_THORACIC_DISC = (4.0, 4.0, 4.0, 4.5, 4.5, 4.5, 5.0, 5.0, 5.5, 5.5, 6.0, 7.0)
_LUMBAR_HEIGHT = (25.0, 26.0, 27.0, 27.5, 26.5, 26.0)
_LUMBAR_DISC = (8.0, 9.0, 10.0, 11.0, 10.5, 10.0)
_SACRAL_HEIGHT = (28.0, 24.0, 20.0, 16.0, 12.0)
_COCCYX_HEIGHT = 25.0

# (thickness, spacing, weight): the reconstructions an archive holds.
_RECONS = (
    (5.0, 5.0, 0.20), (3.0, 3.0, 0.12), (3.0, 2.0, 0.06), (2.5, 2.5, 0.12), (2.0, 2.0, 0.10),
    (2.0, 1.0, 0.05), (1.5, 1.5, 0.05), (1.25, 1.25, 0.08), (1.25, 0.625, 0.07), (1.0, 1.0, 0.07),
    (1.0, 0.7, 0.03), (0.625, 0.625, 0.05),
)
_COVERAGE_WEIGHTS = (0.35, 0.25, 0.12, 0.13, 0.15)
_CONTRAST_WEIGHTS = (0.3, 0.2, 0.4, 0.1)


@dataclass(frozen=True)
class Vertebra:
    """One vertebra (or sacral segment, or the coccyx) along z."""

    name: str  # 'T1'..'T12', 'L1'..'L6', 'S1'..'S5', 'Co'
    level: str | None  # its class, or None for an excluded vertebra (L6)
    kind: str  # 'thoracic', 'lumbar', 'sacral' or 'coccyx'
    number: int  # 1-based number within its kind
    top_z: float  # superior end plate (mm, patient z)
    bottom_z: float  # inferior end plate (mm)
    half_width: float  # body semi-axis along x (mm)
    half_depth: float  # body semi-axis along y (mm)

    @property
    def height(self) -> float:
        """Body height in mm."""
        return self.top_z - self.bottom_z


@dataclass(frozen=True, eq=False)
class SeriesSpec:
    """One axial CT series (a reconstruction) of a study."""

    index: int  # series number within the study (1-based)
    role: str  # 'primary' or 'second_recon'
    series_uid: str  # SeriesInstanceUID
    folder: str  # opaque folder name
    description: str  # SeriesDescription
    thickness: float  # SliceThickness (mm)
    spacing: float  # SpacingBetweenSlices (mm)
    kernel: str  # ConvolutionKernel
    compression: str  # one of COMPRESSIONS except 'mixed'
    z: np.ndarray  # slice centre z (mm), superior first, float64
    sop_uids: tuple[str, ...]  # SOPInstanceUID per slice, same order as z
    file_names: tuple[str, ...]  # opaque file name per slice, same order as z
    instance_ascending: bool  # InstanceNumber 1 at the top slice (else at the bottom)
    noise_sigma: float  # scanner noise standard deviation in HU (soft tissue)


@dataclass(frozen=True, eq=False)
class StudySpec:
    """Everything that decides one phantom study."""

    index: int  # study index within the run
    seed: int  # the run's seed
    folder: str  # study folder name
    study_uid: str  # StudyInstanceUID
    frame_uid: str  # FrameOfReferenceUID shared by all series
    patient_name: str  # fake, distinctive: PHANTOM^<n>
    patient_id: str  # fake, distinctive: PH<seed>-<n>
    patient_birth_date: str  # YYYYMMDD
    patient_sex: str  # 'M' or 'F'
    study_date: str  # YYYYMMDD
    study_time: str  # HHMMSS
    accession: str  # AccessionNumber
    vertebrae: tuple[Vertebra, ...]  # superior to inferior, T1 .. Co
    variant: str | None  # None or one of VARIANTS
    coverage: str  # one of COVERAGES
    contrast: str  # one of CONTRASTS
    oral_contrast: bool  # positive oral contrast in the bowel
    size: int  # rows = columns
    fov: float  # reconstruction diameter (mm)
    center_x: float  # reconstruction centre x (mm)
    center_y: float  # reconstruction centre y (mm)
    table_y: float  # y of the table top (mm); the patient's back rests on it
    body_x: float  # x of the body midline (mm)
    rotation_deg: float  # small rotation of the patient about z
    half_width: float  # abdominal body semi-axis along x (mm), at L3
    half_depth: float  # abdominal body semi-axis along y (mm), at L3
    chest_scale: float  # chest width relative to abdomen
    hip_scale: float  # hip width relative to abdomen
    fat_mm: float  # subcutaneous fat thickness at the abdomen (mm)
    muscle_mm: float  # abdominal wall muscle thickness (mm)
    muscle_scale: float  # size of psoas and paraspinal muscles relative to average
    bone_hu: float  # cancellous bone density (HU)
    scoliosis_mm: float  # amplitude of a gentle lateral curve (mm)
    iliac_crest_z: float  # top of the iliac wings (mm)
    femoral_head_z: float  # centre of the femoral heads (mm)
    kvp: float  # KVP
    ma: float  # tube current (mA)
    patient_position: str  # 'HFS' or 'FFS'
    rescale_intercept: float  # -1024 or -8192
    signed: bool  # PixelRepresentation 1
    bits_stored: int  # 12 or 16
    padding: bool  # pixels outside the reconstruction circle hold PixelPaddingValue
    anatomy_seed: int  # seed of the procedural details (bowel loops, vessels)
    wall_back: float  # abdominal wall muscle (rectus, obliques) reaches back to v = wall_back * b (-1..1)
    cortex_hu: float  # cortical bone HU (partial volume of a thin shell varies with scanner and patient)
    ilium_mm: float  # iliac blade half-thickness (mm); the posterior ilium is about 2.5x thicker
    bowel_loops: int  # extra small-bowel loops (besides the 55 of every study)
    bowel_gas: float  # chance that a loop holds gas; the colon's stool is mottled with gas bubbles
    table_curved: bool  # curved (cradle) table top instead of a flat one
    real_seed: int  # seed of the realism details (extra loops, stool bubbles)
    colon_drop: float  # how far the transverse colon hangs: 0 at L2, 1 at L5 (it sags into the pelvis in many adults)
    colon_content: str  # transverse colon content: 'stool', 'air' or 'fluid'
    body_scale: float  # factor on the drawn abdominal width (half_width holds the product): real abdomens are wider
    ilium_blade_mm: float  # half-thickness (mm) of the thin middle of the iliac blade (two cortical tables)
    ilium_cortex_mm: float  # thickness (mm) of the iliac cortex (the inner and outer tables)
    ilium_marrow_hu: float  # HU between the iliac tables (fatty marrow: darker than the vertebral bodies)
    paraspinal_fat: float  # fatty infiltration of the paraspinal muscles at the lumbosacral junction (0..1)
    real2_seed: int  # seed of the second realism round's details (paraspinal fat streaks)
    series: tuple[SeriesSpec, ...]  # axial CT series
    localizer_images: int  # 0 (none) to 3 localizer images
    localizer_series_uid: str  # SeriesInstanceUID of the localizer series
    dose_report: bool  # write an X-ray radiation dose SR
    dose_series_uid: str  # SeriesInstanceUID of the dose report
    organ_spread: float = 0.0  # PhantomOptions.organ_spread: how loosely kidneys, liver, lung bases and crest sit on the spine

    def vertebra(self, name: str) -> Vertebra:
        """The vertebra called ``name`` ('L3', 'S1', ...)."""
        for v in self.vertebrae:
            if v.name == name:
                return v
        raise KeyError(name)

    @property
    def pixel_spacing(self) -> float:
        """In-plane pixel spacing (mm)."""
        return self.fov / self.size

    @property
    def origin(self) -> tuple[float, float]:
        """(x, y) of the centre of the first (top-left) pixel."""
        half = self.fov / 2 - self.pixel_spacing / 2
        return self.center_x - half, self.center_y - half

    @property
    def padding_value(self) -> int:
        """Stored PixelPaddingValue."""
        return -2000 if self.signed else 0


def level_at(vertebrae: tuple[Vertebra, ...], z: np.ndarray | float) -> list[str | None]:
    """The level of slices whose centres are at ``z``: the vertebra body containing z, None in discs.

    Slices above T1 are ``T`` and below the coccyx tip ``S`` (the generator never covers above T1).
    """
    zs = np.atleast_1d(np.asarray(z, dtype=np.float64))
    out: list[str | None] = []
    for zi in zs:
        level: str | None = None
        if zi > vertebrae[0].top_z:
            level = "T"
        elif zi < vertebrae[-1].bottom_z:
            level = "S"
        else:
            for v in vertebrae:
                if v.bottom_z <= zi <= v.top_z:
                    level = v.level
                    break
        out.append(level)
    return out


def _uid(*parts: object) -> str:
    # pydicom hashes the concatenation of the entropy sources, so the parts are joined with a
    # separator: without it ("sop", 2000, 2, 0, 138) and ("sop", 2000, 20, 1, 38) gave one UID.
    return generate_uid(entropy_srcs=["spinelevel.phantom/" + "/".join(str(p) for p in parts)])


def _opaque_names(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        for value in rng.integers(0, 2**32, size=n - len(names) + 4, dtype=np.uint64):
            name = f"{int(value):08X}"
            if name not in taken:
                taken.add(name)
                names.append(name)
                if len(names) == n:
                    break
    return names


def _spine(rng: np.random.Generator, variant: str | None, top_z: float) -> tuple[Vertebra, ...]:
    scale = rng.uniform(0.9, 1.1)
    n_lumbar = 6 if variant == "six_lumbar" else 5
    rows: list[tuple[str, str | None, str, int, float, float, float, float]] = []
    for i in range(12):
        rows.append((f"T{i + 1}", "T", "thoracic", i + 1, _THORACIC_HEIGHT[i], _THORACIC_DISC[i],
                     14.0 + 8.0 * i / 11, 9.0 + 5.5 * i / 11))
    for i in range(n_lumbar):
        j = min(i, 4)
        level = CLASSES[1 + i] if i < 5 else None
        disc = _LUMBAR_DISC[i] if i < n_lumbar - 1 else 10.0
        if variant == "sacralised_L5" and i == 4:
            disc = 2.0
        rows.append((f"L{i + 1}", level, "lumbar", i + 1, _LUMBAR_HEIGHT[i], disc, 23.0 + j, 15.0 + 0.5 * j))
    for i in range(5):
        rows.append((f"S{i + 1}", "S", "sacral", i + 1, _SACRAL_HEIGHT[i], 0.0, 24.0 - 3.5 * i, 14.0 - 1.8 * i))
    rows.append(("Co", "S", "coccyx", 1, _COCCYX_HEIGHT, 0.0, 7.0, 5.0))
    z = top_z
    out = []
    size = rng.uniform(0.92, 1.08)
    for name, level, kind, number, height, disc, w, d in rows:
        h = round(height * scale * rng.uniform(0.96, 1.04), 2)
        out.append(Vertebra(name, level, kind, number, round(z, 2), round(z - h, 2),
                            w * size, d * size))
        z -= h + round(disc * scale * rng.uniform(0.9, 1.1), 2) if disc else h
    return tuple(out)


def _z_range(rng: np.random.Generator, coverage: str, spine: tuple[Vertebra, ...]) -> tuple[float, float]:
    v = {s.name: s for s in spine}
    lowest = spine[-1].bottom_z - rng.uniform(20.0, 60.0)
    upper_abdomen = v["T10"].top_z + rng.uniform(0.0, 1.0) * (v["T9"].top_z - v["T10"].top_z)
    if coverage == "chest_abdomen_pelvis":
        return v["T1"].top_z - rng.uniform(0.5, 5.0), lowest
    if coverage == "abdomen_pelvis":
        return upper_abdomen, lowest
    if coverage == "abdomen":
        l5 = [s for s in spine if s.kind == "lumbar"][-1]
        return upper_abdomen, l5.bottom_z - rng.uniform(-15.0, 30.0)
    if coverage == "lumbar":
        return v["T12"].top_z - rng.uniform(0.0, 0.9) * v["T12"].height, v["S2"].bottom_z - rng.uniform(0.0, 20.0)
    # partial: a field that misses L3, either a chest that stops in L1-L2 or a pelvis from L4 down
    if rng.random() < 0.5:
        return v["T1"].top_z - rng.uniform(0.5, 5.0), v["L2"].top_z - rng.uniform(0.1, 0.9) * v["L2"].height
    return v["L4"].top_z - rng.uniform(0.1, 0.8) * v["L4"].height, lowest


def _positions(top: float, bottom: float, spacing: float) -> np.ndarray:
    n = int(math.floor((top - bottom) / spacing + 1e-6)) + 1
    return np.round(top - spacing * np.arange(n, dtype=np.float64), 3)


def _weighted(rng: np.random.Generator, items: tuple, weights: tuple[float, ...]):
    p = np.asarray(weights, dtype=np.float64)
    return items[int(rng.choice(len(items), p=p / p.sum()))]


def plan_study(options: PhantomOptions, index: int) -> StudySpec:
    """Draw study ``index`` of a run; a pure function of ``(options, index)``.

    Args:
        options: The run's options (seed, size, coverage, extras, ...).
        index: The study index, 0-based.

    Returns:
        The complete plan of the study.
    """
    seq = np.random.SeedSequence([options.seed & 0xFFFFFFFF, options.seed >> 32 & 0xFFFFFFFF, index, 20240603])
    # spawn(5) gives the same first four children as spawn(4): the fifth (realism details added for
    # real CT) leaves every earlier draw of a seed as it was; so does the sixth (the second round of
    # realism details, issue 14 follow-up: thin iliac blades, body size, paraspinal fat)
    anatomy_seq, scan_seq, extras_seq, names_seq, real_seq, real2_seq = seq.spawn(6)
    rng = np.random.default_rng(anatomy_seq)
    scan = np.random.default_rng(scan_seq)
    extras = np.random.default_rng(extras_seq)
    names = np.random.default_rng(names_seq)
    real = np.random.default_rng(real_seq)
    real2 = np.random.default_rng(real2_seq)
    key = (options.seed, index)

    if options.variant == "random":
        variant = str(extras.choice(VARIANTS)) if extras.random() < options.variant_probability else None
    else:
        variant = None if options.variant == "none" else options.variant
    spine = _spine(rng, variant, top_z=round(float(rng.uniform(-150.0, 250.0)), 2))
    v = {s.name: s for s in spine}

    # Real abdomens are wider than the first phantoms (the whole-trunk real case is 350 mm wide at L3,
    # about the top of the old 250-370 mm range): a factor from the second realism stream widens the
    # range to about 240-430 mm (mean about 330 mm), leaving the anatomy stream's draws as they were.
    body_scale = float(real2.uniform(0.95, 1.18))
    half_width = float(rng.uniform(125.0, 185.0)) * body_scale
    fat_mm = float(np.clip(rng.gamma(3.0, 6.0) + 4.0 + (half_width - 125.0) * 0.35, 4.0, 75.0))
    half_depth = float(half_width * rng.uniform(0.6, 0.8) + 0.25 * fat_mm)
    # The intercristal line lies at the L4 body or the L4/L5 disc in most adults, at L5 in some: the
    # crest is drawn between the middle of L4 and the upper third of L5 (one uniform draw, as before).
    # organ_spread widens the range towards L3's lower end plate and the middle of L5, same draw.
    lum = [s for s in spine if s.kind == "lumbar"]
    spread = options.organ_spread
    crest_hi = lum[-2].bottom_z + 0.5 * lum[-2].height
    crest_lo = lum[-1].top_z - 0.3 * lum[-1].height
    if spread > 0.0:
        crest_hi += spread * (lum[-3].bottom_z - crest_hi)
        crest_lo += spread * (lum[-1].top_z - 0.5 * lum[-1].height - crest_lo)
    iliac_crest = crest_lo + float(rng.uniform(0.0, 1.0)) * (crest_hi - crest_lo)
    femoral_head = spine[-1].bottom_z + float(rng.uniform(-12.0, 8.0))

    coverage = options.coverage if options.coverage != "random" else _weighted(scan, COVERAGES, _COVERAGE_WEIGHTS)
    contrast = options.contrast if options.contrast != "random" else _weighted(scan, CONTRASTS, _CONTRAST_WEIGHTS)
    top, bottom = _z_range(scan, coverage, spine)
    width_needed = 2.0 * half_width * max(1.0, 1.12)
    fov = options.fov_mm or float(np.clip(round(width_needed * scan.uniform(1.0, 1.25) / 10.0) * 10.0, 300.0, 500.0))
    if options.thickness_mm is not None:
        thickness = float(options.thickness_mm)
        spacing = float(options.spacing_mm or thickness)
    else:
        t, s, _ = _weighted(scan, _RECONS, tuple(r[2] for r in _RECONS))
        thickness, spacing = float(t), float(options.spacing_mm or s)
    rescale_intercept = -1024.0 if scan.random() < 0.75 else -8192.0
    signed = bool(scan.random() < 0.5)
    bits_stored = 12 if (not signed and rescale_intercept == -1024.0) else 16
    kvp = float(_weighted(scan, (100.0, 120.0, 140.0), (0.3, 0.6, 0.1)))
    ma = float(round(scan.uniform(120.0, 450.0)))
    base_sigma = 9.0 * (half_width / 150.0) ** 1.5 * (120.0 / kvp) ** 0.5 * (250.0 / ma) ** 0.5 * options.noise

    recons = [("primary", thickness, spacing)]
    if extras.random() < options.second_recon_probability:
        if options.second_thickness_mm is not None:
            t2 = float(options.second_thickness_mm)
        elif thickness >= 2.0:
            t2 = float(extras.choice((0.625, 1.0, 1.25)))
        else:
            t2 = float(extras.choice((3.0, 5.0)))
        recons.append(("second_recon", t2, t2))
    compressions = [c for c in COMPRESSIONS if c != "mixed"]
    taken: set[str] = set()
    series: list[SeriesSpec] = []
    for i, (role, t, s) in enumerate(recons):
        z = _positions(top, bottom, s)
        comp = options.compression if options.compression != "mixed" else str(extras.choice(compressions))
        kernel = "STANDARD" if role == "primary" else str(extras.choice(("STANDARD", "SOFT", "B30f")))
        series.append(SeriesSpec(
            index=i + 2,
            role=role,
            series_uid=_uid("series", *key, i),
            folder=_opaque_names(names, 1, taken)[0],
            description=f"{'AXIAL' if role == 'primary' else 'RECON 2'} {t:g}mm {kernel}",
            thickness=t,
            spacing=s,
            kernel=kernel,
            compression=comp,
            z=z,
            sop_uids=tuple(_uid("sop", *key, i, k) for k in range(len(z))),
            file_names=tuple(_opaque_names(names, len(z), set())),
            instance_ascending=bool(scan.random() < 0.8),
            noise_sigma=base_sigma * math.sqrt(2.5 / t),
        ))
    localizer_images = int(extras.integers(1, 4)) if extras.random() < options.localizer_probability else 0
    dose_report = bool(extras.random() < options.dose_report_probability)

    table_y = float(half_depth + scan.uniform(20.0, 60.0))
    year = int(scan.integers(2008, 2025))
    birth_year = year - int(rng.integers(25, 90))
    return StudySpec(
        index=index,
        seed=options.seed,
        folder=f"study_{index:04d}",
        study_uid=_uid("study", *key),
        frame_uid=_uid("frame", *key),
        patient_name=f"PHANTOM^{index}",
        patient_id=f"PH{options.seed}-{index}",
        patient_birth_date=f"{birth_year:04d}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
        patient_sex="M" if rng.random() < 0.5 else "F",
        study_date=f"{year:04d}{int(scan.integers(1, 13)):02d}{int(scan.integers(1, 29)):02d}",
        study_time=f"{int(scan.integers(7, 20)):02d}{int(scan.integers(0, 60)):02d}{int(scan.integers(0, 60)):02d}",
        accession=f"PHA{options.seed % 100000:05d}{index:05d}",
        vertebrae=spine,
        variant=variant,
        coverage=coverage,
        contrast=contrast,
        oral_contrast=bool(scan.random() < 0.3),
        size=options.size,
        fov=float(fov),
        center_x=float(scan.uniform(-15.0, 15.0)),
        center_y=float(table_y - half_depth * 1.05 + scan.uniform(-15.0, 15.0)),
        table_y=table_y,
        body_x=float(scan.uniform(-20.0, 20.0)),
        rotation_deg=float(scan.uniform(-5.0, 5.0)),
        half_width=half_width,
        half_depth=half_depth,
        chest_scale=float(rng.uniform(0.95, 1.12)),
        hip_scale=float(rng.uniform(1.02, 1.18)),
        fat_mm=fat_mm,
        muscle_mm=float(rng.uniform(7.0, 14.0)),
        muscle_scale=float(rng.uniform(0.75, 1.25)),
        bone_hu=float(rng.uniform(110.0, 280.0)),
        scoliosis_mm=float(rng.uniform(-6.0, 6.0)),
        iliac_crest_z=iliac_crest,
        femoral_head_z=femoral_head,
        kvp=kvp,
        ma=ma,
        patient_position="HFS" if scan.random() < 0.6 else "FFS",
        rescale_intercept=rescale_intercept,
        signed=signed,
        bits_stored=bits_stored,
        padding=bool(scan.random() < options.padding_probability),
        anatomy_seed=int(rng.integers(0, 2**31)),
        wall_back=float(real.uniform(-0.1, 0.45)),
        cortex_hu=float(real.uniform(500.0, 900.0)),
        ilium_mm=float(real.uniform(2.2, 3.6)),
        bowel_loops=int(real.integers(0, 60)),
        bowel_gas=float(real.uniform(0.05, 0.5)),
        table_curved=bool(real.random() < 0.5),
        real_seed=int(real.integers(0, 2**31)),
        colon_drop=float(real.uniform(0.0, 1.0) ** 1.5),
        colon_content=str(real.choice(("stool", "stool", "air", "fluid"))),
        body_scale=body_scale,
        ilium_blade_mm=float(real2.uniform(1.0, 2.2)),
        ilium_cortex_mm=float(real2.uniform(0.8, 1.5)),
        ilium_marrow_hu=float(real2.uniform(20.0, 200.0)),
        paraspinal_fat=float(real2.uniform(0.0, 1.0) ** 1.3),
        real2_seed=int(real2.integers(0, 2**31)),
        series=tuple(series),
        localizer_images=localizer_images,
        localizer_series_uid=_uid("localizer", *key),
        dose_report=dose_report,
        dose_series_uid=_uid("dose", *key),
        organ_spread=float(options.organ_spread),
    )
