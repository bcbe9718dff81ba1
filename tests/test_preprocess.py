"""Preprocessing by the card: windows, bilinear resize, normalisation (DESIGN.md 3.1)."""

from __future__ import annotations

import numpy as np
import pytest

from spinelevel.card import ModelCard
from spinelevel.engine.preprocess import PreprocessSpec, preprocess_batch, preprocess_slice, resize_bilinear, window_channels


def _slow_bilinear(img: np.ndarray, h_out: int, w_out: int) -> np.ndarray:
    """Textbook half-pixel-centre bilinear interpolation, one output pixel at a time."""
    h_in, w_in = img.shape
    out = np.zeros((h_out, w_out), dtype=np.float64)
    for i in range(h_out):
        sy = min(max((i + 0.5) * h_in / h_out - 0.5, 0.0), h_in - 1)
        y0 = int(np.floor(sy))
        y1 = min(y0 + 1, h_in - 1)
        fy = sy - y0
        for j in range(w_out):
            sx = min(max((j + 0.5) * w_in / w_out - 0.5, 0.0), w_in - 1)
            x0 = int(np.floor(sx))
            x1 = min(x0 + 1, w_in - 1)
            fx = sx - x0
            top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
            bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


def test_window_formula() -> None:
    hu = np.asarray([[-2000.0, -160.0, 40.0], [240.0, 1000.0, 3000.0]], dtype=np.float32)
    ch = window_channels(hu, ((40.0, 400.0), (400.0, 1800.0)), scale=255.0)
    assert ch.shape == (2, 2, 3) and ch.dtype == np.float32
    expected0 = np.clip((hu - (40 - 200)) / 400, 0, 1) * 255
    expected1 = np.clip((hu - (400 - 900)) / 1800, 0, 1) * 255
    np.testing.assert_allclose(ch[0], expected0, rtol=1e-6)
    np.testing.assert_allclose(ch[1], expected1, rtol=1e-6)


@pytest.mark.parametrize(("h_in", "w_in", "h_out", "w_out"), [(17, 23, 32, 32), (64, 48, 32, 32), (40, 40, 7, 13), (5, 9, 5, 9)])
def test_resize_matches_textbook_bilinear(h_in: int, w_in: int, h_out: int, w_out: int) -> None:
    rng = np.random.default_rng(0)
    img = rng.normal(size=(h_in, w_in)).astype(np.float32)
    got = resize_bilinear(img[None], (h_out, w_out))[0]
    np.testing.assert_allclose(got, _slow_bilinear(img, h_out, w_out), atol=1e-5)


def test_resize_keeps_constants_and_identity() -> None:
    img = np.full((3, 30, 50), 7.5, dtype=np.float32)
    np.testing.assert_array_equal(resize_bilinear(img, (64, 64)), 7.5)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(resize_bilinear(x, (16, 16)), x)


def test_preprocess_slice_applies_card_in_order() -> None:
    card = ModelCard(input_size=(16, 16), windows=((40.0, 400.0), (400.0, 1800.0), (-600.0, 1500.0)), scale=255.0, mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 8.0))
    spec = PreprocessSpec.from_card(card)
    rng = np.random.default_rng(2)
    hu = rng.uniform(-1100, 1500, size=(24, 20)).astype(np.float32)
    got = preprocess_slice(hu, spec)
    assert got.shape == (3, 16, 16) and got.dtype == np.float32
    for i, ((c, w), m, s) in enumerate(zip(card.windows, card.mean, card.std)):
        windowed = np.clip((hu.astype(np.float64) - (c - w / 2)) / w, 0, 1) * 255.0
        expected = (_slow_bilinear(windowed, 16, 16) - m) / s
        np.testing.assert_allclose(got[i], expected, atol=1e-3)
    batch = preprocess_batch([hu, hu[:10, :10]], spec)
    assert batch.shape == (2, 3, 16, 16)
    np.testing.assert_array_equal(batch[0], got)


