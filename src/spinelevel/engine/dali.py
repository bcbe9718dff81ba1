"""DALI preprocessing: the card's math as one DALI graph, on the GPU or (in CI) on the CPU.

DALI has no DICOM reader: pydicom reads the pixel bytes and :class:`DaliPreprocessor` feeds them
through ``fn.external_source``: one int16 (H, W) slice per sample plus the per-sample
RescaleSlope/RescaleIntercept. The graph, parametrised by ``device`` ('cpu' or 'gpu'):

    raw int16 -> float HU = raw * slope + intercept -> HU below -1100 (out-of-FOV marks) = -1000
    -> (preprocessing version 2) fn.slice to the fixed field of view, padded with -1000
    -> (preprocessing version 3) fn.gaussian_blur, per-sample sigma and window from
       preprocess.antialias_sigmas (radius ceil(3 sigma), window 1 on an axis without blur)
    -> per window: clamp((HU - (center - width/2)) / width, 0, 1) * scale -> stack to HWC
    -> fn.resize(interp_type=INTERP_LINEAR, antialias=False) to input_size
    -> fn.crop_mirror_normalize(mean, std, output_layout="CHW") -> (C, h, w) float32

Pixel-centre convention: DALI's resize maps output pixel centres to input pixel centres (half-pixel,
like OpenCV INTER_LINEAR and our numpy resize) and replicates the border. Measured against
:func:`spinelevel.engine.preprocess.preprocess_slice` on the CPU graph (DALI 2.4, tests/test_dali.py):
max abs difference < 1e-5 after normalisation, for down- and upscaling and non-square slices; the
tests assert <= 1e-4.

JPEG 2000 on the GPU (DALI 2.4 / nvImageCodec 0.9, CPU path measured; docs/gpu.md):
``fn.decoders.image(output_type=ANY_DATA, dtype=UINT16)`` returns unsigned 12-bit codestreams
bit-exact; ``dtype=INT16`` is accepted but rescales to the int16 range (4095 -> 2047); signed
codestreams fail on the CPU path (OpenCV). :class:`DaliJ2kDecoder` (``device="mixed"``: nvJPEG2000)
is therefore used for unsigned frames only, behind :class:`spinelevel.engine.gpu_j2k.GpuJ2kPath`,
which compares the first frame of each kind with openjpeg; signed CT goes to nvImageCodec
(``--j2k-decoder nvimgcodec``) or the CPU. The ``mixed`` decoder has not been run here (no GPU).

Padding (PixelPaddingValue) is mapped to air before feeding by :func:`pack_slice`, which also turns
unsigned 16-bit storage into int16 exactly by moving 32768 * slope into the intercept. Undeclared
out-of-field-of-view values (HU below ``decode.BELOW_AIR_HU``: -2000, -3024, ...) become air in the
graph, right after the rescale, as ``decode.hu_from_stored`` does for the numpy path.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from spinelevel.errors import BackendUnavailableError, InputError

if TYPE_CHECKING:
    from spinelevel.engine.preprocess import PreprocessSpec

__all__ = [
    "DALI_REQUIRES",
    "DaliOptions",
    "PackedSlice",
    "dali_available",
    "pack_slice",
    "j2k_on_gpu",
    "build_pipeline",
    "DaliPreprocessor",
    "DaliJ2kDecoder",
]

log = logging.getLogger(__name__)

# Package that provides DALI (the CUDA 13 build also runs CPU-only graphs).
DALI_REQUIRES = ("nvidia-dali-cuda130",)

# Hounsfield value of padding (same as decode.AIR_HU; not imported: decode pulls in pydicom).
_AIR_HU = -1000.0
# Below this HU a value is an out-of-field-of-view mark, i.e. air (same as decode.BELOW_AIR_HU).
_BELOW_AIR_HU = -1100.0


def dali_available() -> bool:
    """True when nvidia.dali can be imported."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class DaliOptions:
    """How the DALI graph runs."""

    # "gpu" (all operators on the GPU, device_id required) or "cpu" (CI, no GPU needed).
    device: str = "gpu"
    # Slices per DALI batch (the pipeline's max batch size).
    batch_size: int = 16
    # CPU worker threads of the pipeline.
    num_threads: int = 2
    # CUDA device index for device="gpu" (ignored on the CPU).
    device_id: int = 0

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "gpu"):
            raise InputError(f"DALI device must be 'cpu' or 'gpu', got {self.device!r}")
        if self.batch_size < 1 or self.num_threads < 1:
            raise InputError("DALI batch_size and num_threads must be >= 1")


