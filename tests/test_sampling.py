"""The sparse boundary search against an oracle that knows every slice's level."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from spinelevel.engine.sampling import SamplingOptions, SeriesSampler, resolve_mode
from spinelevel.levels import CLASSES, LevelThresholds, label_series

K = len(CLASSES)


def _oracle(truth: np.ndarray, confidence: float = 0.9, flips: dict[int, int] | None = None) -> np.ndarray:
    probs = np.full((len(truth), K), (1 - confidence) / (K - 1), dtype=np.float32)
    probs[np.arange(len(truth)), truth] = confidence
    for i, wrong in (flips or {}).items():
        probs[i] = (1 - confidence) / (K - 1)
        probs[i, wrong] = confidence
    return probs


def _drive(sampler: SeriesSampler, probs: np.ndarray, broken: set[int] = frozenset()) -> int:
    """Answer the sampler's requests from ``probs``; returns how many rounds it took."""
    request = sampler.initial()
    rounds = 0
    while request:
        rounds += 1
        bad = [i for i in request if i in broken]
        good = [i for i in request if i not in broken]
        sampler.unavailable(bad)
        sampler.update(good, probs[good])
        request = sampler.next()
        assert rounds < 100
    return rounds


def _truth(counts: list[int]) -> np.ndarray:
    return np.repeat(np.arange(K), counts)


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 60), min_size=K, max_size=K).filter(lambda c: sum(c) >= 12),
    spacing=st.sampled_from([0.625, 1.0, 2.5, 5.0]),
    stride=st.sampled_from([10.0, 20.0, 30.0]),
)
def test_sparse_labels_equal_full_labels_for_a_consistent_model(counts: list[int], spacing: float, stride: float) -> None:
    truth = _truth(counts)
    z = -spacing * np.arange(len(truth))
    probs = _oracle(truth)
    order_only = LevelThresholds(level_max_mm=float("inf"))  # the truth may skip levels or be short
    sampler = SeriesSampler(z, K, "sparse", SamplingOptions(stride_mm=stride), thresholds=order_only)
    _drive(sampler, probs)
    sparse = label_series(sampler.probs, z, CLASSES, sampler.evaluated, order_only)
    full = label_series(probs, z, CLASSES, thresholds=order_only)
    assert sparse.levels == full.levels
    assert sparse.l3_index == full.l3_index
    # every boundary is pinned by two adjacent evaluated slices
    for i in np.flatnonzero(np.diff(truth)):
        assert sampler.evaluated[i] and sampler.evaluated[i + 1]


