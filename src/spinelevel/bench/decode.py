"""Decode + preprocess throughput per transfer syntax, against a naive single-thread baseline.

Baselines, both in the same run: the naive script of issue 17 (``bench/naive_script.py``: pydicom,
rescale, three windows, ``cv2.resize``, ``multiprocessing.Pool(2)``; ``script_*`` keys), and the older,
slower one (``naive_*`` keys): ``pydicom.dcmread`` + ``pixel_array`` + rescale + windows +
``scipy.ndimage.zoom`` per slice, one thread. Engine: the worker pool of ``spinelevel run`` with its
vectorised card preprocessing, as processes (the default) and as threads (``--worker-kind threads``),
and the same code in the calling thread.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from spinelevel.card import ModelCard
from spinelevel.engine.preprocess import PreprocessSpec
from spinelevel.engine.sources import Source
from spinelevel.engine.workers import DecodePool, DecodeTask

__all__ = ["naive_preprocess", "bench_decode"]


def naive_preprocess(path: Path, card: ModelCard) -> np.ndarray:
    """The baseline for one file."""
    import pydicom
    from scipy import ndimage

    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    h, w = card.input_size
    out = []
    for center, width in card.windows:
        ch = np.clip((hu - (center - width / 2)) / width, 0, 1)
        out.append(ndimage.zoom(ch, (h / ch.shape[0], w / ch.shape[1]), order=1))
    return np.stack(out).astype(np.float32)


def _files(root: Path) -> list[Path]:
    import pyarrow.parquet as pq

    labels = pq.read_table(root / "labels.parquet", columns=["path"]).column("path").to_pylist()
    return [root / p for p in labels]


def _engine(pool: DecodePool, files: list[Path], spec: PreprocessSpec) -> float:
    import pydicom

    sops = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    start = time.perf_counter()
    for i in range(0, len(files), 4):
        idx = tuple(range(i, min(i + 4, len(files))))
        pool.submit(DecodeTask(0, idx, tuple(Source(str(files[j])) for j in idx), tuple(sops[j] for j in idx), spec, 1 << 30))
    done = 0
    while pool.pending():
        got = pool.get()
        done += len(got.indices)
        pool.release(got)
    assert done == len(files), "engine failed to decode phantom slices"
    return time.perf_counter() - start


def bench_decode(work: Path, size: int = 512, slices: int = 60, input_size: int = 512, workers: int | None = None, rounds: int = 3) -> dict:
    """Slices/s of the engine and the baseline for each codec the phantom writes."""
    from spinelevel.phantom import PhantomOptions, generate

    workers = workers or os.cpu_count() or 1
    card = ModelCard(input_size=(input_size, input_size))
    spec = PreprocessSpec.from_card(card)
    results = {}
    for codec in ("none", "rle", "jpeg2000", "jpegls"):
        root = work / f"decode_{codec}_{size}"
        if not root.exists():
            generate(root, PhantomOptions(studies=1, seed=11, size=size, compression=codec, coverage="lumbar", thickness_mm=2.5, localizer_probability=0, dose_report_probability=0, second_recon_probability=0))
        files = _files(root)[:slices]
        # Best of interleaved rounds: the machine is shared, and interleaving exposes every path to
        # the same background load.
        engine_s = threads_s = inline_s = naive_s = script_s = shm_s = float("inf")
        import multiprocessing

        from spinelevel.bench import naive_script

        paths = [str(f) for f in files]
        with multiprocessing.get_context("spawn").Pool(workers) as script_pool, DecodePool(workers, slab_spec=spec, slab_rows=4) as shm, DecodePool(workers) as pool, DecodePool(workers, kind="threads") as threads, DecodePool(0) as inline:
            pool.start(wait=True)  # worker start-up and imports are not decoding
            shm.start(wait=True)
            _engine(shm, files[: 2 * workers], spec)
            script_pool.map(naive_script.load, paths[: 2 * workers])
            _engine(pool, files[: 2 * workers], spec)
            _engine(threads, files[: 2 * workers], spec)
            _engine(inline, files[:2], spec)
            naive_preprocess(files[0], card)
            for _ in range(rounds):
                engine_s = min(engine_s, _engine(pool, files, spec))
                shm_s = min(shm_s, _engine(shm, files, spec))
                start = time.perf_counter()
                list(script_pool.imap(naive_script.load, paths, chunksize=8))
                script_s = min(script_s, time.perf_counter() - start)
                threads_s = min(threads_s, _engine(threads, files, spec))
                inline_s = min(inline_s, _engine(inline, files, spec))
                start = time.perf_counter()
                for f in files:
                    naive_preprocess(f, card)
                naive_s = min(naive_s, time.perf_counter() - start)
        results[codec] = {
            "slices": len(files),
            "engine_slices_per_s": round(len(files) / engine_s, 1),
            "engine_threads_slices_per_s": round(len(files) / threads_s, 1),
            "engine_one_process_slices_per_s": round(len(files) / inline_s, 1),
            "naive_slices_per_s": round(len(files) / naive_s, 1),
            "speedup": round(naive_s / engine_s, 2),
            "speedup_threads": round(naive_s / threads_s, 2),
            "speedup_one_process": round(naive_s / inline_s, 2),
            "engine_shared_memory_slices_per_s": round(len(files) / shm_s, 1),
            "script_slices_per_s": round(len(files) / script_s, 1),
            "speedup_vs_script": round(script_s / shm_s, 2),
            "speedup_vs_script_pickling_pool": round(script_s / engine_s, 2),
            "speedup_vs_script_threads": round(script_s / threads_s, 2),
            "speedup_vs_script_one_process": round(script_s / inline_s, 2),
        }
    return {"image_size": size, "input_size": input_size, "workers": workers, "rounds": rounds, "timing": "best of interleaved rounds", "codecs": results}