@dataclass(frozen=True)
class PackedSlice:
    """One slice ready for the DALI graph."""

    # Stored values as int16, (H, W).
    raw: np.ndarray
    # HU = raw * slope + intercept.
    slope: float
    intercept: float
    # PixelSpacing (row mm, column mm), for preprocessing version 2; None when unknown.
    spacing: tuple[float, float] | None = None


def pack_slice(raw: np.ndarray, slope: float = 1.0, intercept: float = 0.0, padding: np.ndarray | None = None, spacing: tuple[float, float] | None = None) -> PackedSlice:
    """Stored pixel values -> an int16 slice with the slope/intercept that give the same HU.

    uint16 storage is shifted by -32768 with ``intercept += 32768 * slope`` (exact); padding pixels
    get the stored value of air (-1000 HU), clipped to int16.

    Raises:
        InputError: not a 2-D integer array of at most 16 bits.
    """
    raw = np.asarray(raw)
    if raw.ndim != 2 or raw.dtype.kind not in "iu" or raw.dtype.itemsize > 2:
        raise InputError(f"DALI preprocessing takes 2-D 8/16-bit integer slices, got {raw.dtype} {raw.shape}")
    slope, intercept = float(slope), float(intercept)
    if raw.dtype == np.uint16:
        packed = (raw.astype(np.int32) - 32768).astype(np.int16)
        intercept += 32768.0 * slope
    else:
        packed = raw.astype(np.int16, copy=True)
    if padding is not None and padding.any():
        air = int(np.clip(round((_AIR_HU - intercept) / slope), -32768, 32767))
        packed[padding] = air
    return PackedSlice(np.ascontiguousarray(packed), slope, intercept, spacing)


def j2k_on_gpu(pixel_representation: int, bits_allocated: int) -> bool:
    """Whether a JPEG 2000 slice may be decoded by DALI's nvJPEG2000 (``mixed``) decoder.

    Only unsigned codestreams of at most 16 bits: DALI's image decoder has no INT16 output and its
    CPU path fails on signed codestreams (docs/gpu.md); signed CT goes through pydicom instead.
    """
    return int(pixel_representation) == 0 and int(bits_allocated) <= 16


def _import_dali() -> Any:
    if not dali_available():
        raise BackendUnavailableError(
            f"DALI preprocessing needs the package {DALI_REQUIRES[0]} (pip install {DALI_REQUIRES[0]})"
        )
    import nvidia.dali as dali

    return dali