@settings(max_examples=40, deadline=None)
@given(
    first=st.integers(0, 6),
    last_offset=st.integers(0, 6),
    extents=st.lists(st.floats(21.0, 54.0), min_size=K, max_size=K),
    ends=st.lists(st.integers(1, 60), min_size=2, max_size=2),
    spacing=st.sampled_from([0.625, 1.0, 2.5, 5.0]),
    stride=st.sampled_from([10.0, 25.0, 30.0]),
)
def test_sparse_equals_full_with_extent_bounds(first: int, last_offset: int, extents: list[float], ends: list[int], spacing: float, stride: float) -> None:
    """The default decoding (extents kept): a consistent model on anatomically possible truth."""
    last = min(K - 1, first + last_offset)
    counts = [0] * K
    for c in range(first, last + 1):
        # runs of T and S take any length, as may the others where the field of view cuts them
        # (the first and the last run) but never above the upper bound; the others an extent
        # inside the bounds (a whole number of slices, at least 21 mm, at most 54 mm)
        whole = max(int(np.ceil(21.0 / spacing)), int(extents[c] // spacing))
        cut = ends[0] if c == first else ends[1]
        if c in (first, last):
            counts[c] = cut if c in (0, K - 1) else max(1, min(cut, int(54.0 // spacing)))
        else:
            counts[c] = whole
    truth = _truth(counts)
    z = -spacing * np.arange(len(truth))
    probs = _oracle(truth)
    sampler = SeriesSampler(z, K, "sparse", SamplingOptions(stride_mm=stride))
    _drive(sampler, probs)
    sparse = label_series(sampler.probs, z, CLASSES, sampler.evaluated)
    full = label_series(probs, z, CLASSES)
    assert full.levels == tuple(CLASSES[c] for c in truth)
    assert sparse.levels == full.levels
    assert sparse.l3_index == full.l3_index
    assert "extents_enforced" not in full.flags


def test_thin_series_evaluates_a_small_fraction() -> None:
    truth = _truth([80, 35, 35, 36, 35, 35, 60])  # 316 slices at 1 mm
    z = -1.0 * np.arange(len(truth))
    sampler = SeriesSampler(z, K, "sparse", SamplingOptions(stride_mm=20))
    rounds = _drive(sampler, _oracle(truth))
    assert sampler.evaluated.mean() < 0.15
    assert rounds <= 8


def test_doubtful_samples_get_neighbours() -> None:
    truth = _truth([40, 30, 30, 30, 30, 30, 40])
    z = -1.0 * np.arange(len(truth))
    # a coarse sample deep in L1 says L4: the order decoding overrides it, the sampler looks closer
    flips = {60: 4}
    probs = _oracle(truth, flips=flips)
    sampler = SeriesSampler(z, K, "sparse", SamplingOptions(stride_mm=20))
    _drive(sampler, probs)
    assert sampler.evaluated[60]
    assert sampler.evaluated[59] and sampler.evaluated[61]  # its neighbours were asked, and settle it
    assert label_series(sampler.probs, z, CLASSES, sampler.evaluated).levels == label_series(probs, z, CLASSES).levels


def test_low_confidence_everywhere_falls_back_to_full() -> None:
    truth = _truth([20, 10, 10, 10, 10, 10, 20])
    z = -1.0 * np.arange(len(truth))
    sampler = SeriesSampler(z, K, "sparse", SamplingOptions(stride_mm=20, min_confidence=0.95))
    _drive(sampler, _oracle(truth, confidence=0.5))
    assert sampler.evaluated.all()


def test_broken_slices_are_never_requested_twice() -> None:
    truth = _truth([40, 30, 30, 30, 30, 30, 40])
    z = -1.0 * np.arange(len(truth))
    broken = {0, 20, 69, 70, 71}
    sampler = SeriesSampler(z, K, "sparse", SamplingOptions(stride_mm=20))
    _drive(sampler, _oracle(truth), broken)
    assert not sampler.evaluated[list(broken)].any()
    assert sampler.failed[list(broken)].all()
    # the L1/L2 boundary (69|70) is pinned by the nearest decodable slices
    assert sampler.evaluated[68] and sampler.evaluated[72]


def test_full_mode_and_auto() -> None:
    z = -np.arange(30.0)
    sampler = SeriesSampler(z, K, "full")
    assert sampler.initial() == list(range(30))
    sampler.update(list(range(30)), _oracle(_truth([30, 0, 0, 0, 0, 0, 0])))
    assert sampler.next() == []
    assert resolve_mode("auto", gpu_backend=False) == "sparse"
    assert resolve_mode("auto", gpu_backend=True) == "full"
    assert resolve_mode("full", gpu_backend=False) == "full"


def test_a_hesitant_boundary_is_evaluated_end_to_end() -> None:
    # the model hesitates between L2 and L3 over seven slices around the true boundary (index 100),
    # the way real models do at a disc: sparse must decode exactly what a full pass decodes
    truth = _truth([40, 30, 30, 30, 30, 30, 40])
    z = -1.0 * np.arange(len(truth))
    probs = _oracle(truth)
    hesitation = {97: 0.55, 98: 0.45, 99: 0.6, 100: 0.48, 101: 0.4, 102: 0.52, 103: 0.35}  # P(L2)
    for i, p2 in hesitation.items():
        probs[i] = 0.0
        probs[i, 2], probs[i, 3] = p2, 1.0 - p2
    sampler = SeriesSampler(z, K, "sparse", SamplingOptions(stride_mm=20))
    _drive(sampler, probs)
    assert sampler.evaluated[96:102].all()  # the stretch grew until bounded by confident slices
    assert label_series(sampler.probs, z, CLASSES, sampler.evaluated).levels == label_series(probs, z, CLASSES).levels
    assert sampler.evaluated.mean() < 0.3


def _hesitant_l3(seed: int, spacing: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """A series whose model hesitates around L3: random L2/L3/L4 mixtures over its L3 region."""
    truth = _truth([20, 6, 7, 8, 7, 6, 4])
    probs = _oracle(truth)
    rng = np.random.default_rng(seed)
    l3 = np.flatnonzero(truth == 3)
    for i in range(l3[0] - 3, l3[-1] + 4):
        p = rng.dirichlet([1.0, 1.0, 1.0]).astype(np.float32)
        probs[i] = 0.01
        probs[i, 2:5] = p * (1 - 0.01 * (K - 3))
    return np.arange(len(truth)) * spacing, probs


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), spacing=st.sampled_from([1.0, 2.5, 5.0]))
def test_exact_l3_gives_the_full_pick_where_the_model_hesitates(seed: int, spacing: float) -> None:
    z, probs = _hesitant_l3(seed, spacing)
    full = label_series(probs, z, CLASSES)
    sampler = SeriesSampler(z, K, "sparse", SamplingOptions(stride_mm=20, exact_l3=True), classes=CLASSES)
    _drive(sampler, probs)
    sparse = label_series(sampler.probs, z, CLASSES, sampler.evaluated)
    assert sparse.l3_index == full.l3_index
    assert (sparse.l3_first_index, sparse.l3_last_index) == (full.l3_first_index, full.l3_last_index)


def test_exact_l3_costs_nothing_on_a_confident_series() -> None:
    truth = _truth([40, 10, 10, 10, 10, 10, 10])
    z, probs = np.arange(len(truth)) * 2.5, _oracle(truth)
    counts = []
    for classes in (None, CLASSES):
        sampler = SeriesSampler(z, K, "sparse", SamplingOptions(stride_mm=20, exact_l3=True), classes=classes)
        _drive(sampler, probs)
        counts.append(int(sampler.evaluated.sum()))
    assert counts[0] == counts[1]
