"""Spine-centred cut-outs of ``--augment domain-spine`` (no torch needed): the spine is found in
phantom slices of every region, the cut-out holds it, and the other draws stay those of ``domain``."""

from __future__ import annotations

import numpy as np
import pytest

from spinelevel.phantom import Anatomy, PhantomOptions, plan_study
from spinelevel.training.augment import DOMAIN_RANDOMISATION, DOMAIN_SPINE, AugmentParams, AugmentSpec, augment_hu, draw_params, spine_centre

LEVELS = ("T6", "T12", "L1", "L3", "L5", "S1")


def _phantom_slices(studies: int = 3):
    for i in range(studies):
        study = plan_study(PhantomOptions(size=256, seed=77, studies=studies), i)
        anatomy = Anatomy(study)
        for name in LEVELS:
            v = study.vertebra(name)
            z = (v.top_z + v.bottom_z) / 2
            x, y = anatomy.spine_center(z)
            row = (y - study.origin[1]) / study.pixel_spacing
            col = (x - study.origin[0]) / study.pixel_spacing
            yield f"study {i} {name}", anatomy.render(z), (row, col), study.pixel_spacing


def test_spine_centre_is_on_the_vertebra_in_phantom_slices() -> None:
    rows, cols = [], []
    for what, hu, (row, col), mm in _phantom_slices(8):
        found = spine_centre(hu)
        assert found is not None, what
        rows.append((found[0] - row) * mm)
        cols.append((found[1] - col) * mm)
        # never in front of the body (contrast-filled bowel, aorta, sternum, symphysis are not taken)
        assert -15.0 < rows[-1] < 60.0 and abs(cols[-1]) < 25.0, (what, rows[-1], cols[-1])
    # typically between the body's centre and the arch, on the midline
    assert 0.0 < float(np.median(rows)) < 30.0 and abs(float(np.median(cols))) < 5.0


def test_spine_cut_out_holds_the_vertebral_body() -> None:
    inside = total = 0
    rng = np.random.default_rng(5)
    for what, hu, (row, col), _ in _phantom_slices(3):
        h, w = hu.shape
        for _ in range(4):
            p = draw_params(AugmentSpec(rotation_deg=0.0, zoom=0.0, vflip=0.0, hflip=0.0, spine_crop=1.0), rng)
            out = augment_hu(hu, p)
            assert out.shape == (max(8, round(p.spine_box[0] * h)), max(8, round(p.spine_box[1] * w))), what
            r0, c0 = _offset(hu, out)
            total += 1
            inside += r0 <= row < r0 + out.shape[0] and c0 <= col < c0 + out.shape[1]
    assert inside >= 0.9 * total, (inside, total)


def _offset(full: np.ndarray, part: np.ndarray) -> tuple[int, int]:
    """Where ``part`` was cut from ``full`` (exact match)."""
    ph, pw = part.shape
    for r in range(full.shape[0] - ph + 1):
        hits = [c for c in range(full.shape[1] - pw + 1) if np.array_equal(full[r, c : c + pw], part[0])]
        for c in hits:
            if np.array_equal(full[r : r + ph, c : c + pw], part):
                return r, c
    raise AssertionError("cut-out not found in the slice")


def test_no_bone_no_cut_out() -> None:
    hu = np.full((64, 64), 40.0, np.float32)
    assert spine_centre(hu) is None
    assert augment_hu(hu, AugmentParams(0.0, 1.0, False, False, spine_box=(0.3, 0.3, 0.0, 0.0))).shape == (64, 64)


def test_domain_spine_draws_domain_plus_a_cut_out_in_a_quarter() -> None:
    boxes = 0
    n = 2000
    for i in range(n):
        a = draw_params(DOMAIN_RANDOMISATION, np.random.default_rng(i))
        b = draw_params(DOMAIN_SPINE, np.random.default_rng(i))
        if b.spine_box is None:
            assert a == b
        else:
            boxes += 1
            assert b.crop == (0.0, 1.0, 0.0, 1.0)  # the cut-out replaces the field-of-view crop
            lo_h, hi_h = DOMAIN_SPINE.spine_height
            lo_w, hi_w = DOMAIN_SPINE.spine_width
            assert lo_h <= b.spine_box[0] <= hi_h and lo_w <= b.spine_box[1] <= hi_w
            assert all(abs(v) <= DOMAIN_SPINE.spine_jitter for v in b.spine_box[2:])
            assert (a.rotation_deg, a.noise_seed, a.blur_sigma) == (b.rotation_deg, b.noise_seed, b.blur_sigma)
    assert abs(boxes / n - DOMAIN_SPINE.spine_crop) < 0.04
    assert draw_params(AugmentSpec(enabled=False), np.random.default_rng(0)).spine_box is None


def test_cli_augment_names() -> None:
    from spinelevel.cli.train import _augment_spec

    assert _augment_spec("domain-spine", False) == DOMAIN_SPINE
    assert _augment_spec("domain", False) == DOMAIN_RANDOMISATION
    assert _augment_spec("domain-spine", True).enabled is False

def test_cli_unknown_augment_names_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    import typer

    from spinelevel.cli.train import _augment_spec

    with pytest.raises(typer.Exit):
        _augment_spec("spine", False)
    assert "--augment 'spine': choose paper, domain, domain-spine or domain-coarse" in capsys.readouterr().err