def test_numpy_fallback_matches_opencv(monkeypatch) -> None:  # noqa: ANN001
    import spinelevel.engine.preprocess as pre

    if pre._cv2() is None:
        import pytest

        pytest.skip("OpenCV is not installed: only the numpy path exists here")
    rng = np.random.default_rng(3)
    for shape, size in [((3, 512, 512), (256, 256)), ((3, 37, 53), (64, 48)), ((2, 100, 80), (33, 161))]:
        x = rng.normal(size=shape).astype(np.float32) * 100
        with_cv2 = resize_bilinear(x, size)
        monkeypatch.setattr(pre, "_cv2", lambda: None)
        without = resize_bilinear(x, size)
        monkeypatch.undo()
        np.testing.assert_allclose(with_cv2, without, atol=1e-4, rtol=1e-6)


# -- preprocessing version 2: square padding with air ------------------------------------------


def test_version_1_cards_keep_the_stretching_resize() -> None:
    from spinelevel.card import ModelCard
    from spinelevel.engine.preprocess import PreprocessSpec, preprocess_slice, resize_bilinear, window_channels

    card = ModelCard.from_dict({"classes": ["T", "L1", "L2", "L3", "L4", "L5", "S"], "input_size": [16, 16], "windows": [[40, 400]], "mean": [0], "std": [1]})
    assert card.preprocess == 1 and "preprocess" not in card.to_dict()  # cards without the field: version 1
    spec = PreprocessSpec.from_card(card)
    hu = np.random.default_rng(0).normal(0, 300, (24, 40)).astype(np.float32)
    expected = resize_bilinear(window_channels(hu, spec.windows), (16, 16))
    assert np.array_equal(preprocess_slice(hu, spec), expected)


def test_version_2_crops_or_pads_to_a_fixed_field_of_view() -> None:
    from spinelevel.card import ModelCard
    from spinelevel.engine.preprocess import PreprocessSpec, fit_fov, fov_box, preprocess_slice

    card = ModelCard(input_size=(16, 16), windows=((40.0, 400.0), (-600.0, 1500.0)), mean=(0.0, 0.0), std=(1.0, 1.0), preprocess=2, fov_mm=400.0)
    assert card.to_dict()["preprocess"] == 2 and card.to_dict()["fov_mm"] == 400.0
    assert ModelCard.from_dict(card.to_dict()) == card
    spec = PreprocessSpec.from_card(card)
    assert spec.fov_mm == 400.0
    # 300 mm wide (100 px of 3 mm) and 240 mm tall (80 px): padded with air to 400 mm, centred
    hu = np.full((80, 100), 40.0, np.float32)
    assert fov_box(80, 100, (3.0, 3.0), 400.0) == (133, 133, -27, -17)
    out = fit_fov(hu, (3.0, 3.0), 400.0)
    assert out.shape == (133, 133)
    assert (out[27:107, 17:117] == 40.0).all() and out[:27].max() == -1000.0 and out[107:].max() == -1000.0
    assert (out[:, :17] == -1000).all() and (out[:, 117:] == -1000).all()
    # a 500 mm field of 512 px at 0.977 mm is cropped to its central 400 mm
    big = np.zeros((512, 512), np.float32)
    rows, cols, top, left = fov_box(512, 512, (0.9765625, 0.9765625), 400.0)
    assert (rows, cols, top, left) == (410, 410, 51, 51) and fit_fov(big, (0.9765625, 0.9765625), 400.0).shape == (410, 410)
    # non-square pixels: each axis by its own spacing
    assert fov_box(100, 100, (2.0, 4.0), 400.0)[:2] == (200, 100)
    # the same anatomy at two reconstruction diameters gives the same model input (up to resampling)
    disc = lambda n, mm: (np.hypot(*(np.mgrid[0:n, 0:n] - (n - 1) / 2) * mm) < 100.0).astype(np.float32) * 1040.0 - 1000.0  # noqa: E731
    a = preprocess_slice(disc(256, 500 / 256), spec, (500 / 256, 500 / 256))
    b = preprocess_slice(disc(180, 350 / 180), spec, (350 / 180, 350 / 180))
    assert np.abs(a - b).mean() < 0.02
    # without a PixelSpacing: the square that holds the slice
    assert fov_box(80, 100, None, 400.0) == (100, 100, -10, 0)


