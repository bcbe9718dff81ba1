"""Evaluate a run (``spinelevel run`` output) against a labels table, the way the paper measured.

Slices are joined on ``sop_uid``; only slices with a non-null label count (disc slices and other
excluded slices are left out, as in training). Metrics (``metrics.json``):

- ``accuracy_decoded``: share of labelled slices whose decoded ``level`` equals the label;
- ``accuracy_argmax``: the same for the raw argmax, over the labelled slices the model ran on
  (``n_slices_argmax``; the engine's sparse sampling may skip slices);
- ``per_class``: precision, recall, f1 and support (labelled slices) per class, of the decoded level;
- ``confusion_matrix``: counts, rows = label, columns = decoded level, both in ``classes`` order;
- L3: for every series with a labelled L3 vertebra, the labelled L3 extent is the z range of its
  L3-labelled slices, or the vertebra's ``top_z_mm``/``bottom_z_mm`` from a ``vertebrae.parquet``
  (phantom) when given and some slice of the series lies within it (a partial scan that stops
  short of L3 has no L3 to find); the error is ``|z_pick - z_middle|`` in mm. ``l3_inside`` is the share of
  such series whose pick lies inside the extent, ``l3_within_5mm``/``l3_within_10mm`` the share
  inside the extent or within that distance of its middle. A series without a pick counts as a
  miss in these shares and is left out of ``l3_error_mm_median``/``_mean`` (``l3_missed`` counts them).
  Series without a labelled L3 are counted in ``l3_absent`` (and ``l3_false_pick`` when the run
  picked one anyway).

Also written: ``per_series.csv`` (one row per evaluated series) and ``confusion_matrix.png`` (counts
and row-normalised, like the paper's Figure 3).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spinelevel.errors import InputError
from spinelevel.levels import CLASSES
from spinelevel.training.labels import read_labels_table

__all__ = ["EvaluateOptions", "confusion_matrix", "per_class_metrics", "evaluate_run"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateOptions:
    """What evaluation writes besides metrics.json."""

    # vertebrae.parquet (phantom) with the labelled vertebra extents; None uses the labelled slices.
    vertebrae: Path | None = None
    # Write confusion_matrix.png (needs matplotlib).
    plot: bool = True


def confusion_matrix(truth: list[str], pred: list[str], classes: tuple[str, ...]) -> np.ndarray:
    """Counts, rows = truth, columns = prediction, in ``classes`` order (others ignored)."""
    index = {c: i for i, c in enumerate(classes)}
    cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for t, p in zip(truth, pred):
        if t in index and p in index:
            cm[index[t], index[p]] += 1
    return cm


def per_class_metrics(cm: np.ndarray, classes: tuple[str, ...]) -> dict[str, dict[str, float | int]]:
    """Precision, recall, f1 and support per class from a confusion matrix (0 where undefined)."""
    out: dict[str, dict[str, float | int]] = {}
    for i, c in enumerate(classes):
        tp = float(cm[i, i])
        support = int(cm[i].sum())
        predicted = float(cm[:, i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[c] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return out


def _read_dataset(path: Path, what: str) -> list[dict[str, Any]]:
    import pyarrow.dataset as ds

    if not path.exists():
        raise InputError(f"{path}: no {what} dataset; is the run directory the --out of 'spinelevel run'?")
    try:
        return ds.dataset(str(path), format="parquet").to_table().to_pylist()
    except Exception as exc:
        raise InputError(f"{path}: unreadable {what} dataset ({type(exc).__name__}: {exc})") from None


def _run_classes(run_dir: Path) -> tuple[str, ...]:
    try:
        runs = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["runs"]
        classes = tuple(runs[-1]["card"]["classes"])
        if classes:
            return classes
    except (OSError, KeyError, IndexError, TypeError, ValueError):
        pass
    return CLASSES


def _vertebra_extents(path: Path) -> dict[str, tuple[float, float]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:
        raise InputError(f"{path}: unreadable vertebrae table ({type(exc).__name__}: {exc})") from None
    out: dict[str, tuple[float, float]] = {}
    for r in rows:
        if r.get("vertebra") == "L3" or (r.get("vertebra") is None and r.get("level") == "L3"):
            lo, hi = sorted((float(r["top_z_mm"]), float(r["bottom_z_mm"])))
            out[str(r["series_uid"])] = (lo, hi)
    return out


def _reaches(rows: list[dict[str, Any]], extent: tuple[float, float]) -> bool:
    """Whether any slice of the series lies within the vertebra's z extent."""
    lo, hi = extent
    return any(lo - 1e-6 <= float(r["z_mm"]) <= hi + 1e-6 for r in rows)


