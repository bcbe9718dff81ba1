"""Export a training checkpoint (timm ``.safetensors`` + card) to ONNX with the card embedded.

Choices:

- The model is rebuilt with ``timm.create_model(..., exportable=True)`` (static "same" padding of
  the ``tf_`` variants, no run-time padding subgraph) and exported with the dynamo exporter
  (``torch.onnx.export(..., dynamo=True)``, needs onnxscript); where that fails the legacy
  TorchScript exporter is used. The card's ``exporter`` field says which.
- A Softmax is appended inside the graph: the exported model emits **probabilities** (card
  ``output: "probabilities"``), so every backend and the FP16 path get the engine's expected output
  without a host-side softmax.
- The batch axis is dynamic (input ``image`` ``[N, C, H, W]``, output ``probabilities``
  ``[N, classes]``).
- Card extra fields: ``architecture``, ``exporter``, ``opset``, ``onnx_sha256`` (sha256 of the ONNX
  file *before* the card was embedded, i.e. of the graph alone; the card cannot hold the hash of the
  file that contains it), ``checkpoint_sha256``, ``parity`` (tolerance, measured difference, slices)
  and the checkpoint's ``training`` provenance.
- Parity: ONNX Runtime (CPU) against PyTorch on real preprocessed slices (from ``data``: DICOM,
  phantom or NIfTI folders; else slices rendered by the phantom generator), as the max absolute
  difference of the probabilities. Above ``tolerance`` the export fails with the measured value and
  nothing is written at ``out``.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spinelevel.card import ModelCard, file_sha256, write_onnx_card
from spinelevel.engine.preprocess import PreprocessSpec, preprocess_batch
from spinelevel.errors import InputError, ModelError

__all__ = ["ExportOptions", "ExportResult", "export_checkpoint", "parity_slices"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportOptions:
    """How a checkpoint is exported and checked."""

    # ONNX opset of the exported graph.
    opset: int = 18
    # 'auto' (dynamo, falling back to legacy), 'dynamo' or 'legacy'.
    exporter: str = "auto"
    # Largest tolerated max |p_ort - p_torch| over the parity slices.
    tolerance: float = 1e-4
    # Real slices used for the parity check.
    parity_slices: int = 16
    # Seed of the phantom slices used when no data is given.
    seed: int = 0


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and measured."""

    # The ONNX file.
    path: Path
    # Its card (output 'probabilities').
    card: ModelCard
    # Measured max |p_ort - p_torch|.
    max_abs_diff: float
    # Slices compared.
    n_slices: int
    # 'dynamo' or 'legacy'.
    exporter: str


class _WithSoftmax:
    """Built lazily (torch is optional): model -> softmax(model(x), dim=1)."""

    @staticmethod
    def wrap(model: Any) -> Any:
        import torch

        class WithSoftmax(torch.nn.Module):
            def __init__(self, inner: torch.nn.Module) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, image: torch.Tensor) -> torch.Tensor:
                return torch.softmax(self.inner(image), dim=1)

        return WithSoftmax(model).eval()


def parity_slices(card: ModelCard, data: Sequence[Path] = (), n: int = 16, seed: int = 0) -> np.ndarray:
    """(n, C, H, W) preprocessed real slices: evenly spaced over the series of ``data``, else phantom slices.

    Raises:
        InputError: ``data`` holds no readable CT slice.
    """
    spec = PreprocessSpec.from_card(card)
    hus: list[np.ndarray] = []
    spacings: list[tuple[float, float] | None] = []
    if data:
        pairs = _data_slices(list(data), n)
        hus, spacings = [h for h, _ in pairs], [sp for _, sp in pairs]
        if not hus:
            raise InputError(f"no CT slices found in {', '.join(map(str, data))} for the parity check")
    else:
        from spinelevel.phantom import Anatomy, PhantomOptions, plan_study

        spec_study = plan_study(PhantomOptions(studies=1, seed=seed, size=256, noise=1.0), 0)
        anatomy = Anatomy(spec_study)
        z = spec_study.series[0].z
        hus = [anatomy.render(float(zz)) for zz in z[np.linspace(0, len(z) - 1, n).round().astype(int)]]
        spacings = [(spec_study.pixel_spacing, spec_study.pixel_spacing)] * len(hus)
    return preprocess_batch(hus, spec, spacings)


