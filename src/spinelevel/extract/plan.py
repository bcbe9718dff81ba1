"""Which instances an extract copies: the level picks of a run and their neighbours.

Reads only what it needs from a run directory: the series table whole (one row per series), and
from the slices dataset first the level of every slice of the wanted series (three columns, to find
each level's run), then the few rows that are picked. A run of millions of slices is never held in
memory with its string columns.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spinelevel.engine.writer import read_output_dataset
from spinelevel.errors import InputError
from spinelevel.report.rundata import RunData, read_run

__all__ = ["ExtractOptions", "Pick", "SeriesPlan", "Skip", "RunPlan", "plan_extraction", "DOUBT_FLAGS", "PICK_DEFINITION", "kos_title_code"]

log = logging.getLogger(__name__)

# Flags of the sequence decoding that say an answer is doubtful (DESIGN 4); --skip-flagged leaves out
# series that carry one. Acquisition findings (gantry_tilt, dropped_slices, ...) are exported with
# their flags whatever the option.
DOUBT_FLAGS = ("l3_not_in_fov", "low_confidence", "short_l3", "long_l3", "l3_at_fov_edge", "order_conflict", "possible_transitional", "skipped_level", "extents_enforced")

# How a level's pick is chosen (written into the manifest's metadata and the KOS text).
PICK_DEFINITION = (
    "L3: the run's l3_index (see the run's L3 definition); any other level: the middle slice "
    "((first + last) // 2, ties to the superior slice) of the run of slices decoded as that level; "
    "offset k: the slice k positions inferior (k > 0) or superior (k < 0) of the pick in the series' "
    "order, where the series has one"
)

# A part file's name: part-<run id>-<n>.parquet, the run id starting with its UTC start time.
_PART_RE = re.compile(r"^part-(\d{8}T\d{6}Z)-")


@dataclass(frozen=True)
class ExtractOptions:
    """What ``spinelevel extract`` writes."""

    # Levels to extract, each a class of the run's model card, in the order given.
    levels: tuple[str, ...] = ("L3",)
    # Slices copied on each side of every pick (0: the pick alone); fewer at the ends of a series.
    neighbours: int = 0
    # Write a Key Object Selection document per series (DIR/<study>/<series>/kos.dcm).
    kos: bool = True
    # Write a PNG preview per pick (soft-tissue window, level and z in the corner).
    png: bool = True
    # Leave out series with a doubt flag (DOUBT_FLAGS); they are listed in DIR/skipped.parquet.
    skip_flagged: bool = False
    # Document title of the KOS: a keyword of pydicom's DCM codes from CID 7010 (key object selection titles).
    kos_title: str = "ForSegmentation"
    # Largest source file read, bytes (as the scan's limit).
    max_file_bytes: int = 2 << 30
    # Height of the PNG previews, pixels.
    png_height: int = 512


@dataclass(frozen=True)
class Pick:
    """One selected instance: a level's pick (offset 0) or one of its neighbours."""

    study_uid: str
    series_uid: str
    level: str
    # Position relative to the pick: negative superior, positive inferior.
    offset: int
    # slice_index in the run's table (0 = most superior).
    slice_index: int
    sop_uid: str
    # 1-based frame of a multi-frame file; None for a single-frame file.
    frame: int | None
    z_mm: float | None
    # The run's source label: a path or ``archive::member``.
    source: str


@dataclass(frozen=True)
class Skip:
    """Something not extracted, and why (a row of DIR/skipped.parquet)."""

    study_uid: str | None
    series_uid: str | None
    level: str | None
    offset: int | None
    source: str | None
    reason: str


@dataclass(frozen=True)
class SeriesPlan:
    """What one series contributes."""

    study_uid: str
    series_uid: str
    # The series' flags from the run (all of them, not only doubt flags).
    flags: tuple[str, ...]
    # Ordered by level (as requested) then offset.
    picks: tuple[Pick, ...]
    # UTC time the run that classified this series started (YYYYMMDDTHHMMSSZ), when known.
    classified_at: str | None
    model_sha256: str | None


@dataclass(frozen=True)
class RunPlan:
    """Everything an extract will do, decided before anything is written."""

    run: RunData
    series: tuple[SeriesPlan, ...]
    skips: tuple[Skip, ...]
    # Series of the run that were not classified (status skipped or error): not extracted.
    not_classified: int
    # The L3 definition of the run (run.json), for the KOS text.
    l3_definition: str


