"""The bundled demo model: present, carded, resolvable as 'demo', and it classifies a phantom slice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spinelevel.card import read_card
from spinelevel.errors import ModelError
from spinelevel.levels import CLASSES
from spinelevel.models import bundled_models, resolve_model


def test_demo_resolves_to_the_bundled_file() -> None:
    path = resolve_model("demo")
    assert path == bundled_models()["demo"] and path.name == "levels_demo.onnx" and path.is_file()
    assert path.stat().st_size < 40e6  # small enough to ship in the package


def test_paths_win_over_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_bytes(b"x")
    assert resolve_model("demo") == Path("demo")
    assert resolve_model(tmp_path / "other.onnx") == tmp_path / "other.onnx"


def test_missing_bundled_file_is_a_model_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import spinelevel.models as models

    monkeypatch.setattr(models, "_HERE", tmp_path)
    with pytest.raises(ModelError, match="demo"):
        models.resolve_model("demo")


def test_demo_card_and_classes() -> None:
    card = read_card(resolve_model("demo"))
    assert card.classes == CLASSES
    assert card.output == "probabilities"
    assert card.extra["architecture"].startswith("tf_efficientnetv2_b0")
    assert card.input_size[0] == card.input_size[1] and 128 <= card.input_size[0] <= 256
    training = card.extra["training"]
    assert training["seed"] == 0 and training["best_epoch"] >= 1 and training["data"]["slices"] > 1000
    assert card.extra["parity"]["max_abs_diff"] <= card.extra["parity"]["tolerance"]
    model_card = resolve_model("demo").with_name("MODEL_CARD.md").read_text()
    assert "Trained on phantoms only" in model_card and "accuracy after sequence decoding" in model_card
    assert "## Real CT" in model_card and "totalseg_example_ct" in model_card
    assert card.preprocess == 2 and card.fov_mm == 400.0  # a fixed field of view (preprocessing version 2)


def test_demo_model_reads_a_phantom_lumbar_slice() -> None:
    import onnxruntime as ort

    from spinelevel.engine.preprocess import PreprocessSpec, preprocess_batch
    from spinelevel.phantom import Anatomy, PhantomOptions, plan_study

    path = resolve_model("demo")
    card = read_card(path)
    spec = plan_study(PhantomOptions(studies=1, seed=987654, size=256, coverage="chest_abdomen_pelvis"), 0)
    anatomy = Anatomy(spec)
    l3 = next(v for v in spec.vertebrae if v.name == "L3")
    z = (l3.top_z + l3.bottom_z) / 2
    x = preprocess_batch([anatomy.render(float(z))], PreprocessSpec.from_card(card), [(spec.pixel_spacing, spec.pixel_spacing)])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    p = sess.run(None, {sess.get_inputs()[0].name: x})[0][0]
    assert abs(float(p.sum()) - 1.0) < 1e-4
    # A mid-L3 slice of an unseen phantom: L3 or a neighbour, never thoracic or sacral.
    assert card.classes[int(np.argmax(p))] in ("L2", "L3", "L4")


def _script(name: str):  # noqa: ANN202 - the module
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_phantom_sensitivity_changes_the_anatomy_and_reports_every_variant(tmp_path: Path) -> None:
    # scripts/phantom_sensitivity.py (issue 14's diagnostic): every change must alter the rendered
    # mid-L3 or mid-L4 slice of some study, else a "no change in the calls" would mean nothing
    from spinelevel.phantom import Anatomy, PhantomOptions, plan_study

    mod = _script("phantom_sensitivity")
    specs = [plan_study(PhantomOptions(studies=3, seed=2000, size=256), i) for i in range(3)]
    names = [name for name, _, _ in mod.variants(specs[0])]
    assert names[0] == "base" and len(names) == len(set(names)) >= 19
    changed = dict.fromkeys(names[1:], False)
    for spec in specs:
        zs = [(spec.vertebra(lv).top_z + spec.vertebra(lv).bottom_z) / 2 for lv in mod.LEVELS]
        base = [Anatomy(spec).render(float(z)) for z in zs]
        for name, plan, change in list(mod.variants(spec))[1:]:
            a = Anatomy(plan)
            if change is not None:
                change(a)
            changed[name] |= any(np.abs(a.render(float(z)) - b).max() > 50 for z, b in zip(zs, base))
    assert all(changed.values()), [n for n, c in changed.items() if not c]
    # the script's own run: the bundled model reads the unchanged phantoms right, and the table names every variant
    out = tmp_path / "sens.json"
    assert mod.main(["--model", "demo", "--studies", "2", "--out", str(out)]) == 0
    import json

    result = json.loads(out.read_text())
    rows = {(r["slice"], r["variant"]): r for r in result["rows"]}
    assert set(rows) == {(f"mid-{lv}", n) for lv in mod.LEVELS for n in names}
    assert rows[("mid-L3", "base")]["called_right"] == 2 and rows[("mid-L4", "base")]["called_right"] == 2
    assert "| mid-L3 | kidneys 15 mm lower |" in out.with_suffix(".md").read_text()
    assert mod.main(["--model", str(tmp_path / "none.onnx")]) == 2


def test_phantom_sensitivity_thoracic_levels_get_their_own_changes(tmp_path: Path) -> None:
    # --levels T11,T12: the lung, rib and posterior-element changes must alter the mid-T11 or mid-T12
    # slice of some study; the lumbar-only changes are not offered for thoracic levels alone
    from spinelevel.phantom import Anatomy, PhantomOptions, plan_study

    mod = _script("phantom_sensitivity")
    levels = ("T11", "T12")
    specs = [plan_study(PhantomOptions(studies=3, seed=2000, size=256), i) for i in range(3)]
    names = [name for name, _, _ in mod.variants(specs[0], levels)]
    thoracic = ["lung bases 30 mm higher", "lung bases 30 mm lower", "no 11th and 12th ribs", "no ribs", "posterior elements of T11, T12 as L1"]
    assert set(thoracic) <= set(names) and not any(n.startswith(("posterior elements as", "lumbar bodies")) for n in names)
    assert not set(thoracic) & {name for name, _, _ in mod.variants(specs[0])}  # the default L3,L4 run is unchanged
    changed = dict.fromkeys(thoracic, False)
    for spec in specs:
        zs = [(spec.vertebra(lv).top_z + spec.vertebra(lv).bottom_z) / 2 for lv in levels]
        base = [Anatomy(spec).render(float(z)) for z in zs]
        for name, plan, change in mod.variants(spec, levels):
            if name in changed:
                a = Anatomy(plan)
                change(a)
                changed[name] |= any(np.abs(a.render(float(z)) - b).max() > 50 for z, b in zip(zs, base))
    assert all(changed.values()), [n for n, c in changed.items() if not c]
    out = tmp_path / "sensT.json"
    assert mod.main(["--model", "demo", "--studies", "1", "--levels", "T11,L1", "--out", str(out)]) == 0
    import json

    rows = {(r["slice"], r["variant"]): r for r in json.loads(out.read_text())["rows"]}
    assert rows[("mid-T11", "base")]["calls"] == ["T"] and rows[("mid-T11", "base")]["called_right"] == 1  # class T
    assert ("mid-L1", "posterior elements as L2") in rows and ("mid-T11", "no ribs") in rows
    assert mod.main(["--model", "demo", "--levels", "T13"]) == 2


def test_occlusion_map_finds_the_region_that_decides() -> None:
    # a predictor that says "not L3" while a bright pixel sits at (5, 6): only patches over it raise p(L3)
    mod = _script("occlusion_map")
    x = np.zeros((3, 32, 32), np.float32)
    x[:, 5, 6] = 100.0

    def predict(batch: np.ndarray) -> np.ndarray:
        bright = batch[:, 0].max(axis=(1, 2)) > 50.0
        p = np.zeros((len(batch), 7), np.float32)
        p[:, 3] = np.where(bright, 0.1, 0.9)
        p[:, 4] = 1.0 - p[:, 3]
        return p

    p0, pos, ph = mod.occlusion(x, predict, 8)
    assert p0[3] == pytest.approx(0.1) and len(pos) == 64
    gain = mod.gain_map((32, 32), pos, ph, p0, 3, 8)
    assert gain[5, 6] == pytest.approx(0.8) and gain[20:, 20:].max() == 0.0
    assert {tuple(q) for q, pp in zip(pos, ph) if pp[3] > 0.5} == {(0, 0), (0, 4), (4, 0), (4, 4)}


def test_occlusion_map_on_a_phantom_mid_l3_slice(tmp_path: Path) -> None:
    import json
    import shutil

    import pyarrow.parquet as pq

    from spinelevel.phantom import PhantomOptions, generate

    generate(tmp_path / "ph", PhantomOptions(studies=1, seed=2000, size=128, coverage="abdomen", second_recon_probability=0.0,
                                             localizer_probability=0.0, dose_report_probability=0.0))
    lab = pq.read_table(tmp_path / "ph" / "labels.parquet").to_pandas()
    l3 = lab[lab.level == "L3"].sort_values("z_mm")
    case = tmp_path / "cases" / "phantom_case" / "l3mid"
    case.mkdir(parents=True)
    shutil.copy(tmp_path / "ph" / l3.iloc[len(l3) // 2].path, case / "L3MID.dcm")
    (tmp_path / "cases" / "no_l3").mkdir()  # a case without L3 is left out
    mod = _script("occlusion_map")
    assert mod.main(["--model", "demo", "--cases", str(tmp_path / "cases"), "--out", str(tmp_path / "occ")]) == 0
    result = json.loads((tmp_path / "occ.json").read_text())
    assert [c["case"] for c in result["cases"]] == ["phantom_case"] and (tmp_path / "occ.png").is_file()
    rec = result["cases"][0]
    assert rec["p"]["L3"] > 0.5  # the bundled model reads a phantom's mid-L3 as L3
    assert -1.0 <= rec["gain_min"] <= rec["gain_max"] <= 1.0
    assert mod.main(["--model", "demo", "--cases", str(tmp_path / "cases" / "no_l3"), "--out", str(tmp_path / "x")]) == 2
