"""JPEG 2000 and HTJ2K pixel data decoded on the GPU (nvJPEG2000), bit-exact or not at all.

Archives exported from PACS are often lossless JPEG 2000 CT, which openjpeg decodes at about 25-50
slices/s per core. This module decodes those codestreams on the GPU with nvImageCodec (the library
DALI decodes with; ``nvidia-nvimgcodec-cu13`` with the ``nvidia-nvjpeg2k-cu13`` extension), or with
DALI's ``fn.decoders.image(device="mixed")`` (:class:`spinelevel.engine.dali.DaliJ2kDecoder`).
Only the codestream and a few header values (rows, columns, bits stored, pixel representation,
transfer syntax: :class:`J2kFrame`) leave pydicom.

Exactness is checked, not assumed: the first frame of every kind (transfer syntax, signedness, bits
stored, size) is decoded both on the GPU and by the CPU decoder (pydicom's openjpeg plugin); the
kind goes to the GPU only when every pixel agrees, otherwise it stays on the CPU with the reason.
Frames the GPU path does not take at all (lossy syntaxes, more than one sample, more than 16 bits)
are decoded on the CPU with the reason too. :class:`GpuJ2kPath` counts both; the pipeline writes
the counts and reasons to run.json (``j2k_decode``).

Decoder output to DICOM stored values (:func:`to_stored`): nvImageCodec with
``DecodeParams(allow_any_depth=True, color_spec=ColorSpec.UNCHANGED)`` keeps the codestream's
precision (the parameters MONAI Deploy's nvimgcodec DICOM decoder uses) and returns uint16 or int16
samples; the low ``bits_stored`` bits are kept and sign-extended for PixelRepresentation 1, which
gives pydicom's values whichever of the two the decoder returns.
"""

from __future__ import annotations

import importlib.util
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from spinelevel.errors import BackendUnavailableError, DecodeError

__all__ = [
    "NVIMGCODEC_REQUIRES",
    "J2K_LOSSLESS",
    "J2K_LOSSY",
    "J2K_SYNTAXES",
    "GPU_DECODED",
    "J2kFrame",
    "J2kDecoder",
    "nvimgcodec_available",
    "nvimgcodec_unavailable_reason",
    "is_j2k",
    "extract_frame",
    "frame_from_codestream",
    "not_for_gpu",
    "to_stored",
    "NvImageCodecDecoder",
    "GpuJ2kPath",
    "J2K_DECODERS",
    "make_path",
]

log = logging.getLogger(__name__)

# Packages of the GPU JPEG 2000 decoder (about 29 MB of wheels together).
NVIMGCODEC_REQUIRES = ("nvidia-nvimgcodec-cu13", "nvidia-nvjpeg2k-cu13")

# JPEG 2000 (.90 lossless, .91) and HTJ2K (.201 lossless, .202 lossless RPCL, .203).
J2K_LOSSLESS = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202"})
J2K_LOSSY = frozenset({"1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.203"})
J2K_SYNTAXES = J2K_LOSSLESS | J2K_LOSSY

# The outcome key of a frame that was decoded on the GPU (every other key is a fallback reason).
GPU_DECODED = "gpu"


@dataclass(frozen=True)
class J2kFrame:
    """One encoded frame and the header values needed to turn it into stored values."""

    # The JPEG 2000 / HTJ2K codestream (J2C, possibly wrapped as JP2).
    codestream: bytes
    rows: int
    columns: int
    # BitsStored (the codestream's precision for CT: 12 or 16).
    bits_stored: int
    # PixelRepresentation 1: two's complement samples.
    signed: bool
    transfer_syntax: str
    samples_per_pixel: int = 1
    bits_allocated: int = 16

    @property
    def kind(self) -> tuple:
        """Frames of one kind share the exactness check."""
        return (self.transfer_syntax, self.signed, self.bits_stored, self.rows, self.columns)

    def describe(self) -> str:
        return f"{'signed' if self.signed else 'unsigned'} {self.bits_stored}-bit {self.rows}x{self.columns}"


