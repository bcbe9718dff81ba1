"""ModelCard: what a model expects and what it emits.

A card travels with every model the engine runs: inside an ONNX file as the metadata property
``spinelevel.card`` (a JSON string), beside any other model file as ``<model>.card.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spinelevel.errors import CardError, ModelError

__all__ = [
    "CARD_FORMAT",
    "CARD_METADATA_KEY",
    "PREPROCESS_VERSIONS",
    "ModelCard",
    "read_card",
    "write_onnx_card",
    "sidecar_path",
    "file_sha256",
]

CARD_FORMAT = "spinelevel.card/1"
CARD_METADATA_KEY = "spinelevel.card"
# The preprocessing versions of ModelCard.preprocess (engine/preprocess.py documents each).
PREPROCESS_VERSIONS = (1, 2, 3)

_HOW_TO_ATTACH = (
    "attach a card with 'spinelevel card set {model} --from card.json' "
    "(see 'spinelevel card show' on a working model for the fields)"
)


@dataclass(frozen=True)
class ModelCard:
    """What a model expects as input and what its output means."""

    # Class names in output order; must follow anatomical order T, L1..L5, S and contain L3.
    classes: tuple[str, ...] = ("T", "L1", "L2", "L3", "L4", "L5", "S")
    # Model input (height, width) in pixels; slices are resized bilinearly to it.
    input_size: tuple[int, int] = (512, 512)
    # One (center, width) HU window per input channel.
    windows: tuple[tuple[float, float], ...] = ((40.0, 400.0), (400.0, 1800.0), (-600.0, 1500.0))
    # Multiplier applied after windowing to [0, 1] (255 for models trained on 8-bit images).
    scale: float = 1.0
    # Per-channel mean subtracted after scaling.
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    # Per-channel standard deviation divided by after the mean.
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    # "probabilities" (softmax already applied) or "logits".
    output: str = "probabilities"
    # Version of the preprocessing the model was trained with (engine/preprocess.py): 1 (cards
    # without the field) resizes the slice as it is; 2 first crops or pads it, by its PixelSpacing,
    # to a fixed square field of view of fov_mm, so anatomy has one scale in every series; 3 also
    # low-passes the HU slice before the resize (antialiasing), so fine real-CT texture does not alias.
    preprocess: int = 1
    # Preprocessing versions 2 and 3: the field of view in mm (ignored by version 1).
    fov_mm: float = 400.0
    # Anything else the card carried (architecture, provenance, hashes): kept and written back.
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        from spinelevel.levels import validate_classes

        validate_classes(self.classes)
        if len(self.input_size) != 2 or any(int(v) < 8 or int(v) > 4096 for v in self.input_size):
            raise CardError(f"card input_size {list(self.input_size)} must be two sizes in 8..4096")
        n = len(self.windows)
        if n == 0:
            raise CardError("card windows is empty: give one [center, width] per input channel")
        for w in self.windows:
            if len(w) != 2 or not all(math.isfinite(v) for v in w) or w[1] <= 0:
                raise CardError(f"card window {list(w)} must be [center, width] with width > 0")
        if len(self.mean) != n or len(self.std) != n:
            raise CardError(
                f"card mean ({len(self.mean)}) and std ({len(self.std)}) need one value per "
                f"window ({n})"
            )
        if any(s == 0 or not math.isfinite(s) for s in self.std):
            raise CardError(f"card std {list(self.std)} must be finite and non-zero")
        if not math.isfinite(self.scale) or self.scale == 0:
            raise CardError(f"card scale {self.scale} must be finite and non-zero")
        if self.output not in ("probabilities", "logits"):
            raise CardError(f"card output {self.output!r} must be 'probabilities' or 'logits'")
        if not (math.isfinite(self.fov_mm) and 50.0 <= self.fov_mm <= 2000.0):
            raise CardError(f"card fov_mm {self.fov_mm} must be between 50 and 2000 mm")
        if self.preprocess not in PREPROCESS_VERSIONS:
            raise CardError(f"card preprocess {self.preprocess!r} is not a preprocessing version this spinelevel knows ({', '.join(map(str, PREPROCESS_VERSIONS))}); a newer spinelevel made this model")

    @property
    def channels(self) -> int:
        """Number of input channels (one per window)."""
        return len(self.windows)

    def to_dict(self) -> dict[str, Any]:
        """The card as JSON-ready data, ``format`` first, extra fields after the known ones."""
        out: dict[str, Any] = {
            "format": CARD_FORMAT,
            "classes": list(self.classes),
            "input_size": [int(v) for v in self.input_size],
            "windows": [[float(c), float(w)] for c, w in self.windows],
            "scale": float(self.scale),
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "output": self.output,
        }
        if self.preprocess != 1:  # cards of version-1 models stay as they were
            out["preprocess"] = int(self.preprocess)
            out["fov_mm"] = float(self.fov_mm)
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out

    def to_json(self) -> str:
        """Serialise to a JSON string."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Any, origin: str = "card") -> ModelCard:
        """Build a card from parsed JSON; ``origin`` names the file in error messages."""
        if not isinstance(data, dict):
            raise CardError(f"{origin}: a card must be a JSON object, got {type(data).__name__}")
        fmt = data.get("format", CARD_FORMAT)
        if fmt != CARD_FORMAT:
            raise CardError(f"{origin}: card format {fmt!r} is not {CARD_FORMAT!r}")
        missing = [k for k in ("classes", "input_size", "windows") if k not in data]
        if missing:
            raise CardError(f"{origin}: card lacks required field(s) {', '.join(missing)}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        n = len(data["windows"]) if isinstance(data["windows"], list) else 0
        try:
            card = cls(
                classes=tuple(str(c) for c in data["classes"]),
                input_size=tuple(int(v) for v in data["input_size"]),  # type: ignore[arg-type]
                windows=tuple((float(c), float(w)) for c, w in data["windows"]),
                scale=float(data.get("scale", 1.0)),
                mean=tuple(float(v) for v in data.get("mean", [0.0] * n)),
                std=tuple(float(v) for v in data.get("std", [1.0] * n)),
                output=str(data.get("output", "probabilities")),
                preprocess=_int_field(data.get("preprocess", 1), "preprocess"),
                fov_mm=float(data.get("fov_mm", 400.0)),
                extra={k: v for k, v in data.items() if k not in known and k != "format"},
            )
        except CardError as exc:
            raise CardError(f"{origin}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise CardError(f"{origin}: malformed card field ({exc})") from None
        return card

    @classmethod
    def from_json(cls, text: str, origin: str = "card") -> ModelCard:
        """Parse a JSON string; ``origin`` names the file in error messages."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CardError(f"{origin}: card is not valid JSON ({exc})") from None
        return cls.from_dict(data, origin)

    def with_extra(self, **fields: Any) -> ModelCard:
        """A copy with more provenance fields."""
        return dataclasses.replace(self, extra={**self.extra, **fields})


def _int_field(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def sidecar_path(model: Path) -> Path:
    """Where the JSON card of a non-ONNX model lives: ``<model>.card.json``."""
    return model.with_name(model.name + ".card.json")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_onnx_metadata(model: Path) -> dict[str, str]:
    import onnx

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise ModelError(f"{model}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    return {p.key: p.value for p in proto.metadata_props}


def read_card(model: Path) -> ModelCard:
    """Read the card of a model: the ONNX metadata property, else the JSON sidecar.

    Raises:
        ModelError: the model file is missing or unreadable.
        CardError: no card, or an invalid one; the message says how to attach one.
    """
    model = Path(model)
    if not model.is_file():
        raise ModelError(f"{model}: model file not found")
    sidecar = sidecar_path(model)
    if model.suffix.lower() == ".onnx":
        meta = _read_onnx_metadata(model)
        if CARD_METADATA_KEY in meta:
            return ModelCard.from_json(meta[CARD_METADATA_KEY], f"{model} (metadata {CARD_METADATA_KEY})")
    if sidecar.is_file():
        return ModelCard.from_json(sidecar.read_text(encoding="utf-8"), str(sidecar))
    raise CardError(
        f"{model}: the model has no spinelevel card; " + _HOW_TO_ATTACH.format(model=model)
    )


def write_onnx_card(model: Path, card: ModelCard, out: Path | None = None) -> Path:
    """Embed ``card`` in an ONNX file's metadata (replacing an older card), atomically.

    Args:
        model: the ONNX file to read.
        card: the card to embed.
        out: where to write; defaults to overwriting ``model`` (through a temporary file).
    """
    import onnx

    model = Path(model)
    out = Path(out) if out is not None else model
    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as exc:
        raise ModelError(f"{model}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    kept = [p for p in proto.metadata_props if p.key != CARD_METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key = CARD_METADATA_KEY
    entry.value = json.dumps(card.to_dict())
    tmp = out.with_name(f".{out.name}.tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(out)
    return out
