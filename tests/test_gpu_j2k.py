"""GPU JPEG 2000 decoding: the exactness logic with fake decoders, DALI's CPU decoder, the fallback
reasons in run.json, and the absence of nvImageCodec. Tests marked gpu run nvJPEG2000 for real."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from spinelevel.engine import dali, gpu_j2k
from spinelevel.engine.decode import decode_stored
from spinelevel.errors import BackendUnavailableError

openjpeg = pytest.importorskip("openjpeg")

LOSSLESS = "1.2.840.10008.1.2.4.90"


def _ct(shape: tuple[int, int], signed: bool, bits: int, seed: int = 0) -> np.ndarray:
    """CT-like stored values: air outside a body disc, soft tissue and bone inside."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inside = (yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2 < (min(shape) / 2.4) ** 2
    hu = np.where(inside, rng.normal(40, 60, shape), -1000 + rng.normal(0, 5, shape))
    hu[inside & (rng.random(shape) < 0.05)] = 1200
    if signed:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        return np.clip(np.round(hu), lo, hi).astype(np.int16)
    return np.clip(np.round(hu + 1024), 0, (1 << bits) - 1).astype(np.uint16)


def _frame(stored: np.ndarray, bits: int, signed: bool) -> gpu_j2k.J2kFrame:
    cs = openjpeg.encode(stored, bits_stored=bits)
    return gpu_j2k.frame_from_codestream(cs, *stored.shape, bits, signed, LOSSLESS)