def evaluate_run(run_dir: Path, labels: Path, out: Path, options: EvaluateOptions = EvaluateOptions()) -> dict[str, Any]:
    """Compare a run's output with labels; write metrics.json, per_series.csv, confusion_matrix.png.

    Returns:
        The metrics written to ``out/metrics.json``.

    Raises:
        InputError: unreadable inputs, or no slice of the run is in the labels table.
    """
    run_dir, out = Path(run_dir), Path(out)
    table = read_labels_table(labels)
    slices = _read_dataset(run_dir / "slices", "slices")
    series_rows = {r["series_uid"]: r for r in _read_dataset(run_dir / "series", "series")}
    classes = _run_classes(run_dir)
    extents_v = _vertebra_extents(options.vertebrae) if options.vertebrae is not None else {}

    by_series: dict[str, list[dict[str, Any]]] = {}
    for r in slices:
        # labels name slices by sop_uid, which the frames of a multi-frame file share: not joined
        if r["sop_uid"] in table.level and r.get("frame") is None:
            by_series.setdefault(r["series_uid"], []).append(r)
    if not by_series:
        raise InputError(f"no slice of the run in {run_dir} is in the labels table {labels} (joined on sop_uid)")

    truth_all: list[str] = []
    pred_all: list[str] = []
    argmax_hits = argmax_n = 0
    per_series: list[dict[str, Any]] = []
    errors: list[float] = []
    l3_n = inside_n = w5 = w10 = missed = absent = false_pick = 0
    for uid in sorted(by_series):
        rows = by_series[uid]
        labelled = [(r, table.level[r["sop_uid"]]) for r in rows if table.level[r["sop_uid"]] is not None]
        hits = sum(1 for r, t in labelled if r["level"] == t)
        truth_all += [t for _, t in labelled]
        pred_all += [r["level"] for r, _ in labelled]
        for r, t in labelled:
            if r.get("level_argmax") is not None:
                argmax_n += 1
                argmax_hits += int(r["level_argmax"] == t)
        srow = series_rows.get(uid, {})
        l3_z = [table.z_mm.get(r["sop_uid"], r["z_mm"]) for r, t in labelled if t == "L3"]
        extent = extents_v.get(uid)
        if extent is not None and not _reaches(rows, extent):
            extent = None  # the vertebra is outside this series' field of view (a partial scan)
        if extent is None and l3_z:
            extent = (min(l3_z), max(l3_z))
        pick = srow.get("l3_z_mm")
        rec: dict[str, Any] = {
            "series_uid": uid,
            "study_uid": srow.get("study_uid", rows[0].get("study_uid")),
            "status": srow.get("status"),
            "n_slices": len(rows),
            "n_labelled": len(labelled),
            "accuracy_decoded": hits / len(labelled) if labelled else None,
            "l3_index": srow.get("l3_index"),
            "l3_sop_uid": srow.get("l3_sop_uid"),
            "l3_z_mm": pick,
            "l3_true_top_z_mm": None if extent is None else extent[1],
            "l3_true_bottom_z_mm": None if extent is None else extent[0],
            "l3_true_mid_z_mm": None if extent is None else (extent[0] + extent[1]) / 2,
            "l3_error_mm": None,
            "l3_inside": None,
            "l3_within_5mm": None,
            "l3_within_10mm": None,
            "flags": ";".join(srow.get("flags") or []),
        }
        if extent is None:
            absent += 1
            false_pick += int(pick is not None)
        else:
            l3_n += 1
            if pick is None:
                missed += 1
                rec.update(l3_inside=False, l3_within_5mm=False, l3_within_10mm=False)
            else:
                err = abs(float(pick) - (extent[0] + extent[1]) / 2)
                inside = extent[0] - 1e-6 <= float(pick) <= extent[1] + 1e-6
                errors.append(err)
                rec.update(l3_error_mm=err, l3_inside=inside, l3_within_5mm=inside or err <= 5.0, l3_within_10mm=inside or err <= 10.0)
                inside_n += int(inside)
                w5 += int(rec["l3_within_5mm"])
                w10 += int(rec["l3_within_10mm"])
        per_series.append(rec)

    n = len(truth_all)
    cm = confusion_matrix(truth_all, pred_all, classes)
    nan = float("nan")
    metrics: dict[str, Any] = {
        "classes": list(classes),
        "n_series": len(by_series),
        "n_slices": n,
        "n_slices_argmax": argmax_n,
        "accuracy_decoded": float(np.trace(cm)) / n if n else nan,
        "accuracy_argmax": argmax_hits / argmax_n if argmax_n else nan,
        "per_class": per_class_metrics(cm, classes),
        "confusion_matrix": cm.tolist(),
        "l3_series": l3_n,
        "l3_missed": missed,
        "l3_absent": absent,
        "l3_false_pick": false_pick,
        "l3_inside": inside_n / l3_n if l3_n else nan,
        "l3_within_5mm": w5 / l3_n if l3_n else nan,
        "l3_within_10mm": w10 / l3_n if l3_n else nan,
        "l3_error_mm_median": float(np.median(errors)) if errors else nan,
        "l3_error_mm_mean": float(np.mean(errors)) if errors else nan,
        "l3_extent_from": "vertebrae table" if extents_v else "labelled L3 slices",
        "run_dir": str(run_dir),
        "labels": str(labels),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(_json_safe(metrics), indent=2) + "\n", encoding="utf-8")
    with open(out / "per_series.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(per_series[0]))
        w.writeheader()
        w.writerows(per_series)
    if options.plot:
        try:
            from spinelevel.report.confusion import plot_confusion

            plot_confusion(cm, classes, out / "confusion_matrix.png", title=f"{n} slices, {len(by_series)} series")
        except ImportError:
            log.warning("matplotlib is not installed: confusion_matrix.png not written")
    return metrics


def _json_safe(value: Any) -> Any:
    """NaN -> null (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value