def _check_options(options: ExtractOptions, classes: tuple[str, ...], run_dir: Path) -> None:
    if not options.levels:
        raise InputError("--levels is empty; give one or more levels, e.g. --levels L3 or --levels L3,L1")
    unknown = [lv for lv in options.levels if lv not in classes]
    if unknown:
        raise InputError(
            f"--levels {','.join(unknown)}: not a class of the model card of {run_dir} (classes: {', '.join(classes)})"
        )
    if len(set(options.levels)) != len(options.levels):
        raise InputError(f"--levels {','.join(options.levels)}: a level is given twice")
    if options.neighbours < 0:
        raise InputError(f"--neighbours must be 0 or more, got {options.neighbours}")
    if kos_title_code(options.kos_title) is None:
        raise InputError(f"KOS title {options.kos_title!r} is not a key object selection title (DICOM CID 7010), e.g. ForSegmentation, ForResearch, OfInterest")


def kos_title_code(keyword: str):  # noqa: ANN201 - pydicom Code or None
    """The CID 7010 code (key object selection document titles) of a pydicom keyword, or None."""
    from pydicom.sr.codedict import codes

    if keyword not in codes.cid7010.dir():
        return None
    return getattr(codes.cid7010, keyword)


def _classified_at(run_dir: Path) -> dict[str, str]:
    """series_uid -> start time of the run whose series part holds its row."""
    import pyarrow.dataset as pads

    out: dict[str, str] = {}
    try:
        dataset = pads.dataset(str(run_dir / "series"), format="parquet")
        for frag in dataset.get_fragments():
            m = _PART_RE.match(Path(frag.path).name)
            if not m:
                continue
            for uid in frag.to_table(columns=["series_uid"]).column("series_uid").to_pylist():
                out[uid] = m.group(1)
    except Exception as exc:  # provenance only: the extract works without it
        log.debug("cannot date the series rows: %s", exc)
    return out


def plan_extraction(run_dir: Path, options: ExtractOptions) -> RunPlan:
    """Read a run directory and decide every instance to extract.

    Raises:
        InputError: ``run_dir`` is not a complete output of ``spinelevel run``, or an option is unusable.
    """
    run_dir = Path(run_dir)
    rd = read_run(run_dir)
    if not rd.manifest:
        raise InputError(f"{run_dir / 'run.json'}: missing or unreadable; give the --out directory of a finished 'spinelevel run'")
    _check_options(options, rd.classes, run_dir)
    skips: list[Skip] = []
    wanted: dict[str, dict[str, Any]] = {}
    not_classified = 0
    for row in sorted(rd.series, key=lambda r: (r.get("study_uid") or "", r.get("series_uid") or "")):
        if row.get("status") != "ok":
            not_classified += 1
            continue
        flags = tuple(row.get("flags") or ())
        if options.skip_flagged and any(f in DOUBT_FLAGS for f in flags):
            doubt = ", ".join(f for f in flags if f in DOUBT_FLAGS)
            skips.append(Skip(row["study_uid"], row["series_uid"], None, None, None, f"flagged ({doubt}); --skip-flagged"))
            continue
        wanted[row["series_uid"]] = row
    rows = _picked_rows(run_dir, wanted, options, skips)
    dated = _classified_at(run_dir)
    plans = []
    for uid, row in wanted.items():
        picks = rows.get(uid)
        if not picks:
            continue
        plans.append(
            SeriesPlan(
                study_uid=row["study_uid"],
                series_uid=uid,
                flags=tuple(row.get("flags") or ()),
                picks=tuple(picks),
                classified_at=dated.get(uid),
                model_sha256=row.get("model_sha256"),
            )
        )
    definition = str(rd.manifest.get("l3_definition") or "")
    return RunPlan(rd, tuple(plans), tuple(skips), not_classified, definition)