def build_pipeline(spec: PreprocessSpec, options: DaliOptions = DaliOptions()) -> Any:
    """Build (but do not start) the DALI pipeline for ``spec``.

    Inputs (``feed_input`` names): ``raw`` int16 HW, ``slope`` and ``intercept`` float32 scalars.
    Output: (C, h, w) float32 per sample, on ``options.device``.
    """
    dali = _import_dali()
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    if options.device == "gpu":
        from spinelevel.engine.cuda import require_cuda

        require_cuda("DALI preprocessing on the GPU (use device 'cpu' without one)")
    device_id = options.device_id if options.device == "gpu" else None

    # prefetch_queue_depth=1: inputs are fed one batch at a time, as the pipeline produces them.
    @dali.pipeline_def(batch_size=options.batch_size, num_threads=options.num_threads, device_id=device_id, prefetch_queue_depth=1, exec_dynamic=True)
    def _graph():  # noqa: ANN202
        raw = fn.external_source(name="raw", dtype=types.INT16, ndim=2, layout="HW", device="cpu")
        slope = fn.external_source(name="slope", dtype=types.FLOAT, ndim=0, device="cpu")
        intercept = fn.external_source(name="intercept", dtype=types.FLOAT, ndim=0, device="cpu")
        if options.device == "gpu":
            raw = raw.gpu()  # one H2D copy of int16 (half the bytes of float32)
        hu = fn.cast(raw, dtype=types.FLOAT) * slope + intercept
        # out-of-field-of-view marks -> air, exactly: hu + 1 * (air - hu) is air in float32 here
        hu = hu + fn.cast(hu < _BELOW_AIR_HU, dtype=types.FLOAT) * (_AIR_HU - hu)
        if spec.fov_mm is not None:
            # preprocessing version 2: the fixed field of view, cropped or padded with air
            # (preprocess.fov_box per sample, from its PixelSpacing)
            start = fn.external_source(name="fov_start", dtype=types.INT64, ndim=1, device="cpu")
            shape = fn.external_source(name="fov_shape", dtype=types.INT64, ndim=1, device="cpu")
            hu = fn.slice(hu, start, shape, axes=[0, 1], out_of_bounds_policy="pad", fill_values=_AIR_HU)
        if spec.antialias:
            # preprocessing version 3: the antialiasing low-pass (preprocess.gaussian_blur)
            sigma = fn.external_source(name="aa_sigma", dtype=types.FLOAT, ndim=1, device="cpu")
            window = fn.external_source(name="aa_window", dtype=types.INT32, ndim=1, device="cpu")
            hu = fn.gaussian_blur(hu, sigma=sigma, window_size=window, dtype=types.FLOAT)
        chans = []
        for center, width in spec.windows:
            low = float(center) - float(width) / 2.0
            chan = dmath.clamp((hu - low) * (1.0 / float(width)), 0.0, 1.0)
            if spec.scale != 1.0:
                chan = chan * float(spec.scale)
            chans.append(chan)
        x = fn.stack(*chans, axis=2, axis_name="C")  # HWC: the layout fn.resize and normalize expect
        x = fn.resize(x, size=[int(v) for v in spec.input_size], interp_type=types.INTERP_LINEAR, antialias=False, dtype=types.FLOAT)
        return fn.crop_mirror_normalize(x, mean=[float(v) for v in spec.mean], std=[float(v) for v in spec.std], output_layout="CHW", dtype=types.FLOAT)

    return _graph()


class DaliPreprocessor:
    """Runs the DALI graph over lists of slices and returns model-ready batches."""

    def __init__(self, spec: PreprocessSpec, options: DaliOptions = DaliOptions()) -> None:
        self.spec = spec
        self.options = options
        self._pipe = build_pipeline(spec, options)
        self._pipe.build()

    def _run(self, slices: list[PackedSlice]) -> Any:
        if not 1 <= len(slices) <= self.options.batch_size:
            raise InputError(f"DALI batch of {len(slices)} slices; give 1..{self.options.batch_size}")
        self._pipe.feed_input("raw", [s.raw for s in slices])
        self._pipe.feed_input("slope", [np.float32(s.slope) for s in slices])
        self._pipe.feed_input("intercept", [np.float32(s.intercept) for s in slices])
        if self.spec.fov_mm is not None:
            from spinelevel.engine.preprocess import fov_box

            boxes = [fov_box(*s.raw.shape, s.spacing, self.spec.fov_mm) for s in slices]
            self._pipe.feed_input("fov_start", [np.asarray([top, left], np.int64) for _, _, top, left in boxes])
            self._pipe.feed_input("fov_shape", [np.asarray([rows, cols], np.int64) for rows, cols, _, _ in boxes])
        if self.spec.antialias:
            from spinelevel.engine.preprocess import antialias_sigmas

            shapes = [(b[0], b[1]) for b in boxes] if self.spec.fov_mm is not None else [s.raw.shape for s in slices]
            sig = [antialias_sigmas(h, w, self.spec.input_size) for h, w in shapes]
            # an axis without blur: a one-tap window (its sigma only has to be positive)
            self._pipe.feed_input("aa_sigma", [np.asarray([max(v, 0.01) for v in sg], np.float32) for sg in sig])
            self._pipe.feed_input("aa_window", [np.asarray([2 * math.ceil(3.0 * v) + 1 if v > 0 else 1 for v in sg], np.int32) for sg in sig])
        (out,) = self._pipe.run()
        return out

    def run_device(self, slices: list[PackedSlice]) -> Any:
        """Preprocess one batch and keep it where it was made.

        Returns:
            On the GPU, a dense DALI ``TensorGPU`` of shape (n, C, h, w) that exposes
            ``__cuda_array_interface__`` (feed it to the TensorRT backend without a copy; it is valid
            until the next call). On the CPU, a numpy array.
        """
        out = self._run(slices)
        dense = out.as_tensor()  # all samples share (C, h, w): no copy for a uniform batch
        if self.options.device == "gpu":
            return dense
        return np.array(dense)

    def run(self, slices: list[PackedSlice]) -> np.ndarray:
        """Preprocess one batch into a host (n, C, h, w) float32 array."""
        out = self._run(slices)
        if self.options.device == "gpu":
            out = out.as_cpu()
        return np.array(out.as_tensor(), dtype=np.float32)

    def close(self) -> None:
        """Release the pipeline."""
        self._pipe = None


