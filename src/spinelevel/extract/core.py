"""Write an extract: DICOM copies, KOS documents, PNG previews, the manifest and the skipped table.

Layout of ``DIR``::

    manifest.parquet                         one row per copied instance (MANIFEST_SCHEMA)
    skipped.parquet                          what was not extracted, and why (SKIPPED_SCHEMA)
    <study_uid>/<series_uid>/<level>_<offset:+d>.dcm   byte-for-byte copies (offset 0: the pick)
    <study_uid>/<series_uid>/<level>_+0.png            preview of each pick
    <study_uid>/<series_uid>/kos.dcm                   Key Object Selection of the series' picks

Every file is written under a temporary dot-name, fsynced and renamed, so an interrupted extract
leaves no partial file under a final name (dot-names left by a killed extract are removed by the
next). A file that already holds the right bytes is left alone, so extracting again writes nothing
new and produces the same files and manifest. Files that an earlier manifest of ``DIR`` named and
the new one does not (a level or neighbour no longer asked for) are removed after the new manifest is
in place; nothing else in ``DIR`` is touched.

Each source is read once, and its SOP Instance UID compared with the run's before its bytes (the
same bytes) are written: a file replaced or removed since the run is skipped with the reason,
never copied silently.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from spinelevel import __version__
from spinelevel.engine.sources import Source, read_source
from spinelevel.engine.state import OutputLock, fsync_dir
from spinelevel.errors import DecodeError, OutputError
from spinelevel.report.rundata import EXTRACT_MANIFEST as MANIFEST_NAME
from spinelevel.report.rundata import EXTRACTED_RECORD
from spinelevel.extract.plan import DOUBT_FLAGS, PICK_DEFINITION, ExtractOptions, Pick, RunPlan, SeriesPlan, Skip, kos_title_code, plan_extraction

__all__ = [
    "ExtractProgress",
    "ExtractSummary",
    "extract_run",
    "prepare_extract_dir",
    "manifest_schema",
    "skipped_schema",
    "MANIFEST_NAME",
    "SKIPPED_NAME",
    "EXTRACTED_RECORD",
]

log = logging.getLogger(__name__)

SKIPPED_NAME = "skipped.parquet"
_META_KEY = b"spinelevel.extract"


def manifest_schema():  # noqa: ANN201 - pyarrow.Schema
    """Schema of DIR/manifest.parquet: one row per copied instance; no patient identity."""
    import pyarrow as pa

    return pa.schema(
        [
            ("study_uid", pa.string()),
            ("series_uid", pa.string()),
            ("level", pa.string()),
            ("offset", pa.int32()),
            ("slice_index", pa.int32()),
            ("sop_uid", pa.string()),
            ("frame", pa.int32()),
            ("z_mm", pa.float64()),
            ("source", pa.string()),
            ("file", pa.string()),
            ("png", pa.string()),
            ("flags", pa.list_(pa.string())),
            ("kos", pa.string()),
        ]
    )


def skipped_schema():  # noqa: ANN201 - pyarrow.Schema
    """Schema of DIR/skipped.parquet."""
    import pyarrow as pa

    return pa.schema(
        [
            ("study_uid", pa.string()),
            ("series_uid", pa.string()),
            ("level", pa.string()),
            ("offset", pa.int32()),
            ("source", pa.string()),
            ("reason", pa.string()),
        ]
    )


class ExtractProgress(Protocol):
    """What an extract reports while it works (the CLI draws it)."""

    def planned(self, series: int) -> None: ...

    def advanced(self, series: int) -> None: ...


class _NoProgress:
    def planned(self, series: int) -> None:
        pass

    def advanced(self, series: int) -> None:
        pass


@dataclass(frozen=True)
class ExtractSummary:
    """What an extract wrote."""

    out: Path
    manifest: Path
    # Series with at least one instance in the manifest.
    series: int
    # Manifest rows (copied instances), and how many files had to be written this time.
    instances: int
    written: int
    kos: int
    pngs: int
    # Extracted series that carry a doubt flag (exported with their flags).
    flagged: int
    # Series of the run not classified (status skipped/error): nothing to extract.
    not_classified: int
    # What was left out, and why (also in DIR/skipped.parquet).
    skipped: tuple[Skip, ...]
    seconds: float


# -- files ---------------------------------------------------------------------------------


def _same_bytes(path: Path, data: bytes) -> bool:
    try:
        if path.stat().st_size != len(data):
            return False
        with open(path, "rb") as fh:
            return fh.read() == data
    except OSError:
        return False


def _write_atomic(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` through a fsynced dot-name and a rename; False if it was already there."""
    if _same_bytes(path, data):
        return False
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc}); check the space and permissions of --out") from None
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
    return True


