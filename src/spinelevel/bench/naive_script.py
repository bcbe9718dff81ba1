"""The baseline of issue 17: the script a competent user writes instead of ``spinelevel run``.

pydicom, rescale, three HU windows, ``cv2.resize``, a ``multiprocessing.Pool(2)``, batches of 16 into
ONNX Runtime; no scan, ordering, sampling or Parquet. It is kept as the user would write it (not a
strawman: float32, OpenCV's resize, a pool of processes), so ``spinelevel bench`` times the engine
against it. Run: ``python -m spinelevel.bench.naive_script ARCHIVE MODEL.onnx``.
"""

import sys
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pydicom

WINDOWS = [(40, 400), (400, 1800), (-600, 1500)]
SIZE = 256


def load(path, size=SIZE):  # noqa: ANN001, ANN201 - kept as a user writes it
    try:
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    except Exception:
        return None  # not an image (labels, reports...)
    chans = [np.clip((hu - (c - w / 2)) / w, 0, 1) for c, w in WINDOWS]
    return np.stack([cv2.resize(ch, (size, size), interpolation=cv2.INTER_LINEAR) for ch in chans])


def main(root: str, model: str) -> list[int]:
    """The argmax level index of every image under ``root`` (what the user's script computes)."""
    files = sorted(str(p) for p in Path(root).rglob("*") if p.is_file() and p.suffix != ".parquet")
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    size = sess.get_inputs()[0].shape[-1]  # the model's input size
    size = size if isinstance(size, int) else SIZE
    levels, batch = [], []
    with Pool(2) as pool:
        for x in pool.imap(partial(load, size=size), files, chunksize=8):
            if x is not None:
                batch.append(x)
            if len(batch) == 16:
                levels += list(sess.run(None, {name: np.stack(batch)})[0].argmax(1))
                batch = []
    if batch:
        levels += list(sess.run(None, {name: np.stack(batch)})[0].argmax(1))
    return levels


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])  # an error is a traceback and a non-zero exit, as in a user's script
