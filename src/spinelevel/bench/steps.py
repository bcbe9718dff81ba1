"""CPU cost per slice of each step from file to model input, on one core (issue 17).

Steps of the engine (the code ``spinelevel run`` runs per slice) and, in the same run, the naive
script's per-slice function for comparison. Each step is timed over the same slices after one
warm-up call; milliseconds per slice.
"""

from __future__ import annotations

import io
import os
import pickle
import time
import warnings
from pathlib import Path

import numpy as np

__all__ = ["bench_steps"]


def _ms(fn, n: int) -> float:  # noqa: ANN001
    fn(0)
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return round(1e3 * (time.perf_counter() - start) / n, 3)


def bench_steps(files: list[Path], input_size: int = 256) -> dict:
    """Milliseconds per slice of every step, on one core."""
    import pydicom

    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass
    from spinelevel.bench import naive_script
    from spinelevel.card import ModelCard
    from spinelevel.engine.decode import decode_stored, hu_from_stored
    from spinelevel.engine.native import read_native
    from spinelevel.engine.scan import scan_paths
    from spinelevel.engine.preprocess import PreprocessSpec, preprocess_slice, resize_bilinear, window_channels
    from spinelevel.engine.sources import Source
    from spinelevel.engine.workers import DecodeTask, prepare

    warnings.simplefilter("ignore")
    spec = PreprocessSpec.from_card(ModelCard(input_size=(input_size, input_size)))
    n = len(files)
    data = [Path(f).read_bytes() for f in files]
    steps: dict[str, float] = {}
    steps["file_read"] = _ms(lambda i: Path(files[i]).read_bytes(), n)
    steps["header_parse"] = _ms(lambda i: pydicom.dcmread(io.BytesIO(data[i]), stop_before_pixels=True, force=True), n)
    steps["full_parse"] = _ms(lambda i: pydicom.dcmread(io.BytesIO(data[i]), force=True), n)
    parsed = [pydicom.dcmread(io.BytesIO(d), force=True) for d in data]
    steps["pixel_read"] = _ms(lambda i: decode_stored(parsed[i]), n)
    stored = [decode_stored(ds) for ds in parsed]
    steps["hu"] = _ms(lambda i: hu_from_stored(stored[i].raw, stored[i].slope, stored[i].intercept, stored[i].padding), n)
    hu = [hu_from_stored(s.raw, s.slope, s.intercept, s.padding) for s in stored]
    steps["windows"] = _ms(lambda i: window_channels(hu[i], spec.windows, spec.scale), n)
    channels = window_channels(hu[0], spec.windows, spec.scale)
    steps["resize"] = _ms(lambda i: resize_bilinear(channels, spec.input_size), n)
    steps["windows_and_resize"] = _ms(lambda i: preprocess_slice(hu[i], spec), n)
    x = preprocess_slice(hu[0], spec)
    steps["handoff_pickle_roundtrip"] = _ms(lambda i: pickle.loads(pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL)), n)
    slab = np.empty_like(x)

    def _shm(i: int) -> None:
        slab[...] = x  # the worker's write into the slab; the consumer reads it in place
    steps["handoff_slab_write"] = _ms(_shm, n)
    sops = [str(ds.SOPInstanceUID) for ds in parsed]
    headers = [h for f in files for h in scan_paths([f])]
    natives = [getattr(h, "native", None) for h in headers]
    steps["engine_scan_header"] = _ms(lambda i: list(scan_paths([files[i]])), n)
    if all(v is not None for v in natives):
        steps["native_read"] = _ms(lambda i: read_native(Source(str(files[i])), natives[i], sops[i], 1 << 30), n)
    steps["engine_total_prepare"] = _ms(lambda i: prepare(DecodeTask(0, (i,), (Source(str(files[i])),), (sops[i],), spec, 1 << 30, natives=(natives[i],))), n)
    steps["engine_total_prepare_full_parse"] = _ms(lambda i: prepare(DecodeTask(0, (i,), (Source(str(files[i])),), (sops[i],), spec, 1 << 30)), n)
    steps["naive_script_load"] = _ms(lambda i: naive_script.load(str(files[i])), n)
    return {
        "slices": n,
        "image_size": list(stored[0].raw.shape),
        "input_size": [input_size, input_size],
        "unit": "ms per slice, one core",
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "steps": steps,
        "note": (
            "engine_total_prepare = what a decode worker runs per slice: the file's bytes, the pixels viewed at the offset "
            "the scan found (native_read; no second parse), HU, windows, resize; engine_total_prepare_full_parse = the same "
            "through a full pydicom parse and its pixel handlers (compressed files, and before native reads); "
            "engine_scan_header = the scan's header read of one file (every file, in every sampling mode); "
            "handoff_* is what crossing to the consumer adds per slice"
        ),
    }