class J2kDecoder(Protocol):
    """A batch GPU decoder: frames -> decoded sample arrays (None where a frame failed)."""

    name: str

    def decode(self, frames: list[J2kFrame]) -> list[np.ndarray | None]: ...


def nvimgcodec_available() -> bool:
    """True when nvImageCodec's Python module can be imported (a GPU is checked separately)."""
    try:
        return importlib.util.find_spec("nvidia.nvimgcodec") is not None
    except (ImportError, ValueError):
        return False


def _nvjpeg2k_available() -> bool:
    try:
        return importlib.util.find_spec("nvidia.nvjpeg2k") is not None
    except (ImportError, ValueError):
        return False


def nvimgcodec_unavailable_reason() -> str | None:
    """Why the nvImageCodec GPU decoder cannot run here (names the packages), or None when it can."""
    missing = [pkg for pkg, ok in zip(NVIMGCODEC_REQUIRES, (nvimgcodec_available(), _nvjpeg2k_available())) if not ok]
    if missing:
        return f"GPU JPEG 2000 decoding needs the package(s) {', '.join(missing)} (pip install {' '.join(NVIMGCODEC_REQUIRES)})"
    from spinelevel.engine.cuda import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    return None if reason is None else f"GPU JPEG 2000 decoding needs an NVIDIA GPU with CUDA: {reason}"


def is_j2k(transfer_syntax: str) -> bool:
    """True for the JPEG 2000 and HTJ2K transfer syntaxes."""
    return str(transfer_syntax) in J2K_SYNTAXES


def frame_from_codestream(codestream: bytes, rows: int, columns: int, bits_stored: int, signed: bool, transfer_syntax: str = "1.2.840.10008.1.2.4.90") -> J2kFrame:
    """A frame from a bare codestream (benchmarks and tests)."""
    return J2kFrame(bytes(codestream), int(rows), int(columns), int(bits_stored), bool(signed), str(transfer_syntax))


def extract_frame(ds, index: int, transfer_syntax: str) -> J2kFrame:  # noqa: ANN001 - pydicom Dataset
    """The codestream of frame ``index`` (0-based) and its header values, via pydicom (no decoding).

    Raises:
        DecodeError: the encapsulated pixel data holds fewer frames.
    """
    from spinelevel.engine.frames import encapsulated_frame

    encoded = encapsulated_frame(ds, index)
    if encoded is None:
        raise DecodeError(f"the JPEG 2000 pixel data holds fewer than {index + 1} frames")
    bits_allocated = int(ds.get("BitsAllocated", 16) or 16)
    return J2kFrame(
        codestream=bytes(encoded),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        bits_stored=int(ds.get("BitsStored", bits_allocated) or bits_allocated),
        signed=int(ds.get("PixelRepresentation", 0) or 0) == 1,
        transfer_syntax=transfer_syntax,
        samples_per_pixel=int(ds.get("SamplesPerPixel", 1) or 1),
        bits_allocated=bits_allocated,
    )


def not_for_gpu(frame: J2kFrame) -> str | None:
    """Why this frame is decoded on the CPU without trying the GPU, or None when the GPU may take it."""
    if frame.transfer_syntax in J2K_LOSSY:
        return "lossy JPEG 2000/HTJ2K: decoders may round differently, only lossless codestreams are decoded on the GPU"
    if frame.samples_per_pixel != 1:
        return f"{frame.samples_per_pixel} samples per pixel (CT is one)"
    if frame.bits_allocated != 16 or not 1 <= frame.bits_stored <= 16:
        return f"BitsAllocated {frame.bits_allocated} / BitsStored {frame.bits_stored}: the GPU path takes 16-bit storage only"
    return None


