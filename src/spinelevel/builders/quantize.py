"""An INT8 copy of an ONNX model: ONNX Runtime static quantisation (QDQ), calibrated on real slices.

Choices:

- ``onnxruntime.quantization.quantize_static`` in QDQ format (QuantizeLinear/DequantizeLinear pairs
  around each quantised op, so the file stays a standard ONNX graph that ONNX Runtime fuses into
  integer kernels and other runtimes can read), weights int8 symmetric per output channel,
  activations uint8 asymmetric (ONNX Runtime's U8S8, the fast pair on x86 with VNNI).
- The graph is first run through ``quant_pre_process`` (symbolic shape inference and ONNX Runtime's
  basic graph optimisations), which the ONNX Runtime documentation recommends before quantising.
- Calibration inputs are made by the engine's own path: the DICOM folders are scanned and selected
  (``engine.scan``/``engine.select``), slices evenly spaced over all kept series are decoded to HU
  (``engine.decode.read_hu``) and preprocessed with the model card (``PreprocessSpec.from_card`` +
  ``preprocess_slice``), so the ranges are those the engine will feed.
- The card is kept and gains ``precision: "int8"``, ``fp32_onnx_sha256`` and a ``quantization`` record
  (method, formats, calibration folders and slice count), as the FP16 copy records ``precision``.
- After writing, the copy is compared with the float32 model on the calibration inputs (argmax
  agreement, max probability difference) and the numbers are returned; whether INT8 is good enough
  is judged on held-out data (BENCHMARKS.md, issue 17), not here.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spinelevel.card import ModelCard, file_sha256, read_card, write_onnx_card
from spinelevel.errors import InputError, ModelError

__all__ = ["QuantizeOptions", "QuantizeResult", "calibration_inputs", "quantize_model", "count_qdq_nodes"]

log = logging.getLogger(__name__)

_METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class QuantizeOptions:
    """How a model is quantised."""

    # Calibration slices: an equal share per folder, evenly spaced over the folder's kept series.
    slices: int = 128
    # Slices per calibration batch (memory of the augmented graph grows with it).
    batch: int = 8
    # 'minmax', 'entropy' or 'percentile' (ONNX Runtime's CalibrationMethod).
    method: str = "minmax"
    # One weight scale per output channel (per tensor when False).
    per_channel: bool = True
    # 7-bit weights (for CPUs without VNNI, where u8s8 products can saturate).
    reduce_range: bool = False


@dataclass(frozen=True)
class QuantizeResult:
    """What a quantisation wrote and measured."""

    # The INT8 ONNX file.
    path: Path
    # Its card (precision int8).
    card: ModelCard
    # Calibration slices used.
    n_calibration: int
    # Quantize/DequantizeLinear nodes in the written graph.
    n_qdq: int
    # On the calibration slices: fraction whose argmax equals the float32 model's.
    argmax_agreement: float
    # On the calibration slices: max |p_int8 - p_fp32|.
    max_abs_diff: float


def calibration_inputs(card: ModelCard, folders: Sequence[Path], n: int) -> np.ndarray:
    """(m, C, H, W) model inputs of up to ``n`` slices: an equal share per folder, evenly spaced over its series.

    Raises:
        InputError: the folders hold no readable CT slice.
    """
    from spinelevel.engine.decode import read_hu
    from spinelevel.engine.preprocess import PreprocessSpec, preprocess_slice
    from spinelevel.engine.scan import scan_paths
    from spinelevel.engine.select import SelectOptions, select_series

    folders = [Path(f) for f in folders]
    missing = [str(f) for f in folders if not f.exists()]
    if missing:
        raise InputError(f"calibration folder(s) not found: {', '.join(missing)}")
    spec = PreprocessSpec.from_card(card)
    out: list[np.ndarray] = []
    # Each folder gets its share of the slices, so a small real series is not drowned by a large
    # phantom set (evenly spaced over all slices together, 20 real slices would give 2 of 256).
    shares = [n // len(folders) + (1 if k < n % len(folders) else 0) for k in range(len(folders))]
    for folder, share in zip(folders, shares):
        plans = select_series(scan_paths([folder]), SelectOptions(min_slices=1)).plans
        refs = [(s, plan.pixel_spacing) for plan in plans for s in plan.slices]
        if not refs or share <= 0:
            log.warning("calibration folder %s: no CT series kept", folder)
            continue
        for i in np.unique(np.linspace(0, len(refs) - 1, share).round().astype(int)):
            ref, spacing = refs[int(i)]
            try:
                hu = read_hu(ref.source, 1 << 30, ref.frame)[0]
            except Exception as exc:  # noqa: BLE001 - one unreadable file does not spoil calibration
                log.warning("calibration slice %s unreadable: %s", ref.source.label, exc)
                continue
            out.append(preprocess_slice(hu, spec, spacing))
    if not out:
        raise InputError(f"no CT slices found in {', '.join(map(str, folders))} for calibration")
    return np.stack(out).astype(np.float32, copy=False)


def _reader(name: str, x: np.ndarray, batch: int):  # noqa: ANN202 - a CalibrationDataReader
    from onnxruntime.quantization import CalibrationDataReader

    class _Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[dict[str, np.ndarray]] = iter(
                {name: np.ascontiguousarray(x[i : i + batch])} for i in range(0, len(x), batch)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    return _Batches()


def count_qdq_nodes(model: Path) -> int:
    """QuantizeLinear + DequantizeLinear nodes in an ONNX file's main graph."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    return sum(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in proto.graph.node)