class DaliJ2kDecoder:
    """JPEG 2000 / HTJ2K codestreams decoded by DALI's ``fn.decoders.image`` (a
    :class:`spinelevel.engine.gpu_j2k.J2kDecoder`): ``device="mixed"`` is nvJPEG2000 on the GPU,
    ``device="cpu"`` DALI's CPU path (CI).

    ``output_type=ANY_DATA, dtype=UINT16``: measured on DALI 2.4's CPU path, an unsigned 12-bit
    codestream comes back bit-exact (no rescaling to 16 bits); ``dtype=INT16`` is accepted but
    rescales to the int16 range (4095 -> 2047), and signed codestreams fail on the CPU path (OpenCV).
    So this decoder is used for unsigned frames only (``GpuJ2kPath(allow_signed=False)``), and the
    GPU path's first-frame comparison with openjpeg checks the ``mixed`` output per kind before it is
    trusted. Decoded slices come back to host memory (0.5 MB per 512 x 512 slice) and are packed and
    fed to the preprocessing graph like CPU-decoded slices, so :func:`build_pipeline` is unchanged.
    """

    name = "dali"

    def __init__(self, device: str = "mixed", device_id: int = 0, batch_size: int = 16, num_threads: int = 2) -> None:
        if device not in ("mixed", "cpu"):
            raise InputError(f"DALI JPEG 2000 decoder device must be 'mixed' or 'cpu', got {device!r}")
        dali = _import_dali()
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types

        if device == "mixed":
            from spinelevel.engine.cuda import require_cuda

            require_cuda("DALI's GPU JPEG 2000 decoder (device 'mixed')")
        self.device = device
        self.batch_size = int(batch_size)

        @dali.pipeline_def(batch_size=self.batch_size, num_threads=num_threads, device_id=device_id if device == "mixed" else None, prefetch_queue_depth=1, exec_dynamic=True)
        def _graph():  # noqa: ANN202
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, device="cpu")
            return fn.decoders.image(encoded, device=device, output_type=types.ANY_DATA, dtype=types.UINT16)

        self._pipe = _graph()
        self._pipe.build()

    def decode(self, frames: list) -> list[np.ndarray | None]:
        """Decode frames (``J2kFrame``) in batches of at most ``batch_size``; host arrays (H, W, 1) out."""
        out: list[np.ndarray | None] = []
        for start in range(0, len(frames), self.batch_size):
            chunk = frames[start : start + self.batch_size]
            self._pipe.feed_input("encoded", [np.frombuffer(f.codestream, dtype=np.uint8) for f in chunk])
            (images,) = self._pipe.run()
            if self.device == "mixed":
                images = images.as_cpu()
            out.extend(np.array(images.at(i)) for i in range(len(chunk)))
        return out

    def close(self) -> None:
        """Release the pipeline."""
        self._pipe = None