def _picked_rows(run_dir: Path, wanted: dict[str, dict[str, Any]], options: ExtractOptions, skips: list[Skip]) -> dict[str, list[Pick]]:
    """series_uid -> its picks and neighbours, read from the slices dataset."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not wanted:
        return {}
    try:
        dataset = read_output_dataset(run_dir / "slices")
        uids = pa.array(sorted(wanted), pa.string())
        in_wanted = pc.field("series_uid").isin(uids)
        levels = dataset.to_table(columns=["series_uid", "slice_index", "level"], filter=in_wanted)
    except Exception as exc:
        raise InputError(f"{run_dir / 'slices'}: unreadable slices dataset ({type(exc).__name__}: {exc})") from None
    # Each level's run (decoding is monotone: a level's slices are contiguous) and each series' length.
    runs = levels.group_by(["series_uid", "level"]).aggregate([("slice_index", "min"), ("slice_index", "max")])
    span: dict[tuple[str, str], tuple[int, int]] = {
        (u, lv): (int(a), int(b))
        for u, lv, a, b in zip(
            runs.column("series_uid").to_pylist(), runs.column("level").to_pylist(), runs.column("slice_index_min").to_pylist(), runs.column("slice_index_max").to_pylist()
        )
        if lv is not None
    }
    lengths = levels.group_by("series_uid").aggregate([("slice_index", "max")])
    last_index = dict(zip(lengths.column("series_uid").to_pylist(), (int(v) for v in lengths.column("slice_index_max").to_pylist())))
    del levels, runs, lengths

    # (series, slice_index) -> [(level, offset)] for every instance to extract.
    needed: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for uid, row in wanted.items():
        if uid not in last_index:
            skips.append(Skip(row["study_uid"], uid, None, None, None, "no slices of this series in the run's slices dataset"))
            continue
        present = list(row.get("levels_present") or [])
        for level in options.levels:
            if level == "L3":
                pick = row.get("l3_index")
            else:
                pick = None
                if (uid, level) in span:
                    first, last = span[(uid, level)]
                    pick = (first + last) // 2
            if pick is None:
                shown = ", ".join(present) or "none"
                skips.append(Skip(row["study_uid"], uid, level, None, None, f"no {level} decoded in this series (levels present: {shown})"))
                continue
            pick = int(pick)
            for offset in range(-options.neighbours, options.neighbours + 1):
                index = pick + offset
                if 0 <= index <= last_index[uid]:
                    needed.setdefault((uid, index), []).append((level, offset))
    if not needed:
        return {}
    columns = ["series_uid", "slice_index", "sop_uid", "source", "z_mm"]
    has_frame = "frame" in dataset.schema.names
    if has_frame:
        columns.append("frame")
    indices = pa.array(sorted({i for _, i in needed}), pa.int32())
    try:
        table = dataset.to_table(columns=columns, filter=in_wanted & pc.field("slice_index").isin(indices))
    except Exception as exc:
        raise InputError(f"{run_dir / 'slices'}: unreadable slices dataset ({type(exc).__name__}: {exc})") from None
    cols = {name: table.column(name).to_pylist() for name in columns}
    found: dict[tuple[str, int], dict[str, Any]] = {}
    for i in range(table.num_rows):
        key = (cols["series_uid"][i], int(cols["slice_index"][i]))
        if key in needed:
            found[key] = {name: cols[name][i] for name in columns}
    out: dict[str, list[Pick]] = {}
    order = {lv: k for k, lv in enumerate(options.levels)}
    for (uid, index), uses in needed.items():
        r = found.get((uid, index))
        row = wanted[uid]
        if r is None:
            for level, offset in uses:
                skips.append(Skip(row["study_uid"], uid, level, offset, None, f"slice {index} is missing from the run's slices dataset"))
            continue
        frame = r.get("frame") if has_frame else None
        for level, offset in uses:
            if level == "L3" and offset == 0 and row.get("l3_sop_uid") and row["l3_sop_uid"] != r["sop_uid"]:
                skips.append(Skip(row["study_uid"], uid, level, offset, r["source"], "the series table's l3_sop_uid differs from the slices table at l3_index (a damaged run directory)"))
                continue
            out.setdefault(uid, []).append(
                Pick(
                    study_uid=row["study_uid"],
                    series_uid=uid,
                    level=level,
                    offset=offset,
                    slice_index=index,
                    sop_uid=r["sop_uid"],
                    frame=None if frame is None else int(frame),
                    z_mm=None if r["z_mm"] is None else float(r["z_mm"]),
                    source=r["source"],
                )
            )
    for picks in out.values():
        picks.sort(key=lambda p: (order[p.level], p.offset))
    return out