def _run(model: Path, x: np.ndarray, output: str, batch: int = 16) -> np.ndarray:
    import onnxruntime as ort

    from spinelevel.engine.backends.onnxruntime import softmax

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    parts = [np.asarray(session.run(None, {name: x[i : i + batch]})[0], dtype=np.float32) for i in range(0, len(x), batch)]
    result = np.concatenate(parts).reshape(len(x), -1)
    return softmax(result) if output == "logits" else result


def quantize_model(model: Path, calibration: Sequence[Path], out: Path, options: QuantizeOptions = QuantizeOptions()) -> QuantizeResult:
    """Write a static INT8 (QDQ) copy of ``model`` to ``out``, calibrated on slices of ``calibration``.

    Raises:
        CardError: the model has no card.
        InputError: bad options, or no calibration slices.
        ModelError: quantisation fails.
    """
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if options.method not in _METHODS:
        raise InputError(f"--method {options.method!r} must be one of {', '.join(_METHODS)}")
    if not calibration:
        raise InputError("give at least one --calibration folder of CT slices (DICOM)")
    model, out = Path(model), Path(out)
    card = read_card(model)
    x = calibration_inputs(card, calibration, options.slices)
    batch = max(1, options.batch)
    if options.method != "minmax" and len(x) > batch and len(x) % batch:
        # The histogram calibrators stack every batch's outputs into one array: batches must be
        # equal (onnxruntime 1.32 fails with "inhomogeneous shape" on a short last batch).
        log.info("calibration: %d slices, the last %d dropped for equal batches of %d", len(x), len(x) % batch, batch)
        x = x[: len(x) - len(x) % batch]
    input_name = onnx.load(str(model), load_external_data=False).graph.input[0].name
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[options.method]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".quantize-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        raw = Path(tmp) / "int8.onnx"
        try:
            quant_pre_process(str(model), str(pre), skip_symbolic_shape=False)
        except Exception as exc:  # noqa: BLE001 - symbolic shape inference fails on some graphs
            log.warning("quant_pre_process failed (%s); quantising the model as it is", " ".join(str(exc).split())[:200])
            pre = model
        try:
            quantize_static(
                str(pre),
                str(raw),
                _reader(input_name, x, batch),
                quant_format=QuantFormat.QDQ,
                per_channel=options.per_channel,
                reduce_range=options.reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=method,
                # Not CalibMaxIntermediateOutputs: onnxruntime 1.32's MinMax calibrator drops the
                # collected batches when that count is reached instead of folding them into its
                # ranges. Its collected outputs are per-tensor ReduceMin/ReduceMax values, small.
                extra_options={"CalibTensorRangeSymmetric": False},
            )
        except Exception as exc:  # noqa: BLE001 - the quantiser raises anything from its graph passes
            raise ModelError(f"{model}: static INT8 quantisation failed ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})") from None
        final = card.with_extra(
            precision="int8",
            fp32_onnx_sha256=file_sha256(model),
            quantization={
                "tool": f"onnxruntime.quantization.quantize_static, onnxruntime {onnxruntime.__version__}",
                "format": "QDQ",
                "weights": "int8 symmetric " + ("per channel" if options.per_channel else "per tensor") + (" (reduce_range)" if options.reduce_range else ""),
                "activations": "uint8 asymmetric",
                "calibration_method": options.method,
                "calibration_slices": int(len(x)),
                "calibration_data": [Path(c).name for c in calibration],
            },
        )
        write_onnx_card(raw, final, out)
    p_int8 = _run(out, x, card.output)
    p_fp32 = _run(model, x, card.output)
    agreement = float(np.mean(p_int8.argmax(1) == p_fp32.argmax(1)))
    diff = float(np.max(np.abs(p_int8 - p_fp32)))
    n_qdq = count_qdq_nodes(out)
    log.info("INT8 copy %s: %d QDQ nodes; on %d calibration slices argmax agreement %.4f, max abs prob diff %.3g", out, n_qdq, len(x), agreement, diff)
    return QuantizeResult(path=out, card=final, n_calibration=int(len(x)), n_qdq=n_qdq, argmax_agreement=agreement, max_abs_diff=diff)
