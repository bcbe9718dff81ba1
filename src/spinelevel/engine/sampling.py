"""Which slices of a series the model sees: all of them, or a sparse boundary search.

Levels along a series are ordered (``T* L1* ... S*``), so the labelling of every slice follows from
the few slices around each level boundary. The sparse search:

1. evaluates slices at a coarse stride chosen in millimetres (always the first and last slice);
2. decodes the order over the evaluated slices with the same extent bounds as the final labelling
   (:func:`spinelevel.levels.decode_levels`);
3. bisects every gap between two neighbouring evaluated slices whose decoded levels differ, until
   each boundary lies between two adjacent slices; a monotone sequence cannot hide a level between
   two samples of the same level, so nothing is missed that the model would have seen;
4. where an evaluated slice looks doubtful (its argmax disagrees with the decoded order, or its top
   probability is low), evaluates its nearest unevaluated neighbour on each side and searches again,
   round after round, so that every doubtful stretch (typically the few slices where the model
   hesitates between two levels at a boundary) grows until it is evaluated end to end and bounded by
   confident, consistent slices; there the decoding has the same evidence as a full pass. A series
   that needs more than ``max_fraction`` of its slices is evaluated in full;
5. (``exact_l3``, when the sampler knows the class names) once the search has settled, if the L3
   run or its borders are doubtful (any flag of :func:`spinelevel.levels.label_series`, or a
   doubtful evaluated slice between the L2/L3 and L3/L4 boundaries), evaluates every slice from the
   last confident, consistent slice above the L3 run to the first one below it, and searches again:
   where the model hesitates, the L3 pick rests on every slice a full pass would have used (issue 17:
   a 5 mm series whose sparse pick was 2 slices off the full one).

Unevaluated slices take their level from the decoded order (``label_series`` with ``evaluated``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from spinelevel.levels import LevelThresholds, decode_levels, label_series, log_evidence, long_class_index

__all__ = ["SamplingOptions", "SeriesSampler", "resolve_mode"]

Mode = Literal["auto", "full", "sparse"]


@dataclass(frozen=True)
class SamplingOptions:
    """How many slices the model sees."""

    # 'full' (every slice), 'sparse' (boundary search) or 'auto' (sparse on CPU backends, full on GPU).
    mode: Mode = "auto"
    # Coarse stride of the sparse search in mm (a lumbar vertebra with its disc is about 30-40 mm).
    # 25 mm and 0.8 below were chosen with benchmarks/sparse_replay.py on phantom studies that were
    # neither training nor test data of the demo model (BENCHMARKS.md, "Sparse settings").
    stride_mm: float = 25.0
    # An evaluated slice whose top probability is below this is 'doubtful' and gets neighbours.
    min_confidence: float = 0.8
    # Rounds of growing doubtful stretches by one slice on each side; bounds the slices spent on
    # one stretch to about twice this.
    densify_rounds: int = 8
    # Above this fraction of evaluated slices a series is simply evaluated in full.
    max_fraction: float = 0.6
    # Where the L3 run or its borders are doubtful, evaluate every slice from the L2/L3 to the L3/L4
    # boundary (step 5 above). Off by default: on the 30 held-out phantom series of the demo model it
    # doubled the slices seen (13 % -> 28 %) and changed no pick (30/30 equal to full either way);
    # --exact-l3 turns it on where the model hesitates more.
    exact_l3: bool = False


def resolve_mode(mode: Mode, gpu_backend: bool) -> Literal["full", "sparse"]:
    """'auto' -> 'full' on GPU backends (the model is cheap there), 'sparse' on CPU backends."""
    if mode == "auto":
        return "full" if gpu_backend else "sparse"
    return mode


class SeriesSampler:
    """The sampling state of one series: asks for slices, receives their probabilities.

    Usage: ``initial()`` once, then ``update()`` with results (and ``unavailable()`` for slices that
    could not be decoded), then ``next()`` until it returns no index.
    """

    def __init__(
        self,
        z_mm: np.ndarray,
        n_classes: int,
        mode: Literal["full", "sparse"],
        options: SamplingOptions = SamplingOptions(),
        classes: tuple[str, ...] | None = None,
        thresholds: LevelThresholds = LevelThresholds(),
    ) -> None:
        """``classes`` (names in anatomical order) and ``thresholds`` enable the exact-L3 step."""
        self.z = np.asarray(z_mm, dtype=np.float64)
        self.classes = tuple(classes) if classes is not None and "L3" in classes else None
        self.thresholds = thresholds
        self.n = len(self.z)
        self.mode = mode
        self.options = options
        self.probs = np.full((self.n, n_classes), np.nan, dtype=np.float32)
        self.evaluated = np.zeros(self.n, dtype=bool)
        self.failed = np.zeros(self.n, dtype=bool)
        self.requested = np.zeros(self.n, dtype=bool)
        self._densified = 0
        # the decoding of the evaluated slices, kept until new probabilities arrive
        self._decoding: tuple[np.ndarray, np.ndarray] | None = None
        spacing = float(np.median(np.abs(np.diff(self.z)))) if self.n > 1 else 1.0
        self.step = max(1, int(round(options.stride_mm / spacing))) if spacing > 0 else 1

    # -- protocol ---------------------------------------------------------------------------

    def initial(self) -> list[int]:
        """The first slices to evaluate."""
        if self.mode == "full" or self.n <= 3:
            idx = list(range(self.n))
        else:
            idx = sorted(set(range(0, self.n, self.step)) | {self.n - 1})
        return self._request(idx)

    def update(self, indices: list[int] | np.ndarray, probs: np.ndarray) -> None:
        """Probabilities of evaluated slices."""
        idx = np.asarray(indices, dtype=np.intp)
        self.probs[idx] = probs
        self.evaluated[idx] = True
        self._decoding = None

    def unavailable(self, indices: list[int]) -> None:
        """Slices that could not be decoded: never asked for again."""
        self.failed[np.asarray(indices, dtype=np.intp)] = True
        self._decoding = None

    def next(self) -> list[int]:
        """More slices to evaluate, or [] when the series is settled."""
        if self.mode == "full":
            return []
        fresh = self._bisect()
        if fresh:
            return self._request(fresh)
        if self._densified < self.options.densify_rounds:
            self._densified += 1
            fresh = sorted({j for i in self._doubtful() for j in (self._neighbour(i, -1), self._neighbour(i, 1)) if j is not None})
            if fresh and self.evaluated.sum() + len(fresh) > self.options.max_fraction * self.n:
                fresh = [i for i in range(self.n) if self._open(i)]
            fresh = self._request(fresh)
            if fresh:
                return fresh
        return self._request(self._exact_l3())

    # -- internals --------------------------------------------------------------------------

    def _open(self, i: int) -> bool:
        return not (self.requested[i] or self.failed[i])

    def _neighbour(self, i: int, direction: int) -> int | None:
        """The next slice from ``i`` in ``direction`` that can still be asked for, skipping broken
        ones; None when that side is already evaluated (or the series ends)."""
        j = i + direction
        while 0 <= j < self.n and self.failed[j]:
            j += direction
        if 0 <= j < self.n and self._open(j):
            return j
        return None

    def _request(self, idx: list[int]) -> list[int]:
        out = [i for i in idx if self._open(i)]
        self.requested[out] = True
        return out

    def _decoded(self) -> tuple[np.ndarray, np.ndarray]:
        """Indices of evaluated slices and their decoded class indices."""
        if self._decoding is None:
            self._decoding = self._decode()
        return self._decoding

    def _decode(self) -> tuple[np.ndarray, np.ndarray]:
        ev = np.flatnonzero(self.evaluated)
        if len(ev) == 0:
            return ev, ev
        logp = log_evidence(self.probs, self.evaluated)
        t = self.thresholds
        long = long_class_index(self.classes) if self.classes is not None else -2
        return ev, decode_levels(logp, self.z, self.evaluated, t.level_min_mm, t.level_max_mm, long)[ev]

    def _bisect(self) -> list[int]:
        ev, dec = self._decoded()
        fresh: list[int] = []
        for k in range(len(ev) - 1):
            a, b = int(ev[k]), int(ev[k + 1])
            if b - a <= 1 or dec[k] == dec[k + 1]:
                continue
            candidates = [i for i in range(a + 1, b) if self._open(i)]
            if not candidates:
                continue
            mid = (a + b) / 2.0
            fresh.append(min(candidates, key=lambda i: (abs(i - mid), i)))
        return fresh

    def _doubtful_mask(self) -> tuple[np.ndarray, np.ndarray]:
        """Evaluated indices and whether each is doubtful (argmax off the decoded order, or unsure)."""
        ev, dec = self._decoded()
        if len(ev) == 0:
            return ev, np.zeros(0, dtype=bool)
        p = self.probs[ev]
        return ev, (np.argmax(p, axis=1) != dec) | (p.max(axis=1) < self.options.min_confidence)

    def _doubtful(self) -> list[int]:
        ev, bad = self._doubtful_mask()
        return [int(i) for i in ev[bad]]

    def _exact_l3(self) -> list[int]:
        """Every open slice from the L2/L3 to the L3/L4 boundary when the L3 run is doubtful."""
        if self.mode != "sparse" or not self.options.exact_l3 or self.classes is None or not self.evaluated.any():
            return []
        levels = label_series(self.probs, self.z, self.classes, self.evaluated, self.thresholds)
        if levels.l3_first_index is not None:
            first, last = sorted((int(levels.l3_first_index), int(levels.l3_last_index)))  # type: ignore[arg-type]
        else:  # no L3 decoded: the gap between the last L2 and the first L4 slice, if both are there
            l3 = self.classes.index("L3")
            below = [i for i, lv in enumerate(levels.levels) if lv in self.classes[:l3]]
            above = [i for i, lv in enumerate(levels.levels) if lv in self.classes[l3 + 1 :]]
            if not below or not above:
                return []
            # the levels are ordered along the series, so the two sides do not interleave
            first, last = (max(below), min(above)) if max(below) < min(above) else (max(above), min(below))
        ev, bad = self._doubtful_mask()
        sure = set(int(i) for i in ev[~bad])
        def _edge(steps: range, end: int) -> int:
            # out from the run to where two adjacent evaluated slices are confident, consistent and
            # not L3 (one such slice inside a hesitant stretch is chance); unevaluated slices there
            # are asked for, and the next round looks again
            run = 0
            for i in steps:
                run = run + 1 if i in sure and levels.levels[i] != "L3" else 0
                if run == 2:
                    return i
            return end

        lo = _edge(range(first - 1, -1, -1), 0)
        hi = _edge(range(last + 1, self.n), self.n - 1)
        inside = (ev >= lo) & (ev <= hi)
        if not levels.flags and not bad[inside].any():
            return []
        return [i for i in range(lo, hi + 1) if self._open(i)]
