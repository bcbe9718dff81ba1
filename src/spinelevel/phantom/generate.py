"""Write phantom studies as DICOM plus ``labels.parquet`` and ``vertebrae.parquet``.

Layout of ``OUT``::

    OUT/study_0000/<series folder>/<file>   opaque 8-hex names, no extensions, not in slice order
    OUT/labels.parquet                      one row per axial CT slice
    OUT/vertebrae.parquet                   one row per CT series and vertebra
    OUT/phantom.json                        the options and the counts

Studies are independent: study ``k`` draws from ``(seed, k)`` only, so any number of workers writes the
same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spinelevel.errors import OutputError
from spinelevel.phantom.anatomy import Anatomy, add_noise, noise_bank
from spinelevel.phantom.dicom import CTSeriesWriter, write_dose_report, write_localizer
from spinelevel.phantom.options import PhantomOptions, PhantomSummary
from spinelevel.phantom.spec import SeriesSpec, StudySpec, level_at, plan_study

__all__ = ["LABELS_SCHEMA", "VERTEBRAE_SCHEMA", "generate", "render_series"]

log = logging.getLogger(__name__)

LABELS_SCHEMA = pa.schema([
    ("study_uid", pa.string()),
    ("series_uid", pa.string()),
    ("sop_uid", pa.string()),
    ("level", pa.string()),
    ("z_mm", pa.float64()),
    ("slice_index", pa.int32()),
    ("path", pa.string()),
])
"""``labels.parquet``: the labels contract (DESIGN 3.3) plus z, order and the file's relative path."""

VERTEBRAE_SCHEMA = pa.schema([
    ("study_uid", pa.string()),
    ("series_uid", pa.string()),
    ("vertebra", pa.string()),
    ("level", pa.string()),
    ("top_z_mm", pa.float64()),
    ("bottom_z_mm", pa.float64()),
    ("variant", pa.string()),
    ("coverage", pa.string()),
    ("in_fov", pa.bool_()),
    ("n_slices", pa.int32()),
])
"""``vertebrae.parquet``: every vertebra of every CT series, whether or not the field of view holds it."""


@dataclass
class _StudyResult:
    labels: dict[str, list] = field(default_factory=lambda: {n: [] for n in LABELS_SCHEMA.names})
    vertebrae: dict[str, list] = field(default_factory=lambda: {n: [] for n in VERTEBRAE_SCHEMA.names})
    series: int = 0
    slices: int = 0
    files: int = 0


def _opaque(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8].upper()


def _series_rng(spec: StudySpec, series: SeriesSpec) -> np.random.Generator:
    return np.random.default_rng([spec.seed & 0xFFFFFFFF, spec.index, series.index, 7])


def _iter_series(spec: StudySpec, series: SeriesSpec, anatomy: Anatomy, noisy: bool = True) -> Iterator[np.ndarray]:
    rng = _series_rng(spec, series)
    bank = noise_bank(rng, spec.size) if noisy and series.noise_sigma > 0 else None
    # partial volume: a slice of thickness t averages the anatomy over t, not one plane (a rib,
    # a transverse process or the iliac crest fades in over the slices that cut its edge)
    offsets = (0.0,) if series.thickness < 1.5 else (-series.thickness / 3.0, 0.0, series.thickness / 3.0)
    for z in series.z:
        img = anatomy.render(float(z))
        if len(offsets) > 1:
            img = (img + anatomy.render(float(z) + offsets[0]) + anatomy.render(float(z) + offsets[2])) / np.float32(3.0)
        if noisy:
            img = add_noise(img, bank if bank is not None else np.zeros((1, spec.size, spec.size), np.float32), rng, series.noise_sigma)
        yield img


def render_series(spec: StudySpec, series: int = 0, noise: bool = True) -> np.ndarray:
    """HU volume (slices superior first, rows, columns), float32, of one series, without writing DICOM.

    Args:
        spec: The study plan (from :func:`spinelevel.phantom.plan_study`).
        series: Index into ``spec.series``.
        noise: Add the series' scanner noise and reconstruction blur, exactly as written to DICOM.
    """
    anatomy = Anatomy(spec)
    return np.stack(list(_iter_series(spec, spec.series[series], anatomy, noisy=noise)))


def _localizer(proj_ap: list[np.ndarray], proj_lat: list[np.ndarray], spec: StudySpec, series: SeriesSpec) -> tuple[list[np.ndarray], float]:
    dz = spec.pixel_spacing
    z = series.z
    n_rows = max(int((z[0] - z[-1]) / dz) + 1, 2)
    rows_z = z[0] - dz * np.arange(n_rows)
    images = []
    for proj in (np.stack(proj_ap), np.stack(proj_lat)):
        # resample along z (series z descends; np.interp wants ascending)
        cols = [np.interp(rows_z[::-1], z[::-1], proj[::-1, j])[::-1] for j in range(proj.shape[1])]
        img = np.stack(cols, axis=1)
        images.append(np.clip(img / max(float(img.max()), 1.0) * 3800.0, 0, 4095))
    return images, dz


