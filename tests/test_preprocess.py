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


def test_version_2_pads_to_a_centred_air_square() -> None:
    from spinelevel.card import ModelCard
    from spinelevel.engine.preprocess import PreprocessSpec, pad_square, preprocess_slice

    card = ModelCard(input_size=(16, 16), windows=((40.0, 400.0), (-600.0, 1500.0)), mean=(0.0, 0.0), std=(1.0, 1.0), preprocess=2)
    assert card.to_dict()["preprocess"] == 2 and ModelCard.from_dict(card.to_dict()).preprocess == 2
    spec = PreprocessSpec.from_card(card)
    assert spec.square
    hu = np.full((3, 6), 40.0, np.float32)
    padded = pad_square(hu)
    assert padded.shape == (6, 6)
    assert (padded[:1] == -1000).all() and (padded[4:] == -1000).all() and (padded[1:4] == 40).all()  # (6-3)//2 = 1 row above
    tall = np.full((7, 4), 40.0, np.float32)
    assert (pad_square(tall)[:, :1] == -1000).all() and (pad_square(tall)[:, 1:5] == 40).all()
    square = np.zeros((5, 5), np.float32)
    assert pad_square(square) is square
    assert np.array_equal(preprocess_slice(hu, spec), preprocess_slice(padded, PreprocessSpec.from_card(ModelCard(input_size=(16, 16), windows=card.windows, mean=card.mean, std=card.std))))


def test_unknown_preprocessing_version_is_refused() -> None:
    from spinelevel.card import ModelCard
    from spinelevel.errors import CardError

    with pytest.raises(CardError, match="preprocess 3 is not a preprocessing version"):
        ModelCard(preprocess=3)
    with pytest.raises(CardError, match="preprocess must be an integer"):
        ModelCard.from_dict({"classes": ["T", "L1", "L2", "L3", "L4", "L5", "S"], "input_size": [16, 16], "windows": [[40, 400]], "preprocess": "2"})