def test_unknown_preprocessing_version_is_refused() -> None:
    from spinelevel.card import ModelCard
    from spinelevel.errors import CardError

    with pytest.raises(CardError, match="preprocess 4 is not a preprocessing version"):
        ModelCard(preprocess=4)
    with pytest.raises(CardError, match="preprocess must be an integer"):
        ModelCard.from_dict({"classes": ["T", "L1", "L2", "L3", "L4", "L5", "S"], "input_size": [16, 16], "windows": [[40, 400]], "preprocess": "2"})


# -- preprocessing version 3: antialiasing low-pass before the resize ----------------------------


def test_antialias_sigmas_follow_the_rescale_rule() -> None:
    from spinelevel.engine.preprocess import antialias_sigmas

    assert antialias_sigmas(410, 410, (128, 128)) == pytest.approx(((410 / 128 - 1) / 2,) * 2)  # 512 px at 0.98 mm
    assert antialias_sigmas(133, 400, (128, 128)) == pytest.approx(((133 / 128 - 1) / 2, (400 / 128 - 1) / 2))
    assert antialias_sigmas(100, 128, (128, 128)) == (0.0, 0.0)  # enlarged or kept: no blur


@pytest.mark.parametrize("sigmas", [(1.1, 0.4), (0.0, 2.3), (1.5, 1.5), (3.0, 0.0)])
@pytest.mark.parametrize("opencv", [True, False])
def test_gaussian_blur_matches_scipy_reflect_101(sigmas: tuple[float, float], opencv: bool, monkeypatch) -> None:  # noqa: ANN001
    import spinelevel.engine.preprocess as pre

    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    if opencv and pre._cv2() is None:
        pytest.skip("OpenCV is not installed: only the numpy path exists here")
    if not opencv:
        monkeypatch.setattr(pre, "_cv2", lambda: None)
    x = np.random.default_rng(1).normal(0, 100, (61, 47)).astype(np.float32)
    ref = x.astype(np.float64)
    for axis, sigma in enumerate(sigmas):
        if sigma > 0:  # scipy's 'mirror' is reflect-101; truncate so that the radius is ceil(3 sigma)
            ref = scipy_ndimage.gaussian_filter1d(ref, sigma, axis=axis, mode="mirror", truncate=np.ceil(3 * sigma) / sigma)
    np.testing.assert_allclose(pre.gaussian_blur(x, sigmas), ref, atol=2e-3)
    const = np.full((20, 9), 37.0, np.float32)
    np.testing.assert_allclose(pre.gaussian_blur(const, sigmas), const, atol=1e-4)  # normalised taps


def test_version_3_blurs_before_the_windows() -> None:
    from spinelevel.engine.preprocess import antialias_sigmas, fit_fov, gaussian_blur, resize_bilinear, window_channels

    card = ModelCard(input_size=(32, 32), windows=((40.0, 400.0), (-600.0, 1500.0)), mean=(0.0, 0.0), std=(1.0, 1.0), preprocess=3, fov_mm=200.0)
    assert ModelCard.from_dict(card.to_dict()) == card and card.to_dict()["preprocess"] == 3
    spec = PreprocessSpec.from_card(card)
    assert spec.antialias and spec.fov_mm == 200.0
    assert not PreprocessSpec.from_card(ModelCard(input_size=(32, 32), preprocess=2, fov_mm=200.0)).antialias
    hu = np.random.default_rng(2).normal(40, 150, (300, 260)).astype(np.float32)  # fine noise at 0.5 mm
    box = fit_fov(hu, (0.5, 0.5), 200.0)
    expected = resize_bilinear(window_channels(gaussian_blur(box, antialias_sigmas(*box.shape, (32, 32))), spec.windows), (32, 32))
    got = preprocess_slice(hu, spec, (0.5, 0.5))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # the point of it: sampled noise is averaged away (the version-2 input keeps most of it)
    v2 = preprocess_slice(hu, PreprocessSpec.from_card(ModelCard(input_size=(32, 32), windows=card.windows, mean=(0.0, 0.0), std=(1.0, 1.0), preprocess=2, fov_mm=200.0)), (0.5, 0.5))
    assert got[0, 8:24, 8:24].std() < 0.5 * v2[0, 8:24, 8:24].std()
