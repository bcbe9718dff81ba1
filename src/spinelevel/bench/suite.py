"""The benchmark suite behind ``spinelevel bench``: decode, inference, end to end, scaling."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from spinelevel.bench.decode import bench_decode
from spinelevel.bench.end_to_end import bench_full_vs_sparse, bench_scaling, phantom_archive
from spinelevel.bench.machine import describe_machine

__all__ = ["SuiteConfig", "QUICK", "FULL", "run_suite"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SuiteConfig:
    """Sizes of one benchmark suite."""

    # Decode: phantom image size, slices per codec, model input size.
    decode_image_size: int = 512
    decode_slices: int = 60
    decode_input_size: int = 256
    # Inference: (timm architecture, input size) pairs and batch sizes; seconds per measurement.
    inference_models: tuple[tuple[str, int], ...] = (("tf_efficientnetv2_b0", 256), ("tf_efficientnetv2_m", 512))
    inference_batch_sizes: tuple[int, ...] = (1, 4, 16)
    inference_seconds: float = 5.0
    # End to end: studies and image size of the phantom archive (full vs sparse).
    e2e_studies: int = 6
    e2e_image_size: int = 512
    # Scaling: archive sizes in studies, image size.
    scaling_sizes: tuple[int, ...] = (1, 4, 16)
    scaling_image_size: int = 512
    # A 300-slice study (1.25 mm abdomen-pelvis) for the EfficientNetV2-M projection.
    long_study: bool = True


QUICK = SuiteConfig(
    decode_slices=24,
    inference_models=(("tf_efficientnetv2_b0", 256),),
    inference_batch_sizes=(1, 8),
    inference_seconds=2.0,
    e2e_studies=2,
    e2e_image_size=256,
    scaling_sizes=(1, 2, 4),
    scaling_image_size=256,
    long_study=False,
)
FULL = SuiteConfig()


def _model_for_e2e(work: Path, model: Path | None) -> Path:
    from spinelevel.models import resolve_model

    from spinelevel.errors import ModelError

    if model is not None:
        return Path(model)
    try:
        return resolve_model("demo")
    except ModelError:
        pass
    from spinelevel.bench.models import untrained_onnx

    log.warning("the demo model is not installed: timing with an untrained EfficientNetV2-B0 (agreement numbers are meaningless)")
    return untrained_onnx("tf_efficientnetv2_b0", 256, work)


def run_suite(config: SuiteConfig, work: Path, model: Path | None = None, sections: tuple[str, ...] = ("decode", "inference", "end_to_end", "vs_script", "scaling")) -> dict:
    """Run the chosen sections; returns one JSON-ready dict."""
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict = {"machine": describe_machine(), "config": asdict(config)}
    if "decode" in sections:
        log.info("decode + preprocess")
        result["decode"] = bench_decode(work, config.decode_image_size, config.decode_slices, config.decode_input_size)
    if "inference" in sections:
        try:
            from spinelevel.bench.inference import bench_inference

            result["inference"] = [
                bench_inference(arch, size, config.inference_batch_sizes, work, config.inference_seconds) for arch, size in config.inference_models
            ]
        except ImportError as exc:
            result["inference"] = {"skipped": f"needs the train extra (torch, timm): {exc}"}
    e2e_model = _model_for_e2e(work, model) if {"end_to_end", "scaling"} & set(sections) else None
    if "end_to_end" in sections:
        log.info("end to end")
        archive = phantom_archive(work, config.e2e_studies, config.e2e_image_size)
        result["end_to_end"] = bench_full_vs_sparse(archive, e2e_model, work)
        if config.long_study:
            long = phantom_archive(work, 1, 512, seed=303, coverage="abdomen_pelvis", thickness_mm=1.25, localizer_probability=0.0, dose_report_probability=0.0, second_recon_probability=0.0)
            result["long_study"] = bench_full_vs_sparse(long, e2e_model, work)
            result["long_study"]["m512_projection"] = _m512_projection(result)
    if "vs_script" in sections:
        log.info("end to end against the naive script")
        from spinelevel.bench.models import toy_onnx
        from spinelevel.bench.script import TRAINED_MODEL_ROWS, bench_startup, bench_vs_script
        from spinelevel.bench.steps import bench_steps

        archive = phantom_archive(work, config.e2e_studies, 512, seed=17, compression="none", localizer_probability=0.0, dose_report_probability=0.0, second_recon_probability=0.0)
        toy = toy_onnx(256, work)
        result["vs_script"] = bench_vs_script(archive, toy, work)
        # the same archive with a trained model, so that the default sparse sampling works as it does
        # for a user (an untrained model is unsure everywhere and makes the search read every slice)
        demo = _model_for_e2e(work, model)
        result["vs_script_trained_model"] = bench_vs_script(archive, demo, work, rows=TRAINED_MODEL_ROWS)
        import pyarrow.parquet as pq

        files = [archive / p for p in pq.read_table(archive / "labels.parquet", columns=["path"]).column("path").to_pylist()]
        one = work / "one_file"
        one.mkdir(exist_ok=True)
        (one / "slice.dcm").write_bytes(files[0].read_bytes())
        result["startup"] = bench_startup(one, toy, work)
        result["steps"] = bench_steps(files[:100])
    if "scaling" in sections:
        log.info("scaling")
        result["scaling"] = bench_scaling(work, e2e_model, config.scaling_sizes, config.scaling_image_size)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _m512_projection(result: dict) -> dict | None:
    """Seconds for the long study with EfficientNetV2-M at 512 on ONNX Runtime, from measured parts.

    Untrained weights cannot drive the sparse search (they are unsure everywhere, so the search
    falls back to every slice), so the sparse time is projected: the measured run time without its
    model share, plus the slices the trained demo model needed times the measured per-image cost of
    EfficientNetV2-M at 512 on ONNX Runtime at its best batch size.
    """
    inference = result.get("inference")
    if not isinstance(inference, list):
        return None
    m = next((r for r in inference if r["model"] == "tf_efficientnetv2_m"), None)
    b0 = next((r for r in inference if r["model"] == "tf_efficientnetv2_b0"), None)
    if m is None or b0 is None:
        return None
    best = lambda r: max(row["onnxruntime"]["images_per_s"] for row in r["results"] if "onnxruntime" in row and "images_per_s" in row["onnxruntime"])  # noqa: E731
    m_ips, b0_ips = best(m), best(b0)
    long = result["long_study"]
    out = {}
    for mode in ("full", "sparse"):
        run = long[mode]
        other = max(run["wall_s"] - run["evaluated_slices"] / b0_ips, 0.0)
        out[f"{mode}_s"] = round(other + run["evaluated_slices"] / m_ips, 1)
    out["speedup"] = round(out["full_s"] / out["sparse_s"], 2)
    out["m512_images_per_s"] = m_ips
    out["slices"] = long["sparse"]["slices"]
    return out