def _write_study(options: PhantomOptions, index: int, out: Path, progress: Callable[[int], None] | None = None) -> _StudyResult:
    spec = plan_study(options, index)
    anatomy = Anatomy(spec)
    res = _StudyResult()
    study_dir = out / spec.folder
    proj_ap: list[np.ndarray] = []
    proj_lat: list[np.ndarray] = []
    for s_i, series in enumerate(spec.series):
        levels = level_at(spec.vertebrae, series.z)
        folder = study_dir / series.folder
        writer = CTSeriesWriter(spec, series)
        for k, img in enumerate(_iter_series(spec, series, anatomy, noisy=options.noise > 0)):
            path = folder / series.file_names[k]
            writer.write(path, k, img)
            if s_i == 0 and spec.localizer_images:
                mu = np.clip(img, -1000.0, None) + 1000.0
                proj_ap.append(mu.sum(axis=0) * spec.pixel_spacing / 1000.0)
                proj_lat.append(mu.sum(axis=1) * spec.pixel_spacing / 1000.0)
            lab = res.labels
            lab["study_uid"].append(spec.study_uid)
            lab["series_uid"].append(series.series_uid)
            lab["sop_uid"].append(series.sop_uids[k])
            lab["level"].append(levels[k])
            lab["z_mm"].append(float(series.z[k]))
            lab["slice_index"].append(k)
            lab["path"].append(path.relative_to(out).as_posix())
            if progress is not None:
                progress(1)
        res.series += 1
        res.slices += len(series.z)
        res.files += len(series.z)
        for vert in spec.vertebrae:
            inside = (series.z >= vert.bottom_z) & (series.z <= vert.top_z)
            vr = res.vertebrae
            vr["study_uid"].append(spec.study_uid)
            vr["series_uid"].append(series.series_uid)
            vr["vertebra"].append(vert.name)
            vr["level"].append(vert.level)
            vr["top_z_mm"].append(vert.top_z)
            vr["bottom_z_mm"].append(vert.bottom_z)
            vr["variant"].append(spec.variant)
            vr["coverage"].append(spec.coverage)
            vr["in_fov"].append(bool(inside.any()))
            vr["n_slices"].append(int(inside.sum()))
    if spec.localizer_images:
        images, dz = _localizer(proj_ap, proj_lat, spec, spec.series[0])
        loc_dir = study_dir / _opaque(spec.localizer_series_uid)
        for k in range(spec.localizer_images):
            lateral = k == 1
            write_localizer(loc_dir / _opaque(f"{spec.localizer_series_uid}.{k}"), spec, k, images[1 if lateral else 0], lateral, float(spec.series[0].z[0]), dz)
        res.series += 1
        res.files += spec.localizer_images
    if spec.dose_report:
        length_cm = (spec.series[0].z[0] - spec.series[0].z[-1]) / 10.0
        ctdi = 12.0 * (spec.ma / 250.0) * (spec.kvp / 120.0) ** 2.5
        write_dose_report(study_dir / _opaque(spec.dose_series_uid) / _opaque(spec.dose_series_uid + ".1"), spec, ctdi, ctdi * length_cm)
        res.series += 1
        res.files += 1
    return res


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; choose a new or empty output folder")
    if out.is_dir() and any(out.iterdir()):
        raise OutputError(f"{out}: folder is not empty; choose a new or empty output folder or remove it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the output folder ({exc.strerror})") from exc


def generate(
    out: Path,
    options: PhantomOptions,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> PhantomSummary:
    """Write ``options.studies`` phantom studies under ``out``.

    Args:
        out: A new or empty folder.
        options: What to generate; the same options give the same files.
        workers: Processes over studies (1: in this process). The result does not depend on it.
        progress: Called with the number of axial slices just written (per slice with one worker,
            per study with several).

    Returns:
        Counts and wall time.

    Raises:
        OutputError: If ``out`` is not a new or empty folder.
    """
    start = time.perf_counter()
    out = Path(out)
    _check_out(out)
    results: list[_StudyResult] = []
    if workers <= 1 or options.studies == 1:
        for i in range(options.studies):
            results.append(_write_study(options, i, out, progress))
    else:
        with ProcessPoolExecutor(max_workers=min(workers, options.studies)) as pool:
            futures = [pool.submit(_write_study, options, i, out) for i in range(options.studies)]
            for fut in futures:
                res = fut.result()
                results.append(res)
                if progress is not None:
                    progress(res.slices)
    labels = {n: [x for r in results for x in r.labels[n]] for n in LABELS_SCHEMA.names}
    verts = {n: [x for r in results for x in r.vertebrae[n]] for n in VERTEBRAE_SCHEMA.names}
    pq.write_table(pa.table(labels, schema=LABELS_SCHEMA), out / "labels.parquet")
    pq.write_table(pa.table(verts, schema=VERTEBRAE_SCHEMA), out / "vertebrae.parquet")
    summary = PhantomSummary(
        out=out,
        studies=options.studies,
        series=sum(r.series for r in results),
        slices=sum(r.slices for r in results),
        files=sum(r.files for r in results),
        seconds=time.perf_counter() - start,
    )
    record = {"options": asdict(options), "studies": summary.studies, "series": summary.series,
              "slices": summary.slices, "files": summary.files}
    (out / "phantom.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    log.info("phantom: %d studies, %d slices in %.1f s", summary.studies, summary.slices, summary.seconds)
    return summary
