"""The vertebral-level classes, their anatomical order, sequence decoding and the L3 pick.

A CT series ordered superior -> inferior must read ``T* L1* L2* L3* L4* L5* S*``: every class may be
absent at either end of the field of view, but the order never reverses. The per-slice classifier
does not know that, so :func:`decode_sequence` finds the non-decreasing labelling with the highest
summed log-probability (a Viterbi-style dynamic programme), and :func:`label_series` turns that
labelling into the L3 pick and the flags that say when the answer is doubtful.

This module depends on numpy only, so that evaluation and training code can use it without the
engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from spinelevel.errors import CardError

__all__ = [
    "CLASSES",
    "L3_DEFINITION",
    "LevelThresholds",
    "SeriesLevels",
    "decode_levels",
    "decode_sequence",
    "label_series",
    "l3_definition",
    "long_class_index",
    "validate_classes",
]

CLASSES: tuple[str, ...] = ("T", "L1", "L2", "L3", "L4", "L5", "S")
"""Every class a model may emit, in canonical anatomical order (superior -> inferior)."""

# Probabilities are clipped here before the log so that a confident model's exact zeros cost a large
# but finite amount instead of -inf (which would make every labelling through that slice tie).
_MIN_PROB = 1e-7

# The vertebrae whose run lengths stand for "a normal vertebra" when judging whether the L5 run is
# too long to be one vertebra.
_REFERENCE_LUMBAR = ("L1", "L2", "L3", "L4")


def validate_classes(classes: Sequence[str]) -> tuple[str, ...]:
    """Check a model card's class list.

    The list must be non-empty, hold unique names that all belong to :data:`CLASSES`, follow the
    canonical anatomical order, and contain ``"L3"`` (the level the engine exists to find). A card
    may name a subset of :data:`CLASSES` (for example a model trained without ``T``).

    Args:
        classes: The ``classes`` field of a model card, in the order of the model's output columns.

    Returns:
        The class names as a tuple.

    Raises:
        CardError: If the list is empty, is a bare string, holds a non-string, an unknown or
            repeated name, is out of anatomical order, or lacks ``"L3"``. The message names the
            problem.
    """
    if isinstance(classes, (str, bytes)):
        raise CardError(
            f"card field 'classes' must be a list of class names, not the string {classes!r}; "
            f'write e.g. ["T", "L1", "L2", "L3", "L4", "L5", "S"]'
        )
    names = tuple(classes)
    if not names:
        raise CardError(
            "card field 'classes' is empty; list the model's output classes in order, "
            f"a subset of {list(CLASSES)}"
        )
    for name in names:
        if not isinstance(name, str):
            raise CardError(f"card field 'classes' holds {name!r}, which is not a string")
    unknown = [name for name in names if name not in CLASSES]
    if unknown:
        raise CardError(
            f"card field 'classes' holds unknown class name(s) {unknown}; "
            f"allowed names are {list(CLASSES)}"
        )
    repeated = sorted({name for name in names if names.count(name) > 1}, key=CLASSES.index)
    if repeated:
        raise CardError(
            f"card field 'classes' repeats class name(s) {repeated}; each may appear once"
        )
    canonical = tuple(sorted(names, key=CLASSES.index))
    if names != canonical:
        raise CardError(
            f"card field 'classes' is {list(names)}, which is not in anatomical order "
            f"(superior -> inferior); expected {list(canonical)}, with the model's output columns "
            "in the same order"
        )
    if "L3" not in names:
        raise CardError(
            f"card field 'classes' is {list(names)}, which lacks 'L3'; the engine needs a model "
            "that predicts L3"
        )
    return names


@dataclass(frozen=True)
class LevelThresholds:
    """When :func:`label_series` raises a flag, and the extents its decoding keeps. Defaults suit
    adult CT."""

    # Extent bounds (mm) of a decoded run of an interior class of the card (every class but the
    # first and the last, which absorb whatever lies beyond; with the 7 standard classes: L1-L5).
    # An adult lumbar level (vertebral body 24-32 mm plus one disc of 7-12 mm) spans about 30-45 mm;
    # 20-55 mm leaves room for small and large patients and for a boundary a slice or two off. The
    # lower bound applies to runs that touch neither end of the series (a run cut by the field of
    # view may be short); the upper one to every run. The L5 run (where L5 is an interior class of
    # the card, long_class_index) may be twice the upper bound: a lumbarised S1 decoded as L5 makes
    # it two vertebrae long (see 'possible_transitional'). level_max_mm = inf turns the bounds off (order only, as before
    # issue 14's fourth round; also for paediatric CT, whose levels are shorter).
    level_min_mm: float = 20.0
    level_max_mm: float = 55.0

    # Mean probability of the decoded class (L3) over the evaluated slices of the L3 run, below
    # which the pick gets 'low_confidence'. 0.5: below it the model did not give L3 even a majority
    # of its belief on the slices it called L3, whatever the number of classes.
    low_confidence: float = 0.5
    # Extent (mm) of a complete decoded L3 run below which it gets 'short_l3'. An adult L3 body is
    # about 25-30 mm tall (plus half a disc on each side); 15 mm is about half of that, too little
    # to be the whole vertebra.
    short_l3_mm: float = 15.0
    # Extent (mm) of the decoded L3 run above which it gets 'long_l3'. 60 mm is about two vertebral
    # heights: the run has swallowed a neighbour (or the slice positions are wrong).
    long_l3_mm: float = 60.0
    # Fraction of evaluated slices whose argmax differs from the decoded level above which the
    # series gets 'order_conflict' (and at least 2 such slices, so that one stray slice of a short
    # series does not flag it). 10 %: a model that fits anatomy needs the decoder only at the run
    # boundaries.
    order_conflict_fraction: float = 0.10
    # The L5 run extent, as a multiple of the mean extent of the complete L1-L4 runs, above which
    # the series gets 'possible_transitional'. A lumbarised S1 or an extra lumbar vertebra decoded
    # as L5 makes the run about twice a vertebra; 1.6 leaves room for normal height variation and
    # for the run boundaries being a slice or two off.
    transitional_ratio: float = 1.6


@dataclass(frozen=True)
class SeriesLevels:
    """The decoded levels of one series and its L3 pick.

    Slice indices count from 0 at the most superior slice, as in the ``slices`` dataset.
    """

    # Decoded level per slice (slice 0 = most superior); reads T* L1* ... S* in that order.
    levels: tuple[str, ...]
    # Raw argmax of the model per slice, None where the model did not run on the slice.
    level_argmax: tuple[str | None, ...]
    # Middle slice of the decoded L3 run, (first + last) // 2 (ties to the superior slice); None
    # when no slice decodes to L3.
    l3_index: int | None
    # First (most superior) slice of the decoded L3 run, or None.
    l3_first_index: int | None
    # Last (most inferior) slice of the decoded L3 run, or None.
    l3_last_index: int | None
    # The classes that occur in the decoded labelling, in anatomical order.
    levels_present: tuple[str, ...]
    # The flags raised (see L3_DEFINITION), sorted and unique.
    flags: tuple[str, ...]


def decode_sequence(log_probs: np.ndarray) -> np.ndarray:
    """Find the anatomically ordered labelling with the highest summed log-probability.

    Rows are slices ordered superior -> inferior, columns are classes in anatomical order. The
    result is non-decreasing and maximises ``sum(log_probs[i, labels[i]])`` among all non-decreasing
    labellings. The dynamic programme keeps, per slice and class, the best score of a labelling that
    ends there; the predecessor is the best of the classes at or above it, found with a running
    maximum, so the work is O(n * k).

    Ties are broken deterministically: the last slice takes the lowest-index class among the best,
    and walking back, a slice keeps the class of the slice below it whenever that is among the best
    (otherwise the highest-index best class). As a result, an all-zero row (a slice without
    evidence) takes the class of the slice below it, and trailing all-zero rows take the class of
    the last row with evidence.

    Args:
        log_probs: ``(n, k)`` float log-probabilities (``-inf`` allowed, NaN not).

    Returns:
        ``(n,)`` int64 class indices, non-decreasing. Empty when ``n == 0``.

    Raises:
        ValueError: If ``log_probs`` is not two-dimensional, has no columns while having rows, or
            holds NaN.
    """
    scores = np.asarray(log_probs, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"log_probs must be 2-D (slices, classes), got shape {scores.shape}")
    n, k = scores.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if k == 0:
        raise ValueError(f"log_probs has {n} rows but no class columns")
    if np.isnan(scores).any():
        raise ValueError("log_probs holds NaN; give unevaluated slices a row of zeros instead")

    columns = np.arange(k)
    # back[i, c]: the class of slice i - 1 on the best labelling whose slice i has class c.
    back = np.zeros((n, k), dtype=np.int64)
    best = scores[0].copy()
    for i in range(1, n):
        running = np.maximum.accumulate(best)
        # The best predecessor of c is the highest c' <= c whose score equals the running maximum:
        # the running maximum only changes at such c', so the latest one up to c carries it. Taking
        # the highest one prefers staying in the same class on ties.
        back[i] = np.maximum.accumulate(np.where(best == running, columns, 0))
        best = running + scores[i]

    labels = np.empty(n, dtype=np.int64)
    labels[-1] = int(np.argmax(best))  # argmax returns the first (lowest-index) maximum
    for i in range(n - 1, 0, -1):
        labels[i - 1] = back[i, labels[i]]
    return labels


def decode_levels(
    log_probs: np.ndarray,
    z_mm: np.ndarray,
    evaluated: np.ndarray | None = None,
    min_mm: float = 0.0,
    max_mm: float = float("inf"),
    long_class: int | None = -2,
) -> np.ndarray:
    """The best ordered labelling whose level runs have anatomically possible extents.

    Like :func:`decode_sequence` it maximises the summed log-probability of the evaluated slices
    over labellings that never go back up the order, and in addition:

    - every run of an *interior* class (all but the first and last column) spans at most
      ``max_mm`` (column ``long_class``, by default the one before the last, i.e. L5 of the
      standard classes: ``2 * max_mm``, room for a lumbarised S1 read as L5), and at least ``min_mm``
      unless it reaches the first or last slice of the series;
    - no interior class is skipped between two adjacent evaluated slices (a vertebra cannot lie
      between two neighbouring slices); across a gap of unevaluated slices a class may be skipped,
      as the boundary search has not yet looked there.

    The decoding works on the evaluated slices only, and a run's extent is bounded from both
    sides: at least the distance between its first and last evaluated slice, at most the distance
    between the unevaluated slices next to its evaluated neighbours (all plus one slice spacing).
    With every slice evaluated both are the run's true extent. Unevaluated slices then take the
    level of the nearer evaluated slice (the superior one on a tie), as in :func:`label_series`.

    The work is O(m * w * k) for m evaluated slices, k classes and w the most evaluated slices an
    interior run may hold; every labelling into the first class is allowed, so one always exists.

    Args:
        log_probs: ``(n, k)`` log-probabilities, rows superior -> inferior; rows of unevaluated
            slices are ignored (they may hold anything finite).
        z_mm: ``(n,)`` slice positions, monotone.
        evaluated: ``(n,)`` bool, default all True; at least one True.
        min_mm: Lower extent bound of a complete interior run.
        max_mm: Upper extent bound of an interior run; ``inf`` falls back to
            :func:`decode_sequence` (order only).
        long_class: Column whose run may span ``2 * max_mm`` (negative: from the end), or None;
            :func:`long_class_index` gives it for a card's classes.

    Returns:
        ``(n,)`` int64 class indices, non-decreasing.
    """
    scores_all = np.asarray(log_probs, dtype=np.float64)
    n, k = scores_all.shape
    z = np.asarray(z_mm, dtype=np.float64)
    mask = np.ones(n, dtype=bool) if evaluated is None else np.asarray(evaluated, dtype=bool)
    ev = np.flatnonzero(mask)
    if not np.isfinite(max_mm) or k < 3:
        filled = np.where(mask[:, None], scores_all, 0.0)
        return _split_gaps(decode_sequence(filled), mask)
    m = len(ev)
    s = scores_all[ev]
    spacing = float(np.median(np.abs(np.diff(z)))) if n > 1 else 0.0
    cum = np.vstack([np.zeros(k), np.cumsum(s, axis=0)])  # cum[i] = sum of evaluated rows < i
    zev = z[ev]
    rows = np.arange(m)
    # the unevaluated slices next to each evaluated one's neighbours (a run's farthest possible ends)
    outer_above = np.where(rows > 0, z[np.clip(np.r_[0, ev[:-1]] + 1, 0, n - 1)], np.nan)
    outer_below = np.where(rows < m - 1, z[np.clip(np.r_[ev[1:], n] - 1, 0, n - 1)], np.nan)
    gap_above = np.r_[False, np.diff(ev) > 1]  # unevaluated slices between evaluated i-1 and i
    upper = np.full(k, np.inf)
    lower = np.zeros(k)
    upper[1 : k - 1] = max_mm
    if long_class is not None and 0 < long_class % k < k - 1:
        upper[long_class % k] = 2.0 * max_mm
    lower[1 : k - 1] = min_mm
    neg = -np.inf

    # Every start s a run ending at t may have: within the widest bound (a band of w starts).
    along = np.abs(zev - zev[0])  # non-decreasing along the series
    widest = float(upper[np.isfinite(upper)].max())
    first = np.searchsorted(along, along - (widest - spacing), side="left")
    w = int((rows - first).max()) + 1
    starts = rows[:, None] - np.arange(w)[None, :]  # (m, w): starts[t, j] = t - j
    in_band = starts >= first[:, None]
    starts = np.where(in_band, starts, 0)
    inner = np.abs(zev[:, None] - zev[starts]) + spacing  # least extent of the run starts..t
    outer = np.abs(outer_below[:, None] - outer_above[starts]) + spacing  # most extent (NaN at edges)
    outer = np.where(np.isnan(outer), np.inf, outer)
    edge = (starts == 0) | (rows == m - 1)[:, None]

    # Class by class (a run of c follows a run of c - 1, or of any class above across a gap):
    # best[t, c] is the best labelling of rows 0..t whose class-c run ends at t.
    best = np.full((m, k), neg)
    start = np.zeros((m, k), dtype=np.int64)
    prev_class = np.full((m, k), -1, dtype=np.int64)
    above_max = np.full(m, neg)  # max over classes c' < c of best[t, c'] so far
    above_arg = np.full(m, -1, dtype=np.int64)
    for c in range(k):
        prefix = np.full(m, neg)  # best labelling of rows < s before a class-c run starting at s
        prefix[0] = 0.0
        if c > 0:
            prefix[1:] = best[:-1, c - 1]
            prev_class[1:, c] = c - 1
            skip = gap_above[1:] & (above_max[:-1] > prefix[1:])
            prefix[1:] = np.where(skip, above_max[:-1], prefix[1:])
            prev_class[1:, c] = np.where(skip, above_arg[:-1], prev_class[1:, c])
        value = prefix - cum[:-1, c]  # a run s..t scores value[s] + cum[t + 1, c]
        if np.isfinite(upper[c]):
            ok = in_band & (inner <= upper[c]) & (edge | (outer >= lower[c]))
            cand = np.where(ok, value[starts], neg)
            j = np.argmax(cand, axis=1)
            best[:, c] = cand[rows, j] + cum[1:, c]
            start[:, c] = starts[rows, j]
        else:
            running = np.maximum.accumulate(value)
            best[:, c] = running + cum[1:, c]
            start[:, c] = np.maximum.accumulate(np.where(value == running, rows, 0))
        if c > 0:
            better = best[:, c - 1] > above_max
            above_max = np.where(better, best[:, c - 1], above_max)
            above_arg = np.where(better, c - 1, above_arg)

    labels_ev = np.empty(m, dtype=np.int64)
    c = int(np.argmax(best[m - 1]))
    t = m - 1
    while t >= 0:
        s0 = int(start[t, c])
        labels_ev[s0 : t + 1] = c
        if s0 > 0:
            c = int(prev_class[s0, c])
        t = s0 - 1
    out = np.empty(n, dtype=np.int64)
    # unevaluated slices: the level of the evaluated slice below, then each gap split at its middle
    out[ev] = labels_ev
    nxt = np.searchsorted(ev, np.arange(n))
    below = labels_ev[np.clip(nxt, 0, m - 1)]
    out[~mask] = below[~mask]
    return _split_gaps(out, mask)


def log_evidence(probs: np.ndarray, evaluated: np.ndarray) -> np.ndarray:
    """Log-probabilities for the decoders: clipped to ``[1e-7, 1]`` on evaluated rows, 0 (no
    evidence) on the others, whatever they hold (NaN included)."""
    probs = np.asarray(probs)
    mask = np.asarray(evaluated, dtype=bool)
    out = np.zeros(probs.shape, dtype=np.float64)
    out[mask] = np.log(np.clip(probs[mask].astype(np.float64), _MIN_PROB, 1.0))
    return out


def long_class_index(classes: Sequence[str]) -> int | None:
    """The column of ``classes`` whose run :func:`decode_levels` lets span twice the longest level:
    L5 (a lumbarised S1 read as L5 is two vertebrae), where the card has it between its first and
    last class; otherwise None."""
    names = tuple(classes)
    if "L5" in names and 0 < names.index("L5") < len(names) - 1:
        return names.index("L5")
    return None


def label_series(
    probs: np.ndarray,
    z_mm: np.ndarray,
    classes: Sequence[str] = CLASSES,
    evaluated: np.ndarray | None = None,
    thresholds: LevelThresholds = LevelThresholds(),
) -> SeriesLevels:
    """Decode one series' slice probabilities into ordered levels, the L3 pick and flags.

    Slices the model did not run on (``evaluated`` False) carry no evidence: their log-probability
    row is all zeros, so they take their level from the order of their neighbours. Between two
    evaluated slices of different levels, an unevaluated slice takes the level of the nearer one
    (the superior one on a tie), so that sampling every few slices does not move the run boundaries;
    before the first and after the last evaluated slice it takes that slice's level. Confidence and
    order conflicts are judged over evaluated slices only.

    The labelling is :func:`decode_levels` with the thresholds' extent bounds: ordered, and every
    interior level (L1-L5 with the standard classes) between ``level_min_mm`` and ``level_max_mm``
    long. The extent of a run of slices is ``|z_last - z_first|`` plus the median slice spacing, so that a
    single slice counts as one spacing thick. With a single slice there is no spacing to measure and
    every extent is 0 mm; such a run touches both ends of the series, so it is never 'short_l3'.

    Flags (see :class:`LevelThresholds` for the thresholds):

    - ``l3_not_in_fov``: no slice decodes to L3; the ``l3_*`` fields are None.
    - ``low_confidence``: mean L3 probability over the evaluated slices of the L3 run is below
      ``low_confidence`` (also raised when the run holds no evaluated slice).
    - ``short_l3``: the L3 run is complete (touches neither the first nor the last slice) and its
      extent is below ``short_l3_mm``.
    - ``long_l3``: the L3 run's extent is above ``long_l3_mm`` (complete or not).
    - ``l3_at_fov_edge``: the L3 run touches the first or the last slice of a series of two or more
      slices: L3 may go on beyond the field of view (a chest CT ending in the upper lumbar spine), so
      the pick, the middle of the run that is seen, need not be the middle of L3.
    - ``order_conflict``: more than ``order_conflict_fraction`` of the evaluated slices, and at
      least 2, have an argmax different from their decoded level.
    - ``possible_transitional``: the labelling holds L4 and S but no L5, or the L5 run's extent is
      above ``transitional_ratio`` times the mean extent of the complete L1-L4 runs present.
    - ``skipped_level``: a card class strictly between two decoded classes does not occur (e.g. L2
      and L4 but no L3). Classes the card does not name are not missed.
    - ``extents_enforced``: the labelling that keeps only the order (:func:`decode_sequence`)
      differs on an evaluated slice from the reported one, which also keeps the extent bounds
      (:func:`decode_levels`, ``level_min_mm``/``level_max_mm``): the model's own ordered answer had
      a level too short, too long or skipped, so the reported boundaries rest on the anatomical
      prior as much as on the image.

    Args:
        probs: ``(n, k)`` probabilities, ``k == len(classes)``, rows ordered superior -> inferior.
            Rows of unevaluated slices may hold NaN. Values are clipped to ``[1e-7, 1]`` before the
            log.
        z_mm: ``(n,)`` slice positions in mm along the series, monotone (ascending or descending).
        classes: The model card's classes, in the order of the columns of ``probs``.
        evaluated: ``(n,)`` bool, True where the model ran on the slice; default all True.
        thresholds: When to raise flags.

    Returns:
        The decoded levels, the raw argmax, the L3 run and pick, the classes present and the flags.

    Raises:
        CardError: If ``classes`` fails :func:`validate_classes`.
        ValueError: If the shapes disagree, the series is empty, no slice was evaluated, an
            evaluated row is not finite, or ``z_mm`` is not finite and monotone.
    """
    names = validate_classes(classes)
    probs_arr, z, mask = _check_inputs(probs, z_mm, evaluated, len(names))
    n = probs_arr.shape[0]

    log_probs = log_evidence(probs_arr, mask)
    decoded = decode_levels(log_probs, z, mask, thresholds.level_min_mm, thresholds.level_max_mm, long_class_index(names))
    # without an upper extent bound decode_levels is the order-only decoding itself
    order_only = _split_gaps(decode_sequence(log_probs), mask) if np.isfinite(thresholds.level_max_mm) else decoded

    argmax = np.argmax(np.where(mask[:, None], probs_arr, 0.0), axis=1)
    level_argmax = tuple(names[int(a)] if m else None for a, m in zip(argmax, mask))
    levels = tuple(names[int(c)] for c in decoded)
    present_idx = np.unique(decoded)
    levels_present = tuple(names[int(c)] for c in present_idx)

    spacing = float(np.median(np.abs(np.diff(z)))) if n > 1 else 0.0
    runs = _runs(decoded)
    flags: set[str] = set()

    l3 = names.index("L3")
    l3_first = l3_last = l3_index = None
    if l3 in runs:
        l3_first, l3_last = runs[l3]
        l3_index = (l3_first + l3_last) // 2
        extent = _extent(z, l3_first, l3_last, spacing)
        in_run = mask[l3_first : l3_last + 1]
        if not in_run.any():
            flags.add("low_confidence")
        else:
            confidence = float(np.mean(probs_arr[l3_first : l3_last + 1][in_run, l3]))
            if confidence < thresholds.low_confidence:
                flags.add("low_confidence")
        if _complete(l3_first, l3_last, n) and extent < thresholds.short_l3_mm:
            flags.add("short_l3")
        if extent > thresholds.long_l3_mm:
            flags.add("long_l3")
        if n > 1 and not _complete(l3_first, l3_last, n):
            flags.add("l3_at_fov_edge")
    else:
        flags.add("l3_not_in_fov")

    if (order_only[mask] != decoded[mask]).any():
        flags.add("extents_enforced")

    conflicts = int(np.count_nonzero(argmax[mask] != decoded[mask]))
    if conflicts >= 2 and conflicts / int(mask.sum()) > thresholds.order_conflict_fraction:
        flags.add("order_conflict")

    if _possibly_transitional(names, runs, z, spacing, n, thresholds.transitional_ratio):
        flags.add("possible_transitional")

    lowest, highest = int(present_idx[0]), int(present_idx[-1])
    if len(present_idx) < highest - lowest + 1:
        flags.add("skipped_level")

    return SeriesLevels(
        levels=levels,
        level_argmax=level_argmax,
        l3_index=l3_index,
        l3_first_index=l3_first,
        l3_last_index=l3_last,
        levels_present=levels_present,
        flags=tuple(sorted(flags)),
    )


def _check_inputs(
    probs: np.ndarray, z_mm: np.ndarray, evaluated: np.ndarray | None, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and convert the arrays given to :func:`label_series`.

    Returns:
        ``probs`` as float64 ``(n, k)``, ``z_mm`` as float64 ``(n,)`` and the evaluated mask as bool
        ``(n,)``.
    """
    probs_arr = np.asarray(probs, dtype=np.float64)
    if probs_arr.ndim != 2 or probs_arr.shape[1] != k:
        raise ValueError(
            f"probs must have shape (slices, {k}) to match the card's {k} classes, "
            f"got {probs_arr.shape}"
        )
    n = probs_arr.shape[0]
    if n == 0:
        raise ValueError("the series has no slices")
    z = np.asarray(z_mm, dtype=np.float64)
    if z.shape != (n,):
        raise ValueError(f"z_mm must have shape ({n},) to match probs, got {z.shape}")
    if evaluated is None:
        mask = np.ones(n, dtype=bool)
    else:
        mask = np.asarray(evaluated)
        if mask.shape != (n,):
            raise ValueError(f"evaluated must have shape ({n},) to match probs, got {mask.shape}")
        if mask.dtype != np.bool_:
            raise ValueError(f"evaluated must be a bool array, got dtype {mask.dtype}")
    if not mask.any():
        raise ValueError("no evaluated slice")
    if not np.isfinite(probs_arr[mask]).all():
        bad = int(np.flatnonzero(~np.isfinite(probs_arr).all(axis=1) & mask)[0])
        raise ValueError(f"probs of evaluated slice {bad} are not finite")
    if not np.isfinite(z).all():
        raise ValueError("z_mm holds non-finite slice positions")
    steps = np.diff(z)
    if not ((steps >= 0).all() or (steps <= 0).all()):
        raise ValueError("z_mm is not monotone; order the slices along the slice normal first")
    return probs_arr, z, mask