def _link_or_write(first: Path, path: Path, data: bytes) -> bool:
    """``path`` as a hard link to ``first`` (the same multi-frame file again), or a copy."""
    try:
        if path.exists() and os.path.samefile(first, path):
            return False
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        os.link(first, tmp)
        os.replace(tmp, path)
        return True
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
        return _write_atomic(path, data)


def _clean_stale(folder: Path) -> None:
    """Remove temporary dot-files a killed extract left (never a final name)."""
    for p in folder.glob(".*.tmp*"):
        try:
            p.unlink()
        except OSError:
            pass


def _write_table(table, path: Path) -> None:  # noqa: ANN001 - pyarrow.Table
    """A Parquet table through the same fsynced dot-name and rename as the copies."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    _write_atomic(path, sink.getvalue().to_pybytes())


def prepare_extract_dir(out: Path) -> None:
    """Create the extract folder and check that it is writable (``run --extract`` does it before the run).

    Raises:
        OutputError: it cannot be created or written.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the extract folder ({exc.strerror or exc}); give a writable --out") from None
    probe = out / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{out}: the extract folder is not writable ({exc.strerror or exc}); give a writable --out") from None


def _owned_by_old_manifest(out: Path) -> set[str]:
    """Relative paths an earlier manifest of ``out`` names (files this tool wrote)."""
    import pyarrow.parquet as pq

    path = out / MANIFEST_NAME
    if not path.is_file():
        return set()
    try:
        table = pq.read_table(path, columns=["file", "png", "kos"])
    except Exception as exc:
        log.warning("%s: unreadable earlier manifest (%s); its files are left in place", path, type(exc).__name__)
        return set()
    owned: set[str] = set()
    for name in ("file", "png", "kos"):
        owned.update(v for v in table.column(name).to_pylist() if v)
    return owned


def _remove_unnamed(out: Path, old: set[str], new: set[str]) -> None:
    root = out.resolve()
    for rel in sorted(old - new):
        path = (out / rel).resolve()
        if root not in path.parents:  # a manifest naming something outside DIR is not ours to delete
            continue
        try:
            path.unlink()
        except OSError:
            continue
        for parent in (path.parent, path.parent.parent):
            if parent == root:
                break
            try:
                parent.rmdir()  # only when empty
            except OSError:
                break


# -- one series ------------------------------------------------------------------------------


@dataclass
class _Counts:
    written: int = 0
    kos: int = 0
    pngs: int = 0


def _file_sop_uid(ds) -> str:  # noqa: ANN001
    uid = str(ds.get("SOPInstanceUID", "") or "").strip()
    if not uid:
        meta = getattr(ds, "file_meta", None)
        uid = str(getattr(meta, "MediaStorageSOPInstanceUID", "") or "").strip() if meta is not None else ""
    return uid


def _sop_class_uid(ds) -> str:  # noqa: ANN001
    uid = str(ds.get("SOPClassUID", "") or "").strip()
    if not uid:
        meta = getattr(ds, "file_meta", None)
        uid = str(getattr(meta, "MediaStorageSOPClassUID", "") or "").strip() if meta is not None else ""
    return uid or "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage


def _content_datetime(plan: SeriesPlan, run: dict[str, Any]) -> str:
    """When the selection was made: the start of the run that classified the series (UTC)."""
    if plan.classified_at:
        return plan.classified_at
    started = run.get("started")
    try:
        when = _dt.datetime.fromisoformat(str(started)).astimezone(_dt.timezone.utc)
        return when.strftime("%Y%m%dT%H%M%SZ")
    except (TypeError, ValueError):
        return "19700101T000000Z"


def _description(picks: list[Pick], model_sha256: str | None, l3_definition: str) -> str:
    where = "; ".join(f"{p.level} at slice {p.slice_index}" + (f" (z {p.z_mm:.1f} mm)" if p.z_mm is not None else "") for p in picks)
    text = (
        f"Selected by spinelevel {__version__} for body composition: {where}. "
        f"Model sha256 {model_sha256 or 'unknown'}. Picks: {PICK_DEFINITION}."
    )
    if l3_definition:
        text += f" L3 definition: {l3_definition}"
    return text


