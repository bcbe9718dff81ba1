"""What a model reads the level from: its call on phantom mid-vertebra slices under one anatomical change at a time.

For each phantom study (``PhantomOptions(studies, seed)``, the held-out seed 2000 by default) the slice through
the middle of L3 and of L4 (or of the ``--levels`` given) is rendered without noise, once as planned and once
per change below, and run through the model with the engine's own preprocessing. A change that moves calls
although the vertebra is the same says the model reads the level off that structure; one that changes the
vertebra but no call says it ignores it.

Changes: psoas and paraspinal muscles x1.4 / x0.7; subcutaneous fat x1.8 / x0.5; kidneys 15 or 30 mm lower,
30 mm higher, or absent; the liver's lower edge 40 mm lower; the iliac crest 30 mm higher; the transverse colon at
its highest or lowest; the posterior elements of L3 and L4 drawn as those of L1 .. L4 (transverse processes 14,
21, 31 or 24 mm; of the lumbar levels given); the lumbar bodies x1.12 / x0.88.

``--levels`` picks the vertebrae (default L3,L4). With a thoracic one (``--levels T11,T12,L1``: where every model
so far puts the thoracolumbar junction too high on real CT) the changes also include the lung bases 30 mm higher
or lower, no 11th and 12th ribs, no ribs at all, and the posterior elements of the thoracic levels drawn as L1's.

Diagnostic only (issue 14, tests/data/real_ct/results_demo_v10.md): it writes no DICOM and trains nothing.

Usage::

    python scripts/phantom_sensitivity.py --model demo --studies 8 --out sens.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from spinelevel.card import file_sha256, read_card
from spinelevel.engine.preprocess import PreprocessSpec, preprocess_slice
from spinelevel.errors import SpineLevelError
from spinelevel.models import resolve_model
from spinelevel.phantom import PhantomOptions
from spinelevel.phantom.anatomy import Anatomy
from spinelevel.phantom.spec import StudySpec, plan_study
from spinelevel.training.labels import vertebra_class

LEVELS = ("L3", "L4")  # the default --levels

Change = Callable[[Anatomy], None] | None


def _shift_kidneys(mm: float) -> Callable[[Anatomy], None]:
    def change(a: Anatomy) -> None:
        a.kidney_l = tuple(v + mm for v in a.kidney_l)
        a.kidney_r = tuple(v + mm for v in a.kidney_r)
    return change


def _no_kidneys(a: Anatomy) -> None:
    a.kidney_l = a.kidney_r = (-9e3, -9e3 - 1.0)


def _posterior_as(number: int, levels: tuple[str, ...] = LEVELS, kind: str | None = None) -> Callable[[Anatomy], None]:
    def change(a: Anatomy) -> None:
        draw = a._posterior

        def patched(cv, vert, t, sx, sy, d):  # noqa: ANN001, ANN202 - Anatomy._posterior's arguments
            if vert.name in levels:
                vert = dataclasses.replace(vert, number=number, kind=kind or vert.kind)
            return draw(cv, vert, t, sx, sy, d)
        a._posterior = patched
    return change


def _ribs_up_to(k: int) -> Callable[[Anatomy], None]:
    def change(a: Anatomy) -> None:
        a.ribs = a.ribs[: 2 * k]  # Anatomy.ribs holds ribs 1..12, left and right of each
    return change


def _shift_lung_bases(mm: float) -> Callable[[Anatomy], None]:
    def change(a: Anatomy) -> None:
        a.lung_bottom += mm
    return change


def _lumbar_bodies(spec: StudySpec, k: float) -> StudySpec:
    vs = tuple(dataclasses.replace(v, half_width=v.half_width * k, half_depth=v.half_depth * k) if v.kind == "lumbar" else v
               for v in spec.vertebrae)
    return dataclasses.replace(spec, vertebrae=vs)


def variants(spec: StudySpec, levels: tuple[str, ...] = LEVELS) -> Iterator[tuple[str, StudySpec, Change]]:
    """(name, study plan, change applied to its Anatomy) per variant; "base" first; the thoracic changes
    only when ``levels`` has a thoracic vertebra."""
    r = dataclasses.replace
    yield "base", spec, None
    yield "muscle x1.4", r(spec, muscle_scale=spec.muscle_scale * 1.4), None
    yield "muscle x0.7", r(spec, muscle_scale=spec.muscle_scale * 0.7), None
    yield "fat x1.8", r(spec, fat_mm=spec.fat_mm * 1.8), None
    yield "fat x0.5", r(spec, fat_mm=spec.fat_mm * 0.5), None
    yield "kidneys 15 mm lower", spec, _shift_kidneys(-15.0)
    yield "kidneys 30 mm lower", spec, _shift_kidneys(-30.0)
    yield "kidneys 30 mm higher", spec, _shift_kidneys(30.0)
    yield "no kidneys", spec, _no_kidneys
    yield "liver 40 mm lower", spec, lambda a: setattr(a, "liver_bottom", a.liver_bottom - 40.0)
    yield "iliac crest 30 mm higher", r(spec, iliac_crest_z=spec.iliac_crest_z + 30.0), None
    yield "colon highest", r(spec, colon_drop=0.0), None
    yield "colon lowest", r(spec, colon_drop=1.0), None
    lumbar = tuple(lv for lv in levels if lv.startswith("L"))
    if lumbar:
        for n in (1, 2, 3, 4):
            yield f"posterior elements as L{n}", spec, _posterior_as(n, lumbar)
        yield "lumbar bodies x1.12", _lumbar_bodies(spec, 1.12), None
        yield "lumbar bodies x0.88", _lumbar_bodies(spec, 0.88), None
    thoracic = tuple(lv for lv in levels if lv.startswith("T"))
    if thoracic:
        yield "lung bases 30 mm higher", spec, _shift_lung_bases(30.0)
        yield "lung bases 30 mm lower", spec, _shift_lung_bases(-30.0)
        yield "no 11th and 12th ribs", spec, _ribs_up_to(10)
        yield "no ribs", spec, _ribs_up_to(0)
        yield f"posterior elements of {', '.join(thoracic)} as L1", spec, _posterior_as(1, thoracic, kind="lumbar")


def run(model: Path, studies: int, seed: int, label: str | None = None, levels: tuple[str, ...] = LEVELS) -> dict[str, Any]:
    """Calls and mean probabilities per (level, variant) over ``studies`` phantom studies."""
    from spinelevel.engine.backends import load_backend

    card = read_card(model)
    prep = PreprocessSpec.from_card(card)
    names = list(card.classes)
    backend = load_backend("onnxruntime", model, card)  # the engine's runtime: probabilities whatever the card's output
    options = PhantomOptions(studies=studies, seed=seed, size=256)
    probs: dict[tuple[str, str], list[np.ndarray]] = {}
    try:
        for i in range(studies):
            spec = plan_study(options, i)
            by_name = {v.name: v for v in spec.vertebrae}
            for level in levels:
                z = (by_name[level].top_z + by_name[level].bottom_z) / 2.0
                keys, inputs = [], []
                for name, plan, change in variants(spec, levels):
                    anatomy = Anatomy(plan)
                    if change is not None:
                        change(anatomy)
                    px = plan.fov / plan.size
                    keys.append((level, name))
                    inputs.append(preprocess_slice(anatomy.render(float(z)), prep, (px, px)))
                for key, out in zip(keys, backend.infer(np.stack(inputs))):
                    probs.setdefault(key, []).append(out)
    finally:
        backend.close()
    rows = []
    for (level, name), ps in probs.items():
        p = np.stack(ps)
        calls = [names[k] for k in p.argmax(axis=1)]
        rows.append({"slice": f"mid-{level}", "variant": name, "called_right": sum(c == vertebra_class(level) for c in calls), "studies": len(calls),
                     "calls": calls, "mean_p": {c: round(float(p[:, k].mean()), 4) for k, c in enumerate(names)}})
    return {"model": label or model.name, "sha256": file_sha256(model), "seed": seed, "studies": studies, "rows": rows}


def table(result: dict[str, Any]) -> str:
    """Markdown: one row per (slice, variant)."""
    lines = ["| slice | variant | called right | calls |", "| --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['slice']} | {r['variant']} | {r['called_right']}/{r['studies']} | {', '.join(r['calls'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="ONNX model with a card, or 'demo' (the bundled model)")
    p.add_argument("--studies", type=int, default=8, help="phantom studies (default 8)")
    p.add_argument("--seed", type=int, default=2000, help="phantom seed (default 2000, the held-out test seed)")
    p.add_argument("--levels", default=",".join(LEVELS), help="comma-separated vertebrae whose mid-slices are read (default L3,L4)")
    p.add_argument("--out", type=Path, help="write the result as JSON here (and a Markdown table beside it)")
    args = p.parse_args(argv)
    levels = tuple(lv.strip() for lv in args.levels.split(",") if lv.strip())
    known = {f"T{k}" for k in range(1, 13)} | {f"L{k}" for k in range(1, 6)}
    if not levels or not set(levels) <= known:
        print(f"phantom_sensitivity: --levels {args.levels!r}: give vertebrae T1..T12, L1..L5", file=sys.stderr)
        return 2
    try:
        model = resolve_model(args.model)
    except SpineLevelError as exc:
        print(f"phantom_sensitivity: {exc}", file=sys.stderr)
        return 2
    if not model.is_file():
        print(f"phantom_sensitivity: {model}: no such model file", file=sys.stderr)
        return 2
    result = run(model, args.studies, args.seed, label=args.model, levels=levels)
    text = table(result)
    print(text, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
