"""Resolution augmentation of ``--augment domain-coarse`` (no torch needed): a phantom slice re-sampled
to coarser pixels and back must look to the model as a real coarse reconstruction of the same anatomy
looks after the engine's preprocessing, and the other draws must stay those of ``--augment domain``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from spinelevel.engine.preprocess import PreprocessSpec, preprocess_slice
from spinelevel.training.augment import DOMAIN_COARSE, DOMAIN_RANDOMISATION, AugmentParams, augment_hu, coarsen, draw_params


def _anatomy(n: int = 256) -> np.ndarray:
    """A body of soft tissue with a ring of cortical bone, trabecular dots and fine structure: detail
    at one and two pixels that a coarser reconstruction cannot keep."""
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    c = (n - 1) / 2.0
    r = np.hypot(y - c, x - c)
    hu = np.full((n, n), -1000.0, dtype=np.float32)
    hu[r < 0.45 * n] = 40.0
    ring = np.abs(np.hypot(y - 0.62 * n, x - c) - 0.08 * n) < 2.0
    hu[ring] = 900.0
    rng = np.random.default_rng(1)
    dots = (rng.random((n, n)) < 0.08) & (np.hypot(y - 0.62 * n, x - c) < 0.07 * n)
    hu[dots] = 400.0
    hu[(r < 0.4 * n) & (x.astype(int) % 2 == 0) & (y > 0.25 * n) & (y < 0.35 * n)] = -100.0  # 1 px fat stripes
    return hu


def _block_mean(hu: np.ndarray, k: int) -> np.ndarray:
    h, w = hu.shape
    return hu[: h // k * k, : w // k * k].reshape(h // k, k, w // k, k).mean(axis=(1, 3)).astype(np.float32)


def test_other_draws_are_those_of_domain() -> None:
    coarse = 0
    for i in range(400):
        a = draw_params(DOMAIN_RANDOMISATION, np.random.default_rng(i))
        b = draw_params(DOMAIN_COARSE, np.random.default_rng(i))
        assert dataclasses.replace(b, coarse_factor=1.0) == a
        if b.coarse_factor != 1.0:
            coarse += 1
            assert DOMAIN_COARSE.coarse_factor[0] <= b.coarse_factor <= DOMAIN_COARSE.coarse_factor[1]
    assert abs(coarse / 400 - DOMAIN_COARSE.coarse) < 0.06


def test_coarsen_keeps_the_matrix_and_the_tissue() -> None:
    hu = _anatomy()
    out = coarsen(hu, 2.0)
    assert out.shape == hu.shape and out.dtype == np.float32
    flat = np.full((100, 80), 40.0, dtype=np.float32)
    np.testing.assert_allclose(coarsen(flat, 2.3), flat, atol=1e-3)
    # the body's mean HU stays (a reconstruction does not add or lose matter), the fine stripes go
    body = np.hypot(*(np.mgrid[0:256, 0:256] - 127.5)) < 0.3 * 256
    assert abs(float(out[body].mean() - hu[body].mean())) < 5.0
    stripes = hu[70:85, 60:196]
    assert float(out[70:85, 60:196].std()) < 0.3 * float(stripes.std())
    # factor 1 (and what rounds to the same matrix) is the identity
    np.testing.assert_array_equal(coarsen(hu, 1.001), hu)


def test_coarsened_phantom_looks_like_a_real_coarse_reconstruction_to_the_model() -> None:
    """The point of the augmentation: the same anatomy at 1.5 mm and at 3 mm (block means of 2 x 2
    pixels, as a 3 mm reconstruction averages) enlarged by the engine to 256 px differ; the 1.5 mm
    slice coarsened by 2 is much nearer the 3 mm one than the 1.5 mm slice is. (Measured without the
    field of view of preprocessing 2, whose padding rounds to whole pixels of each matrix and so
    shifts the two by up to half a coarse pixel: the comparison is of content, not of placement.)"""
    spec = PreprocessSpec(windows=((40.0, 400.0), (400.0, 1800.0), (-600.0, 1500.0)), input_size=(256, 256))
    hu = _anatomy()
    real_coarse = preprocess_slice(_block_mean(hu, 2), spec)
    gap_plain = float(np.abs(preprocess_slice(hu, spec) - real_coarse).mean())
    gap_augmented = float(np.abs(preprocess_slice(coarsen(hu, 2.0), spec) - real_coarse).mean())
    assert gap_plain > 0.005  # measured 0.0125
    assert gap_augmented < 0.35 * gap_plain  # measured 0.0029


def test_augment_hu_applies_it_before_the_noise() -> None:
    hu = _anatomy(128)
    p = AugmentParams(0.0, 1.0, False, False, coarse_factor=2.0)
    np.testing.assert_array_equal(augment_hu(hu, p), coarsen(hu, 2.0))
    noisy = AugmentParams(0.0, 1.0, False, False, noise_hu=20.0, noise_seed=3, coarse_factor=2.0)
    diff = augment_hu(hu, noisy) - coarsen(hu, 2.0)
    assert 15.0 < float(diff.std()) < 25.0  # the noise is added after: not smoothed away


def test_cli_knows_domain_coarse() -> None:
    from spinelevel.cli.train import _augment_spec

    assert _augment_spec("domain-coarse", False) == DOMAIN_COARSE
    assert _augment_spec("domain-coarse", True).enabled is False


@pytest.mark.parametrize("factor", [1.3, 2.6])
def test_coarsen_of_non_square_slices(factor: float) -> None:
    hu = _anatomy()[:, 40:220]  # a field-of-view crop of the augmentation comes first
    out = coarsen(hu, factor)
    assert out.shape == hu.shape
    assert np.isfinite(out).all()