def _extract_series(plan: SeriesPlan, rp: RunPlan, options: ExtractOptions, out: Path, counts: _Counts, skips: list[Skip]) -> list[dict[str, Any]]:
    """Copy one series' picks, draw their previews, write its KOS; returns its manifest rows."""
    import pydicom

    from spinelevel.extract.kos import KosPick, build_kos
    from spinelevel.extract.preview import render_preview
    from spinelevel.report.build import safe_name
    from spinelevel.report.volume import source_for_label

    rel_dir = f"{safe_name(plan.study_uid)}/{safe_name(plan.series_uid)}"
    folder = out / rel_dir
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create ({exc.strerror or exc})") from None
    _clean_stale(folder)

    def skip(pick: Pick, reason: str) -> None:
        skips.append(Skip(pick.study_uid, pick.series_uid, pick.level, pick.offset, pick.source, reason))

    by_label: dict[str, list[Pick]] = {}
    for p in plan.picks:
        by_label.setdefault(p.source, []).append(p)
    sources: list[tuple[Source, str]] = []
    for label, picks in by_label.items():
        try:
            sources.append((source_for_label(label), label))
        except DecodeError as exc:
            for p in picks:
                skip(p, f"source vanished since the run ({exc})")
    # Archive members in offset order: a compressed tar then streams forward only.
    sources.sort(key=lambda s: (s[0].path, s[0].offset, s[1]))

    rows: list[dict[str, Any]] = []
    kos_picks: list[tuple[Pick, Any, str]] = []  # (pick, header, SOP class)
    for src, label in sources:
        picks = by_label[label]
        try:
            data = read_source(src, options.max_file_bytes)
        except KeyError:
            for p in picks:
                skip(p, "source vanished since the run (member not found in the archive)")
            continue
        except OSError as exc:
            for p in picks:
                skip(p, f"source unreadable ({exc.strerror or exc})")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's warnings may quote header values
            try:
                ds = pydicom.dcmread(io.BytesIO(data), force=True)
                found = _file_sop_uid(ds)
                n_frames = int(ds.get("NumberOfFrames", 1) or 1)
            except Exception as exc:
                for p in picks:
                    skip(p, f"source changed since the run: no longer readable DICOM ({type(exc).__name__})")
                continue
        first: Path | None = None
        for p in picks:
            if found != p.sop_uid:
                skip(p, "source changed since the run: its SOP Instance UID is not the one classified; run 'spinelevel run' again")
                continue
            if p.frame is not None and not 1 <= p.frame <= n_frames:
                skip(p, f"source changed since the run: frame {p.frame} is not in the file ({n_frames} frames)")
                continue
            name = f"{safe_name(p.level)}_{p.offset:+d}"
            final = folder / f"{name}.dcm"
            wrote = _write_atomic(final, data) if first is None else _link_or_write(first, final, data)
            first = first or final
            counts.written += wrote
            png_rel = None
            if p.offset == 0:
                kos_picks.append((p, ds, _sop_class_uid(ds)))
                if options.png:
                    caption = f"{p.level}" + (f"  z {p.z_mm:.1f} mm" if p.z_mm is not None else "") + (f"  frame {p.frame}" if p.frame is not None else "")
                    try:
                        picture = render_preview(ds, data, p.frame, caption, options.png_height)
                    except DecodeError as exc:
                        skip(p, f"preview not drawn (the copy was made): {exc}")
                    else:
                        counts.written += _write_atomic(folder / f"{name}.png", picture)
                        png_rel = f"{rel_dir}/{name}.png"
                        counts.pngs += 1
            rows.append(
                {
                    "study_uid": p.study_uid,
                    "series_uid": p.series_uid,
                    "level": p.level,
                    "offset": p.offset,
                    "slice_index": p.slice_index,
                    "sop_uid": p.sop_uid,
                    "frame": p.frame,
                    "z_mm": p.z_mm,
                    "source": p.source,
                    "file": f"{rel_dir}/{name}.dcm",
                    "png": png_rel,
                    "flags": list(plan.flags),
                    "kos": None,
                }
            )
    if options.kos and kos_picks:
        order = {lv: k for k, lv in enumerate(options.levels)}
        kos_picks.sort(key=lambda t: order[t[0].level])
        refs = [KosPick(p.level, p.slice_index, p.z_mm, p.series_uid, p.sop_uid, cls, p.frame) for p, _, cls in kos_picks]
        try:
            data = build_kos(
                kos_picks[0][1],
                plan.study_uid,
                plan.series_uid,
                refs,
                kos_title_code(options.kos_title),
                _description([p for p, _, _ in kos_picks], plan.model_sha256, rp.l3_definition),
                plan.model_sha256,
                _content_datetime(plan, rp.run.manifest),
                __version__,
            )
        except Exception as exc:  # highdicom rejects odd source values; its message may quote them (PHI)
            log.warning("series %s: KOS not written (%s)", plan.series_uid, type(exc).__name__)
            skips.append(Skip(plan.study_uid, plan.series_uid, None, None, None, f"KOS not written: highdicom refused the source header ({type(exc).__name__})"))
        else:
            counts.written += _write_atomic(folder / "kos.dcm", data)
            counts.kos += 1
            for r in rows:
                r["kos"] = f"{rel_dir}/kos.dcm"
    fsync_dir(folder)
    if not rows:
        try:
            folder.rmdir()
            folder.parent.rmdir()
        except OSError:
            pass
    return rows