def _data_slices(paths: list[Path], n: int) -> list[tuple[np.ndarray, tuple[float, float] | None]]:
    from spinelevel.engine.decode import read_hu
    from spinelevel.engine.scan import scan_paths
    from spinelevel.engine.select import SelectOptions, select_series
    from spinelevel.training.data import find_nifti_cases, nifti_spacing
    from spinelevel.training.labels import canonical_volume, volume_slice

    out: list[tuple[np.ndarray, tuple[float, float] | None]] = []
    for case in sorted({c for p in paths for c in find_nifti_cases(p)}):
        ct = case / "ct.nii.gz" if (case / "ct.nii.gz").is_file() else case / "ct.nii"
        vol, affine = canonical_volume(ct)
        vol = np.asarray(vol, dtype=np.float32)
        ks = np.linspace(0, vol.shape[2] - 1, max(1, n // 2)).round().astype(int)
        out.extend((volume_slice(vol, int(k)), nifti_spacing(affine)) for k in ks)
    plans = select_series(scan_paths(paths), SelectOptions(min_slices=1)).plans
    refs = [(s, plan.pixel_spacing) for plan in plans for s in plan.slices]
    if refs:
        for i in np.unique(np.linspace(0, len(refs) - 1, n).round().astype(int)):
            ref, spacing = refs[int(i)]
            try:
                out.append((read_hu(ref.source, 1 << 30, ref.frame)[0], spacing))
            except Exception as exc:  # a bad file is not the export's problem; use the others
                log.warning("parity slice %s unreadable: %s", ref.source.label, exc)
    return out[: max(n, 1)] if len(out) > n else out


def _export(wrapped: Any, dummy: Any, path: Path, opset: int, exporter: str) -> str:
    import torch

    if exporter in ("auto", "dynamo"):
        try:
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.onnx.export(
                wrapped,
                (dummy,),
                dynamo=True,
                opset_version=opset,
                input_names=["image"],
                output_names=["probabilities"],
                dynamic_shapes={"image": {0: batch}},
                optimize=True,
                verbose=False,
            )
            program.save(str(path))
            return "dynamo"
        except Exception as exc:
            if exporter == "dynamo":
                raise ModelError(f"the dynamo ONNX exporter failed ({type(exc).__name__}: {str(exc)[:300]}); try --exporter legacy") from None
            log.warning("dynamo exporter failed (%s: %s); using the legacy exporter", type(exc).__name__, str(exc)[:200])
    import warnings

    with warnings.catch_warnings():
        # The legacy exporter announces its deprecation; it is the documented fallback here.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapped,
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["image"],
            output_names=["probabilities"],
            dynamic_axes={"image": {0: "N"}, "probabilities": {0: "N"}},
        )
    return "legacy"


def export_checkpoint(checkpoint: Path, out: Path, data: Sequence[Path] = (), options: ExportOptions = ExportOptions()) -> ExportResult:
    """Export ``checkpoint`` to ``out`` (ONNX with card), after a parity check against PyTorch.

    Raises:
        TrainingUnavailableError: torch/timm/safetensors missing.
        ModelError: the checkpoint cannot be loaded, the export fails, or parity exceeds the tolerance
            (the message gives the measured difference).
    """
    import onnx
    import onnxruntime as ort
    import torch

    from spinelevel.training.train import load_checkpoint

    if options.exporter not in ("auto", "dynamo", "legacy"):
        raise InputError(f"--exporter {options.exporter!r} must be auto, dynamo or legacy")
    model, card = load_checkpoint(Path(checkpoint))
    if card.output != "logits":
        raise ModelError(f"{checkpoint}: card output is {card.output!r}; a training checkpoint emits logits")
    wrapped = _WithSoftmax.wrap(model)
    x = parity_slices(card, data, options.parity_slices, options.seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        raw = Path(tmp) / "model.onnx"
        with torch.no_grad():
            exporter = _export(wrapped, torch.from_numpy(x[:2].copy()), raw, options.opset, options.exporter)
            expected = wrapped(torch.from_numpy(x)).numpy()
        proto = onnx.load(str(raw))
        if any(init.external_data for init in proto.graph.initializer):
            onnx.save(proto, str(raw), save_as_external_data=False)  # one self-contained file
        onnx.checker.check_model(str(raw))
        graph_sha = file_sha256(raw)
        session = ort.InferenceSession(str(raw), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        got = np.concatenate([session.run(None, {name: x[i : i + 5]})[0] for i in range(0, len(x), 5)])
        diff = float(np.max(np.abs(got - expected)))
        log.info("parity ORT vs PyTorch on %d slices: max abs prob diff %.3g (tolerance %.3g)", len(x), diff, options.tolerance)
        if not diff <= options.tolerance:
            raise ModelError(
                f"ONNX Runtime and PyTorch disagree on {len(x)} real slices: max abs probability difference "
                f"{diff:.3g} exceeds the tolerance {options.tolerance:.3g}; nothing written to {out}"
            )
        training = card.extra.get("training")
        final = ModelCard(
            classes=card.classes,
            input_size=card.input_size,
            windows=card.windows,
            scale=card.scale,
            mean=card.mean,
            std=card.std,
            output="probabilities",
            preprocess=card.preprocess,
            extra={
                "architecture": card.extra.get("architecture"),
                "exporter": f"torch.onnx ({exporter}), torch {torch.__version__}",
                "opset": options.opset,
                "onnx_sha256": graph_sha,
                "onnx_sha256_of": "the ONNX file before the card was embedded",
                "checkpoint": Path(checkpoint).name,
                "checkpoint_sha256": file_sha256(Path(checkpoint)),
                "parity": {"max_abs_diff": diff, "tolerance": options.tolerance, "n_slices": int(len(x)), "reference": "PyTorch float32 on CPU"},
                **({"training": training} if training is not None else {}),
            },
        )
        write_onnx_card(raw, final, out)
    return ExportResult(path=out, card=final, max_abs_diff=diff, n_slices=int(len(x)), exporter=exporter)