def to_stored(decoded: np.ndarray, frame: J2kFrame) -> np.ndarray:
    """Decoder samples -> stored values as pydicom gives them (int16 if signed, else uint16), (rows, columns).

    Keeps the low ``bits_stored`` bits and sign-extends them for signed frames, so the result is
    the same whether the decoder returned the raw unsigned bit pattern or already sign-extended
    int16 values.

    Raises:
        DecodeError: the decoder's output has another shape or is not 16-bit.
    """
    arr = np.asarray(decoded)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.shape != (frame.rows, frame.columns):
        raise DecodeError(f"GPU decoder returned shape {arr.shape}, the header says {(frame.rows, frame.columns)}")
    if arr.dtype.itemsize != 2 or arr.dtype.kind not in "iu":
        raise DecodeError(f"GPU decoder returned {arr.dtype} samples, expected 16-bit integers")
    bits = frame.bits_stored
    value = arr.view(np.uint16).astype(np.int32) & ((1 << bits) - 1)
    if frame.signed:
        value = (value ^ (1 << (bits - 1))) - (1 << (bits - 1))
        return value.astype(np.int16)
    return value.astype(np.uint16)


class NvImageCodecDecoder:
    """nvImageCodec's batch decoder on one GPU (nvJPEG2000 backend), host arrays out."""

    name = "nvimgcodec"

    def __init__(self, device_id: int = 0) -> None:
        reason = nvimgcodec_unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(reason)
        from nvidia import nvimgcodec

        self._nv = nvimgcodec
        # GPU backends only: a silent CPU fallback inside nvImageCodec would defeat the purpose.
        backends = [nvimgcodec.Backend(nvimgcodec.BackendKind.GPU_ONLY), nvimgcodec.Backend(nvimgcodec.BackendKind.HYBRID_CPU_GPU)]
        self._decoder = nvimgcodec.Decoder(device_id=int(device_id), backends=backends)
        # allow_any_depth keeps 12/16-bit precision (the default converts to 8 bits); UNCHANGED: no colour conversion
        self._params = nvimgcodec.DecodeParams(allow_any_depth=True, color_spec=nvimgcodec.ColorSpec.UNCHANGED)

    def decode(self, frames: list[J2kFrame]) -> list[np.ndarray | None]:
        """Decode a batch; ``Decoder.decode(list)`` returns None at positions it could not decode."""
        streams = [self._nv.CodeStream(f.codestream) for f in frames]
        images = self._decoder.decode(streams, params=self._params)
        return [None if img is None else np.asarray(img.cpu()) for img in images]