# -- the extract -----------------------------------------------------------------------------


def _metadata(run_dir: Path, options: ExtractOptions, rp: RunPlan) -> dict[bytes, bytes]:
    info = {
        "format": "spinelevel.extract/1",
        "spinelevel": __version__,
        "run_dir": str(run_dir.resolve()),
        "levels": list(options.levels),
        "neighbours": options.neighbours,
        "kos": options.kos,
        "kos_title": options.kos_title,
        "png": options.png,
        "skip_flagged": options.skip_flagged,
        "doubt_flags": list(DOUBT_FLAGS),
        "pick_definition": PICK_DEFINITION,
        "l3_definition": rp.l3_definition,
        "model_sha256": sorted({p.model_sha256 for p in rp.series if p.model_sha256}),
    }
    return {_META_KEY: json.dumps(info, sort_keys=True).encode()}


def _record_in_run(run_dir: Path, out: Path) -> None:
    """Add ``out`` to RUN_DIR/extracted.json so the review report can link the pictures."""
    path = run_dir / EXTRACTED_RECORD
    dirs: list[str] = []
    try:
        dirs = list(json.loads(path.read_text(encoding="utf-8")).get("dirs", []))
    except (OSError, ValueError, AttributeError):
        pass
    target = str(out.resolve())
    if target in dirs:
        return
    dirs.append(target)
    from spinelevel.engine.writer import write_json_atomic

    try:
        write_json_atomic(path, {"format": "spinelevel.extracted/1", "dirs": dirs})
    except OSError as exc:
        log.warning("%s: cannot record the extract folder (%s); give it to 'spinelevel report --extracted'", path, exc.strerror or exc)


def extract_run(run_dir: Path, out: Path, options: ExtractOptions = ExtractOptions(), progress: ExtractProgress | None = None) -> ExtractSummary:
    """Copy the level picks of a run (and their neighbours) into ``out`` with KOS, previews and a manifest.

    Args:
        run_dir: the ``--out`` folder of ``spinelevel run``.
        out: the extract folder (created; an earlier extract there is brought up to date).
        options: see :class:`ExtractOptions`.
        progress: told the number of series and each one done.

    Raises:
        InputError: ``run_dir`` is not a run folder, or an option is unusable (nothing is written).
        OutputError: ``out`` cannot be written.
    """
    import pyarrow as pa

    started = time.perf_counter()
    progress = progress or _NoProgress()
    run_dir, out = Path(run_dir), Path(out)
    rp = plan_extraction(run_dir, options)
    prepare_extract_dir(out)
    skips: list[Skip] = list(rp.skips)
    counts = _Counts()
    rows: list[dict[str, Any]] = []
    with OutputLock(out):
        _clean_stale(out)  # a manifest a killed extract was writing
        old = _owned_by_old_manifest(out)
        progress.planned(len(rp.series))
        for plan in rp.series:
            rows.extend(_extract_series(plan, rp, options, out, counts, skips))
            progress.advanced(1)
        order = {lv: k for k, lv in enumerate(options.levels)}
        rows.sort(key=lambda r: (r["study_uid"], r["series_uid"], order[r["level"]], r["offset"]))
        schema = manifest_schema().with_metadata(_metadata(run_dir, options, rp))
        _write_table(pa.Table.from_pylist(rows, schema=schema), out / MANIFEST_NAME)
        skips.sort(key=lambda s: (s.study_uid or "", s.series_uid or "", order.get(s.level or "", -1), s.offset or 0, s.reason))
        skipped_rows = [{"study_uid": s.study_uid, "series_uid": s.series_uid, "level": s.level, "offset": s.offset, "source": s.source, "reason": s.reason} for s in skips]
        _write_table(pa.Table.from_pylist(skipped_rows, schema=skipped_schema()), out / SKIPPED_NAME)
        fsync_dir(out)
        new = {r[k] for r in rows for k in ("file", "png", "kos") if r[k]}
        _remove_unnamed(out, old, new)
    _record_in_run(run_dir, out)
    series_done = {r["series_uid"] for r in rows}
    flagged = sum(1 for p in rp.series if p.series_uid in series_done and any(f in DOUBT_FLAGS for f in p.flags))
    return ExtractSummary(
        out=out,
        manifest=out / MANIFEST_NAME,
        series=len(series_done),
        instances=len(rows),
        written=counts.written,
        kos=counts.kos,
        pngs=counts.pngs,
        flagged=flagged,
        not_classified=rp.not_classified,
        skipped=tuple(skips),
        seconds=time.perf_counter() - started,
    )