def _split_gaps(decoded: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Move each level change inside a gap of unevaluated slices to the middle of the gap.

    :func:`decode_sequence` gives every unevaluated slice the level of the slice below it, which is
    as good as any other ordered choice (those slices carry no evidence) but would shift every
    boundary towards the superior end when slices are sampled. Here each unevaluated slice between
    two evaluated slices of different levels takes the level of the nearer one, the superior one on
    a tie. The labelling stays ordered and its score is unchanged.
    """
    out = decoded.copy()
    evaluated_rows = np.flatnonzero(mask)
    for above, below in zip(evaluated_rows[:-1], evaluated_rows[1:]):
        gap = int(below - above - 1)
        if gap > 0 and out[above] != out[below]:
            out[above + 1 : above + 1 + (gap + 1) // 2] = out[above]
    return out


def _runs(decoded: np.ndarray) -> dict[int, tuple[int, int]]:
    """Map each class index in a non-decreasing labelling to its (first, last) slice index."""
    classes, first = np.unique(decoded, return_index=True)
    _, last_reversed = np.unique(decoded[::-1], return_index=True)
    last = len(decoded) - 1 - last_reversed
    return {int(c): (int(f), int(e)) for c, f, e in zip(classes, first, last)}


def _extent(z: np.ndarray, first: int, last: int, spacing: float) -> float:
    """Extent in mm of the run of slices ``first..last``: their distance plus one slice spacing."""
    return abs(float(z[last]) - float(z[first])) + spacing


def _complete(first: int, last: int, n: int) -> bool:
    """Whether a run lies wholly inside the series, so that its full length is seen."""
    return first > 0 and last < n - 1


def _possibly_transitional(
    names: tuple[str, ...],
    runs: dict[int, tuple[int, int]],
    z: np.ndarray,
    spacing: float,
    n: int,
    ratio: float,
) -> bool:
    """Whether the decoded labelling hints at a lumbosacral transitional vertebra."""
    present = {names[c] for c in runs}
    if "L5" not in present:
        # Straight from L4 to S: L5 may be sacralised (only meaningful if the model can say L5).
        return "L5" in names and "L4" in present and "S" in present
    reference = [
        _extent(z, *runs[names.index(name)], spacing)
        for name in _REFERENCE_LUMBAR
        if name in present and _complete(*runs[names.index(name)], n)
    ]
    if not reference:
        return False
    l5_extent = _extent(z, *runs[names.index("L5")], spacing)
    return l5_extent > ratio * float(np.mean(reference))


def l3_definition(thresholds: LevelThresholds) -> str:
    """The one-sentence description of the L3 pick and its flags written to ``run.json``."""
    t = thresholds
    return (
        "l3_index is the middle slice ((first + last) // 2, ties to the superior slice, slice 0 "
        "most superior) of the run of slices decoded as L3 by the maximum-log-probability "
        "labelling that keeps the anatomical order T, L1-L5, S from superior to inferior"
        + (
            f" and keeps every run of a class between the card's first and last between "
            f"{t.level_min_mm:g} mm (unless cut by the field of view) and {t.level_max_mm:g} mm "
            f"(L5: {2 * t.level_max_mm:g} mm), skipping none between adjacent "
            "evaluated slices"
            if np.isfinite(t.level_max_mm)
            else ""
        )
        + ", where "
        "unevaluated slices carry no evidence and take the level of the nearer evaluated slice, "
        "and a run's extent is |z_last - z_first| plus the median slice spacing; "
        "flags: l3_not_in_fov = no slice decoded as L3 (l3 fields null); "
        "low_confidence = mean L3 probability over the evaluated slices of the L3 run < "
        f"{t.low_confidence:g}; "
        f"short_l3 = L3 run touching neither end of the series with extent < {t.short_l3_mm:g} mm; "
        f"long_l3 = L3 run extent > {t.long_l3_mm:g} mm; "
        "l3_at_fov_edge = L3 run touching the first or last slice of a series of 2 or more slices; "
        f"order_conflict = more than {t.order_conflict_fraction:.0%} of the evaluated slices "
        "(and at least 2) have an argmax different from their decoded level; "
        "possible_transitional = L4 and S decoded without L5, or L5 run extent > "
        f"{t.transitional_ratio:g} x the mean extent of the L1-L4 runs touching neither end; "
        "skipped_level = a class between two decoded classes is not decoded "
        "(e.g. L2 and L4 without L3); "
        "extents_enforced = the labelling that keeps the order only differs on an evaluated slice "
        "from the one that also keeps the extents."
    )


L3_DEFINITION: str = l3_definition(LevelThresholds())
"""How ``l3_index`` is chosen and what each flag means (default thresholds), for ``run.json``."""