class GpuJ2kPath:
    """Routes JPEG 2000 frames to a GPU decoder where it is exact, to the CPU decoder elsewhere.

    One per process (decode workers are processes). ``outcomes`` counts :data:`GPU_DECODED` and
    each fallback reason.
    """

    def __init__(self, decoder: J2kDecoder | None, unavailable: str | None = None, allow_signed: bool = True) -> None:
        # None with ``unavailable``: no GPU decoder here, every frame is a CPU fallback with that reason.
        self.decoder = decoder
        self.unavailable = unavailable
        # False for decoders without an exact signed output (DALI's image decoder: docs/gpu.md).
        self.allow_signed = allow_signed
        self.verified: dict[tuple, bool] = {}
        self.refused: dict[tuple, str] = {}
        self.outcomes: Counter[str] = Counter()

    def decode(self, frame: J2kFrame, cpu_decode: Callable[[], np.ndarray]) -> np.ndarray:
        """Stored values of one frame; ``cpu_decode`` is the CPU decoder of the same frame."""
        return self.decode_many([frame], [cpu_decode])[0]

    def decode_many(self, frames: list[J2kFrame], cpu_decodes: list[Callable[[], np.ndarray]]) -> list[np.ndarray]:
        """Decode frames in one GPU batch where allowed; CPU decoder (and a counted reason) elsewhere."""
        out: list[Any] = [None] * len(frames)
        gpu_idx: list[int] = []
        for i, frame in enumerate(frames):
            why = self._why_not(frame)
            if why is None:
                gpu_idx.append(i)
            else:
                out[i] = self._cpu(cpu_decodes[i], why)
        if gpu_idx:
            try:
                decoded = self.decoder.decode([frames[i] for i in gpu_idx])  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001 - a decoder failure falls back, the run goes on
                log.debug("GPU JPEG 2000 batch failed", exc_info=True)
                decoded = [exc] * len(gpu_idx)
            for i, result in zip(gpu_idx, decoded):
                out[i] = self._accept(frames[i], result, cpu_decodes[i])
        return out

    def _why_not(self, frame: J2kFrame) -> str | None:
        if self.decoder is None:
            return self.unavailable or "no GPU JPEG 2000 decoder"
        why = not_for_gpu(frame)
        if why is None and frame.signed and not self.allow_signed:
            why = f"signed JPEG 2000 with the {self.decoder.name} decoder: it has no exact int16 output"
        return why or self.refused.get(frame.kind)

    def _cpu(self, cpu_decode: Callable[[], np.ndarray], reason: str) -> np.ndarray:
        self.outcomes[reason] += 1
        return cpu_decode()

    def _accept(self, frame: J2kFrame, result: Any, cpu_decode: Callable[[], np.ndarray]) -> np.ndarray:
        if isinstance(result, Exception) or result is None:
            what = f"{type(result).__name__}: {result}" if isinstance(result, Exception) else "it returned no image"
            return self._cpu(cpu_decode, f"the GPU decoder failed on a {frame.describe()} frame ({what[:200]})")
        try:
            stored = to_stored(result, frame)
        except DecodeError as exc:
            self.refused[frame.kind] = f"GPU decoder output unusable for {frame.describe()} JPEG 2000 ({exc})"
            return self._cpu(cpu_decode, self.refused[frame.kind])
        if frame.kind not in self.verified:
            reference = np.asarray(cpu_decode())
            same = reference.shape == stored.shape and reference.dtype == stored.dtype and np.array_equal(reference, stored)
            self.verified[frame.kind] = same
            if not same:
                diff = int(np.count_nonzero(reference.astype(np.int32) != stored.astype(np.int32))) if reference.shape == stored.shape else -1
                self.refused[frame.kind] = (
                    f"GPU decode of {frame.describe()} JPEG 2000 differs from openjpeg "
                    f"({'shape/dtype' if diff < 0 else f'{diff} pixels'}); CPU decoder used for this kind"
                )
                log.warning("%s", self.refused[frame.kind])
                self.outcomes[self.refused[frame.kind]] += 1
                return reference
        self.outcomes[GPU_DECODED] += 1
        return stored


# --decode choices of the JPEG 2000 decoder: the CPU (pydicom/openjpeg), nvImageCodec, DALI's mixed decoder.
J2K_DECODERS = ("cpu", "nvimgcodec", "dali")


def make_path(decoder: str, device_id: int = 0) -> GpuJ2kPath | None:
    """The GPU JPEG 2000 path for ``decoder`` (None for "cpu"); a decoder that cannot start here
    gives a path whose every frame falls back to the CPU with that reason."""
    if decoder == "cpu":
        return None
    if decoder not in J2K_DECODERS:
        raise ValueError(f"JPEG 2000 decoder must be one of {', '.join(J2K_DECODERS)}, got {decoder!r}")
    try:
        if decoder == "nvimgcodec":
            return GpuJ2kPath(NvImageCodecDecoder(device_id))
        from spinelevel.engine.dali import DaliJ2kDecoder

        # DALI's image decoder has no exact signed 16-bit output (docs/gpu.md): unsigned frames only
        return GpuJ2kPath(DaliJ2kDecoder(device="mixed", device_id=device_id), allow_signed=False)
    except Exception as exc:  # noqa: BLE001 - no GPU decoder: CPU decoding, with the reason recorded
        reason = str(exc) if isinstance(exc, BackendUnavailableError) else f"the {decoder} JPEG 2000 decoder could not start ({type(exc).__name__}: {exc})"
        log.warning("%s; JPEG 2000 is decoded on the CPU", reason)
        return GpuJ2kPath(None, unavailable=reason)