class _OpenjpegAsGpu:
    """A stand-in GPU decoder: openjpeg's samples returned as the raw unsigned bit pattern."""

    name = "fake"

    def __init__(self, rescale: bool = False) -> None:
        self.rescale, self.calls = rescale, 0

    def decode(self, frames):  # noqa: ANN001, ANN201
        self.calls += len(frames)
        out = []
        for f in frames:
            bits = openjpeg.decode(f.codestream).view(np.uint16) & ((1 << f.bits_stored) - 1)
            # rescale: what DALI's dtype=INT16 does (values converted to the dynamic range of the type)
            out.append((bits.astype(np.uint32) * 65535 // ((1 << f.bits_stored) - 1)).astype(np.uint16) if self.rescale else bits)
        return out


@pytest.mark.parametrize(("signed", "bits"), [(True, 16), (True, 12), (False, 12), (False, 16)], ids=["s16", "s12", "u12", "u16"])
def test_exact_decoder_is_used_and_matches_openjpeg(signed: bool, bits: int) -> None:
    stored = _ct((64, 48), signed, bits)
    frame = _frame(stored, bits, signed)
    path = gpu_j2k.GpuJ2kPath(_OpenjpegAsGpu())
    for _ in range(3):
        got = path.decode(frame, lambda: openjpeg.decode(frame.codestream))
        assert got.dtype == stored.dtype and np.array_equal(got, stored)
    assert path.outcomes == {gpu_j2k.GPU_DECODED: 3} and path.verified[frame.kind]


def test_to_stored_sign_extends_raw_or_extended_samples_alike() -> None:
    frame = gpu_j2k.frame_from_codestream(b"", 1, 3, 12, True)
    want = np.array([[-2048, -1, 2047]], np.int16)
    raw_bits = (want.astype(np.int32) & 0xFFF).astype(np.uint16)
    assert np.array_equal(gpu_j2k.to_stored(raw_bits, frame), want)
    assert np.array_equal(gpu_j2k.to_stored(want, frame), want)
    assert np.array_equal(gpu_j2k.to_stored(want[..., None], frame), want)  # (H, W, 1) decoder output


def test_inexact_decoder_is_refused_for_that_kind_with_the_reason() -> None:
    stored = _ct((32, 32), False, 12, 1)
    frame = _frame(stored, 12, False)
    fake = _OpenjpegAsGpu(rescale=True)
    path = gpu_j2k.GpuJ2kPath(fake)
    for _ in range(4):
        assert np.array_equal(path.decode(frame, lambda: openjpeg.decode(frame.codestream)), stored)
    assert fake.calls == 1  # after the mismatch that kind is not sent to the GPU again
    (reason,) = path.outcomes
    assert "differs from openjpeg" in reason and "unsigned 12-bit 32x32" in reason and path.outcomes[reason] == 4


def test_lossy_and_failed_frames_fall_back_with_reasons() -> None:
    stored = _ct((64, 64), True, 16)
    lossy = gpu_j2k.frame_from_codestream(openjpeg.encode(stored), 64, 64, 16, True, "1.2.840.10008.1.2.4.91")
    failing = type("Failing", (), {"name": "x", "decode": lambda self, frames: [None] * len(frames)})()
    path = gpu_j2k.GpuJ2kPath(failing)
    path.decode(lossy, lambda: stored)
    path.decode(_frame(stored, 16, True), lambda: stored)
    assert any("lossy" in r for r in path.outcomes) and any("returned no image" in r for r in path.outcomes)


def test_missing_nvimgcodec_names_the_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_j2k, "nvimgcodec_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="nvidia-nvimgcodec-cu13.*nvidia-nvjpeg2k-cu13"):
        gpu_j2k.NvImageCodecDecoder()
    path = gpu_j2k.make_path("nvimgcodec")
    stored = _ct((64, 64), True, 16)
    assert np.array_equal(path.decode(_frame(stored, 16, True), lambda: stored), stored)
    (reason,) = path.outcomes
    assert "nvidia-nvimgcodec-cu13" in reason


@pytest.mark.skipif(not dali.dali_available(), reason="nvidia-dali-cuda130 is not installed")
def test_dali_cpu_decoder_is_exact_for_unsigned_and_not_used_for_signed() -> None:
    path = gpu_j2k.GpuJ2kPath(dali.DaliJ2kDecoder(device="cpu", batch_size=4, num_threads=1), allow_signed=False)
    u12 = _ct((40, 56), False, 12, 2)
    s16 = _ct((40, 56), True, 16, 3)
    fu, fs = _frame(u12, 12, False), _frame(s16, 16, True)
    got = path.decode_many([fu, fs, fu], [lambda: openjpeg.decode(fu.codestream), lambda: openjpeg.decode(fs.codestream), lambda: openjpeg.decode(fu.codestream)])
    assert np.array_equal(got[0], u12) and np.array_equal(got[1], s16) and np.array_equal(got[2], u12)
    assert path.outcomes[gpu_j2k.GPU_DECODED] == 2
    assert any("signed JPEG 2000 with the dali decoder" in r for r in path.outcomes)


def test_decode_stored_uses_the_path_for_jpeg2000_files(tmp_path: Path) -> None:
    import pydicom
    from dicomgen import SeriesSpec, write_series
    from pydicom.uid import JPEG2000Lossless

    (path,) = write_series(tmp_path, SeriesSpec(levels=["L3"], syntax=JPEG2000Lossless, size=32), nested=False)
    ds = pydicom.dcmread(path)
    cpu = decode_stored(ds)
    gpu = gpu_j2k.GpuJ2kPath(_OpenjpegAsGpu())
    via = decode_stored(pydicom.dcmread(path), j2k=gpu)
    assert np.array_equal(via.raw, cpu.raw) and via.raw.dtype == cpu.raw.dtype and via.intercept == cpu.intercept
    assert gpu.outcomes == {gpu_j2k.GPU_DECODED: 1}


def test_run_records_the_fallback_reason_in_run_json(tmp_path: Path, model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomgen import SeriesSpec, level_sequence, write_series
    from pydicom.uid import JPEG2000Lossless

    from spinelevel.engine.pipeline import RunOptions, run
    from spinelevel.engine.sampling import SamplingOptions

    monkeypatch.setattr(gpu_j2k, "nvimgcodec_available", lambda: False)
    write_series(tmp_path / "in", SeriesSpec(levels=level_sequence({"L2": 4, "L3": 4, "L4": 4}), syntax=JPEG2000Lossless, size=32))
    run([tmp_path / "in"], model_path, tmp_path / "out", RunOptions(workers=0, j2k_decoder="nvimgcodec", backend="onnxruntime", sampling=SamplingOptions(mode="full")))
    entry = json.loads((tmp_path / "out" / "run.json").read_text())["runs"][-1]
    assert entry["options"]["j2k_decoder"] == "nvimgcodec"
    summary = entry["j2k_decode"]
    assert summary["gpu_slices"] == 0 and sum(summary["cpu_fallback"].values()) == 12
    assert "nvidia-nvimgcodec-cu13" in next(iter(summary["cpu_fallback"]))


# --- on a GPU -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(("signed", "bits"), [(True, 16), (True, 12), (False, 12), (False, 16)], ids=["s16", "s12", "u12", "u16"])
def test_nvimgcodec_is_bit_exact_on_512_ct(signed: bool, bits: int) -> None:
    if gpu_j2k.nvimgcodec_unavailable_reason():
        pytest.skip(gpu_j2k.nvimgcodec_unavailable_reason())
    frames = [(_ct((512, 512), signed, bits, s)) for s in range(4)]
    decoded = gpu_j2k.NvImageCodecDecoder().decode([_frame(f, bits, signed) for f in frames])
    for want, got, in zip(frames, decoded):
        assert got is not None
        assert np.array_equal(gpu_j2k.to_stored(got, _frame(want, bits, signed)), want)


@pytest.mark.gpu
@pytest.mark.skipif(not dali.dali_available(), reason="nvidia-dali-cuda130 is not installed")
def test_dali_mixed_decoder_is_bit_exact_for_unsigned_ct() -> None:
    frames = [_ct((512, 512), False, 12, s) for s in range(4)]
    decoded = dali.DaliJ2kDecoder(device="mixed", batch_size=4).decode([_frame(f, 12, False) for f in frames])
    for want, got in zip(frames, decoded):
        assert np.array_equal(gpu_j2k.to_stored(got, _frame(want, 12, False)), want)


def test_gpu_j2k_paths_are_per_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A DALI pipeline (feed_input then run) must not be shared by decode threads, which would swap
    slices between them: each thread gets its own decoder and counters."""
    import threading

    from spinelevel.engine import gpu_j2k, workers

    monkeypatch.setattr(gpu_j2k, "make_path", lambda decoder, device=0: object())
    paths = workers._J2kPaths()
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(paths.get("dali", 0)))
    t.start()
    t.join()
    mine = paths.get("dali", 0)
    assert mine is paths.get("dali", 0) and got[0] is not mine
