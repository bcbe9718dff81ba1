"""Train a timm EfficientNetV2 slice classifier (the paper's recipe) and write checkpoints with cards.

Recipe defaults (the paper): ``tf_efficientnetv2_m``, 512 x 512 input, batch 16, Adam with learning
rate 1e-4, categorical cross-entropy on the softmax of the logits, 100 epochs, augmentation by
rotation, zoom, vertical and horizontal flip, best checkpoint by validation loss. Validation is split
by patient/study/series, never by slice (:func:`spinelevel.training.data.split_by_group`).

Outputs in ``out``:

- ``best.safetensors`` / ``last.safetensors``: the timm model's ``state_dict``; each with its card as
  ``<file>.card.json`` (``output: "logits"``, ``architecture``, ``training`` provenance);
- ``last.state.pt``: optimizer, scheduler, epoch, best-so-far and history, for ``--resume``;
- ``history.csv`` (``epoch, train_loss, train_acc, val_loss, val_acc, lr, seconds``), ``history.png``
  (paper Fig. 2), ``train.log``, ``split.json`` (which groups validated).

The model is made with ``timm.create_model(arch, num_classes=len(classes), pretrained=False,
exportable=True)``; ImageNet weights come only from a local file (``pretrained``) or timm's local
Hugging Face cache -- nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from spinelevel.card import ModelCard, sidecar_path
from spinelevel.engine.preprocess import PreprocessSpec
from spinelevel.errors import InputError, ModelError
from spinelevel.training import require_torch
from spinelevel.training.augment import AugmentSpec
from spinelevel.training.data import HUCache, SliceItem, SliceSet, collect_slices, model_input, split_by_group

__all__ = [
    "HISTORY_COLUMNS",
    "TrainConfig",
    "TrainProgress",
    "TrainResult",
    "train",
    "create_model",
    "load_checkpoint",
    "find_cached_weights",
]

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")
_DEFAULT_CARD = ModelCard()


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs besides its data."""

    # Output directory (checkpoints, history, log).
    out: Path
    # timm model name (any EfficientNetV2: tf_efficientnetv2_m as the paper, tf_efficientnetv2_b0, ...).
    arch: str = "tf_efficientnetv2_m"
    # Square model input in pixels (the card's input_size).
    input_size: int = 512
    # Epochs to train (in total, when resuming).
    epochs: int = 100
    # Slices per optimizer step.
    batch_size: int = 16
    # Adam learning rate.
    lr: float = 1e-4
    # 'constant' (the paper) or 'cosine' (decay to lr/100 over the epochs).
    schedule: str = "constant"
    # ImageNet (or other) weights as a local .safetensors/.pth file; None looks in timm's local cache.
    pretrained: Path | None = None
    # Look for pretrained weights in the local Hugging Face / torch hub caches when pretrained is None.
    use_cache: bool = True
    # Share of patients/studies/series held out for validation (0: none; best = last).
    val_fraction: float = 0.2
    # Seed of the split, the initialisation, the sampling and the augmentation.
    seed: int = 0
    # Continue the run in `out` from last.safetensors + last.state.pt.
    resume: bool = False
    # Loss class weights: 'none', 'balanced' (inverse frequency) or 'sqrt' (its square root).
    class_weights: str = "none"
    # Slices drawn (without replacement, new draw each epoch) per epoch; None: all training slices.
    samples_per_epoch: int | None = None
    # Evaluate at most this many validation slices (evenly spaced, the same each epoch); None: all.
    max_val_slices: int | None = None
    # Augmentation of training slices.
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    # HU windows (center, width) of the input channels; the card's default (3 channels).
    windows: tuple[tuple[float, float], ...] = _DEFAULT_CARD.windows
    # Per-channel mean and std of the card's normalisation.
    mean: tuple[float, ...] = _DEFAULT_CARD.mean
    std: tuple[float, ...] = _DEFAULT_CARD.std
    # Preprocessing version of the card (engine/preprocess.py): 2 crops or pads every slice to a
    # fixed field of view of fov_mm (by its PixelSpacing) before the resize.
    preprocess: int = 2
    fov_mm: float = 400.0
    # Keep BatchNorm in eval mode while training (its running statistics are not updated). Always
    # on when the pretrained weights come from an ONNX export, whose BatchNorm is folded away.
    freeze_bn: bool = False
    # 'auto' (cuda when available), 'cpu' or 'cuda'.
    device: str = "auto"
    # CPU threads for PyTorch (None: all cores).
    threads: int | None = None
    # DataLoader worker processes (0: load in the training process).
    workers: int = 0
    # Decode every slice into memory before the first epoch (fast epochs; needs RAM).
    cache: bool = True
    # Skip series with fewer slices (the engine's --min-slices; 1 keeps all).
    min_slices: int = 1
    # Inputs mixed into every epoch (for example a few labelled real CT series beside phantoms):
    # always trained on, never validated, drawn as `mix_share` of each epoch's slices.
    mix_in: tuple[Path, ...] = ()
    # Share of each epoch's slices drawn from `mix_in` (with replacement when they are fewer).
    mix_share: float = 0.25


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    # best.safetensors (lowest validation loss; the last epoch when there is no validation).
    best: Path
    # last.safetensors.
    last: Path
    # history.csv.
    history: Path
    # 1-based epoch of the best checkpoint.
    best_epoch: int
    # Its validation loss and accuracy (NaN without validation).
    best_val_loss: float
    best_val_acc: float
    # The classes of the model, in output order.
    classes: tuple[str, ...]


class TrainProgress(Protocol):
    """What training reports while it works (the CLI draws Rich progress bars)."""

    def loading(self, total: int) -> None: ...

    def loaded(self, done: int) -> None: ...

    def epoch_started(self, epoch: int, epochs: int, batches: int) -> None: ...

    def batch_done(self, loss: float, acc: float) -> None: ...

    def epoch_done(self, row: dict[str, float]) -> None: ...


class _NoProgress:
    def loading(self, total: int) -> None:
        pass

    def loaded(self, done: int) -> None:
        pass

    def epoch_started(self, epoch: int, epochs: int, batches: int) -> None:
        pass

    def batch_done(self, loss: float, acc: float) -> None:
        pass

    def epoch_done(self, row: dict[str, float]) -> None:
        pass


def create_model(arch: str, num_classes: int) -> Any:
    """``timm.create_model(arch, num_classes, pretrained=False, exportable=True)``, with a clear error."""
    require_torch()
    import timm

    if not timm.is_model(arch):
        raise InputError(f"--arch {arch!r} is not a timm model; try tf_efficientnetv2_m, tf_efficientnetv2_s or tf_efficientnetv2_b0")
    return timm.create_model(arch, num_classes=num_classes, pretrained=False, exportable=True)


def find_cached_weights(arch: str) -> Path | None:
    """A local copy of timm's pretrained weights for ``arch``, or None. Never downloads.

    Looks in the Hugging Face hub cache (``HF_HUB_CACHE``, ``HF_HOME/hub``,
    ``~/.cache/huggingface/hub``: ``models--timm--<arch>[.<tag>]/snapshots/*/model.safetensors`` or
    ``pytorch_model.bin``) and the torch hub checkpoint folder (``<arch>*.pth``).
    """
    roots = []
    if os.environ.get("HF_HUB_CACHE"):
        roots.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        roots.append(Path(os.environ["HF_HOME"]) / "hub")
    roots.append(Path.home() / ".cache" / "huggingface" / "hub")
    for root in roots:
        for repo in sorted(root.glob(f"models--timm--{arch}*")):
            name = repo.name[len("models--timm--") :]
            if name != arch and not name.startswith(arch + "."):
                continue
            for fname in ("model.safetensors", "pytorch_model.bin"):
                hits = sorted(repo.glob(f"snapshots/*/{fname}"))
                if hits:
                    return hits[-1]
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    hits = sorted((torch_home / "hub" / "checkpoints").glob(f"{arch}*.pth"))
    return hits[-1] if hits else None


def _read_state_dict(path: Path) -> dict[str, Any]:
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: pretrained weights not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelError(f"{path}: holds no state_dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_pretrained(model: Any, path: Path) -> dict[str, int]:
    """Load matching tensors (the classifier of another class count is left new); returns counts.

    An ``.onnx`` file (a model exported by ``spinelevel export``) loads with its BatchNorm folded
    into the convolutions (training/onnx_init.py).
    """
    if Path(path).suffix == ".onnx":
        from spinelevel.training.onnx_init import state_from_onnx

        return state_from_onnx(model, Path(path))
    state = _read_state_dict(path)
    own = model.state_dict()
    keep = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if len(keep) < 0.5 * len(own):
        raise ModelError(f"{path}: only {len(keep)} of {len(own)} tensors fit {type(model).__name__}; wrong --arch for these weights?")
    model.load_state_dict(keep, strict=False)
    skipped = sorted(set(own) - set(keep))
    log.info("pretrained weights %s: %d tensors loaded, %d left new (%s)", path, len(keep), len(skipped), ", ".join(skipped[:4]))
    return {"loaded": len(keep), "new": len(skipped)}


def load_checkpoint(checkpoint: Path, device: str = "cpu") -> tuple[Any, ModelCard]:
    """Rebuild the timm model of a ``.safetensors`` checkpoint from its sidecar card; eval mode.

    Raises:
        ModelError: the file or its card is missing, or the weights do not fit the architecture.
    """
    require_torch()
    from safetensors.torch import load_file

    from spinelevel.card import read_card

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise ModelError(f"{checkpoint}: checkpoint not found")
    if not sidecar_path(checkpoint).is_file():
        raise ModelError(f"{checkpoint}: no card beside it ({sidecar_path(checkpoint).name}); a checkpoint from 'spinelevel train' has one")
    card = read_card(checkpoint)
    arch = card.extra.get("architecture")
    if not arch:
        raise ModelError(f"{sidecar_path(checkpoint)}: the card has no 'architecture' (timm model name)")
    model = create_model(str(arch), len(card.classes))
    try:
        model.load_state_dict(load_file(str(checkpoint), device=device))
    except Exception as exc:
        raise ModelError(f"{checkpoint}: weights do not fit {arch} with {len(card.classes)} classes ({type(exc).__name__}: {str(exc)[:300]})") from None
    model.to(device).eval()
    return model, card


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but PyTorch sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise InputError(f"--device {name!r} must be auto, cpu or cuda")
    return name


def _class_weights(kind: str, counts: Sequence[int]) -> np.ndarray | None:
    if kind == "none":
        return None
    c = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    w = c.sum() / (len(c) * c)
    if kind == "sqrt":
        w = np.sqrt(w)
    elif kind != "balanced":
        raise InputError(f"--class-weights {kind!r} must be none, balanced or sqrt")
    return (w / np.average(w, weights=c)).astype(np.float32)  # mean weight per slice = 1


class _Slices:
    """A torch-style map dataset over some item indices, with the epoch's augmentation seed."""

    def __init__(self, data: SliceSet, indices: Sequence[int], cache: HUCache, spec: PreprocessSpec, augment: AugmentSpec, seed: int, epoch: int) -> None:
        self.data, self.indices, self.cache, self.spec = data, list(indices), cache, spec
        self.augment, self.seed, self.epoch = augment, seed, epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, n: int) -> tuple[Any, int]:
        import torch

        i = self.indices[n]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        item = self.data.items[i]
        x = model_input(self.cache.get(self.data.items, i), self.spec, self.augment, rng, item.spacing)
        return torch.from_numpy(x), self.data.items[i].label


def _loader(ds: _Slices, batch_size: int, workers: int, drop_last: bool = False) -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, drop_last=drop_last, persistent_workers=False)


def _save_checkpoint(model: Any, path: Path, card: ModelCard) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "architecture": str(card.extra.get("architecture", ""))})
    tmp.replace(path)
    side = sidecar_path(path)
    side_tmp = side.with_name(f".{side.name}.tmp")
    side_tmp.write_text(card.to_json() + "\n", encoding="utf-8")
    side_tmp.replace(side)


def _write_history(rows: list[dict[str, float]], out: Path, title: str) -> Path:
    path = out / "history.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(HISTORY_COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in HISTORY_COLUMNS})
    try:
        from spinelevel.report.history import plot_history

        plot_history(rows, out / "history.png", title)
    except ImportError:
        log.warning("matplotlib is not installed: history.png not written")
    return path


def _run_epoch(model: Any, loader: Any, criterion: Any, device: str, optimizer: Any | None, progress: TrainProgress, freeze_bn: bool = False) -> tuple[float, float]:
    import torch

    training = optimizer is not None
    model.train(training)
    if training and freeze_bn:
        # BatchNorm keeps its running statistics (identity ones after an ONNX initialisation)
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
    total_loss, correct, seen, batches = 0.0, 0, 0, 0
    t0 = time.perf_counter()
    with torch.set_grad_enabled(training):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            loss = criterion(logits, y)
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            n = int(y.shape[0])
            total_loss += float(loss.detach()) * n
            correct += int((logits.argmax(1) == y).sum())
            seen += n
            if training:
                progress.batch_done(total_loss / seen, correct / seen)
                batches += 1
                if batches % 50 == 0:
                    log.info("  batch %d: running loss %.4f acc %.3f, %.2f s/batch", batches, total_loss / seen, correct / seen, (time.perf_counter() - t0) / batches)
    if seen == 0:
        return math.nan, math.nan
    return total_loss / seen, correct / seen


def train(paths: Sequence[Path], labels: Sequence[Path], config: TrainConfig, progress: TrainProgress | None = None) -> TrainResult:
    """Train on labelled DICOM/phantom/NIfTI data and write checkpoints, history and log to ``config.out``.

    Raises:
        TrainingUnavailableError: torch, timm or safetensors is missing.
        InputError: bad data or options, or ``out`` holds another run and ``resume`` is False.
        ModelError: pretrained weights or the resumed checkpoint do not fit.
    """
    require_torch()
    import torch

    progress = progress or _NoProgress()
    out = Path(config.out)
    if config.epochs < 1 or config.batch_size < 1 or config.input_size < 16 or not config.lr > 0:
        raise InputError("--epochs and --batch-size must be >= 1, --input-size >= 16 and --lr > 0")
    if config.schedule not in ("constant", "cosine"):
        raise InputError(f"--schedule {config.schedule!r} must be constant or cosine")
    if config.mix_in and not 0.0 < config.mix_share < 1.0:
        raise InputError(f"--mix-share {config.mix_share} must be between 0 and 1 (exclusive)")
    state_file = out / "last.state.pt"
    if state_file.exists() and not config.resume:
        raise InputError(f"{out} already holds a training run (last.state.pt); give --resume to continue it or another --out")
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    pkg_logger = logging.getLogger("spinelevel")
    pkg_logger.addHandler(handler)
    old_level = pkg_logger.level
    if pkg_logger.getEffectiveLevel() > logging.INFO:
        pkg_logger.setLevel(logging.INFO)
    try:
        return _train(paths, labels, config, progress, out, state_file)
    finally:
        import torch

        # _train flushes denormals to zero for speed; that is process-wide CPU state, so undo it
        torch.set_flush_denormal(False)
        pkg_logger.removeHandler(handler)
        pkg_logger.setLevel(old_level)
        handler.close()


def _mixed_in(items: Sequence[SliceItem], mix_in: Sequence[Path]) -> set[int]:
    """Indices of the items whose file (DICOM file, archive or NIfTI volume) lies in a --mix-in input."""
    if not mix_in:
        return set()
    roots = [Path(p).resolve() for p in mix_in]

    def inside(path: str) -> bool:
        f = Path(path).resolve()
        return any(f == r or r in f.parents for r in roots)

    return {i for i, it in enumerate(items) if inside(it.ref.path)}


def epoch_order(base: Sequence[int], mix: Sequence[int], samples: int | None, mix_share: float, rng: np.random.Generator) -> list[int]:
    """One epoch's training slices, shuffled.

    Without ``mix``: ``samples`` of ``base`` drawn without replacement (all of them when ``samples``
    is None or larger). With ``mix``: the epoch holds ``samples`` slices (default: ``len(base)`` plus
    the mixed-in share), ``round(mix_share * n)`` of them from ``mix`` (without replacement while
    ``mix`` is large enough, else every mixed-in slice and the rest drawn again) and the others
    from ``base`` without replacement.
    """
    if not mix:
        if samples is not None and samples < len(base):
            return [base[i] for i in rng.choice(len(base), size=samples, replace=False)]
        return [base[i] for i in rng.permutation(len(base))]
    if not 0.0 < mix_share < 1.0:
        raise InputError(f"--mix-share {mix_share} must be between 0 and 1 (exclusive)")
    n = samples if samples is not None else round(len(base) / (1.0 - mix_share))
    n_mix = min(n, max(1, round(mix_share * n)))
    n_base = min(len(base), n - n_mix)
    picked_base = rng.choice(len(base), size=n_base, replace=False) if n_base else np.zeros(0, dtype=int)
    if n_mix <= len(mix):
        picked_mix = rng.choice(len(mix), size=n_mix, replace=False)
    else:
        picked_mix = np.concatenate([rng.permutation(len(mix)) for _ in range(n_mix // len(mix))]
                                    + [rng.choice(len(mix), size=n_mix % len(mix), replace=False)])
    order = [base[i] for i in picked_base] + [mix[i] for i in picked_mix]
    return [order[i] for i in rng.permutation(len(order))]


def _train(paths: Sequence[Path], labels: Sequence[Path], config: TrainConfig, progress: TrainProgress, out: Path, state_file: Path) -> TrainResult:
    import torch

    torch.set_num_threads(config.threads or max(1, os.cpu_count() or 1))
    # Denormal floats (gradients of a network trained from scratch produce them) make CPU
    # kernels many times slower; flushing them to zero changes nothing measurable in the result.
    torch.set_flush_denormal(True)
    device = _device(config.device)
    log.info("training %s at %d px on %s, config %s", config.arch, config.input_size, device, {k: str(v) for k, v in asdict(config).items()})

    data = collect_slices([*paths, *config.mix_in], labels, min_slices=config.min_slices)
    mixed = _mixed_in(data.items, config.mix_in)
    base = [i for i in range(len(data.items)) if i not in mixed]
    if config.mix_in and not mixed:
        raise InputError(f"--mix-in {', '.join(map(str, config.mix_in))}: no labelled slices found there")
    if config.mix_in and not base:
        raise InputError("--mix-in needs other training data beside it (the mixed-in slices are a share of each epoch)")
    base_train, val_idx = split_by_group([data.items[i] for i in base], config.val_fraction, config.seed)
    base_train, val_idx = [base[i] for i in base_train], [base[i] for i in val_idx]
    mix_idx = sorted(mixed)
    train_idx = [*base_train, *mix_idx]
    if config.max_val_slices is not None and len(val_idx) > config.max_val_slices:
        pick = np.linspace(0, len(val_idx) - 1, config.max_val_slices).round().astype(int)
        val_idx = [val_idx[i] for i in np.unique(pick)]
    val_groups = sorted({data.items[i].group for i in val_idx})
    (out / "split.json").write_text(json.dumps({"seed": config.seed, "val_groups": val_groups, "train_slices": len(train_idx), "val_slices": len(val_idx)}, indent=2) + "\n", encoding="utf-8")
    train_counts = data.counts(train_idx)
    log.info("classes %s; train slices per class %s; validation slices %d from %d group(s)", data.classes, train_counts, len(val_idx), len(val_groups))

    card = ModelCard(
        classes=data.classes,
        input_size=(config.input_size, config.input_size),
        windows=config.windows,
        mean=config.mean,
        std=config.std,
        output="logits",
        preprocess=config.preprocess,
        fov_mm=config.fov_mm,
    )
    spec = PreprocessSpec.from_card(card)

    torch.manual_seed(config.seed)
    model = create_model(config.arch, len(data.classes))
    pretrained = config.pretrained
    if pretrained is None and config.use_cache:
        pretrained = find_cached_weights(config.arch)
    pretrained_info: dict[str, Any] | None = None
    if not config.resume or not state_file.exists():
        if pretrained is not None:
            pretrained_info = {"path": str(pretrained), **_load_pretrained(model, pretrained)}
        elif config.use_cache:
            log.warning("no pretrained weights for %s (none given, none in the local cache): training from scratch", config.arch)
        else:
            log.info("training %s from scratch (pretrained weights not asked for)", config.arch)
    model.to(device)
    freeze_bn = config.freeze_bn or (pretrained is not None and Path(pretrained).suffix == ".onnx")

    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    if config.schedule == "cosine":
        lam = lambda e: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(e, config.epochs) / config.epochs))  # noqa: E731
    else:
        lam = lambda e: 1.0  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lam)
    weights = _class_weights(config.class_weights, [train_counts[c] for c in data.classes])
    criterion = torch.nn.CrossEntropyLoss(weight=None if weights is None else torch.from_numpy(weights).to(device))

    history: list[dict[str, float]] = []
    start, best_loss, best_epoch, best_acc = 0, math.inf, 0, math.nan
    if config.resume and state_file.exists():
        start, best_loss, best_epoch, best_acc, history, pretrained_info = _resume(out, state_file, model, optimizer, scheduler, card, config, device)
        log.info("resumed at epoch %d of %d (best so far: epoch %d, val loss %.4f)", start, config.epochs, best_epoch, best_loss)
    elif config.resume:
        log.warning("--resume: %s holds no earlier run; starting a new one", out)

    cache = HUCache()
    if config.cache:
        todo = [*train_idx, *val_idx]
        progress.loading(len(todo))
        t0 = time.perf_counter()
        cache.preload(data.items, todo, progress.loaded)
        log.info("decoded %d slices into memory in %.1f s", len(todo), time.perf_counter() - t0)

    provenance_base = {
        "data": data.summary,
        "classes_train_slices": train_counts,
        "val_slices": len(val_idx),
        "val_groups": len(val_groups),
        "split": "by patient_id, else study, else series",
        "seed": config.seed,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "optimizer": f"Adam lr={config.lr}",
        "schedule": config.schedule,
        "loss": "cross-entropy" + ("" if weights is None else f" (class weights {config.class_weights})"),
        "augment": asdict(config.augment),
        "samples_per_epoch": config.samples_per_epoch,
        "mix_in": ({"inputs": [str(p) for p in config.mix_in], "share": config.mix_share, "slices": len(mix_idx),
                    "groups": sorted({data.items[i].group for i in mix_idx})} if config.mix_in else None),
        "pretrained": pretrained_info,
        "freeze_bn": freeze_bn,
        "preprocess": config.preprocess,
        "fov_mm": config.fov_mm,
        "device": device,
        "torch": torch.__version__,
    }
    title = f"{config.arch} {config.input_size}px"
    for epoch in range(start, config.epochs):
        t0 = time.perf_counter()
        order_rng = np.random.default_rng([config.seed, epoch, 7])
        epoch_idx = epoch_order(base_train, mix_idx, config.samples_per_epoch, config.mix_share, order_rng)
        tr = _Slices(data, epoch_idx, cache, spec, config.augment, config.seed, epoch)
        lr = float(optimizer.param_groups[0]["lr"])
        # A last partial batch is dropped in training (BatchNorm cannot train on a batch of one);
        # the epoch's random draw changes every epoch, so no slice is always left out.
        drop = len(tr) > config.batch_size
        progress.epoch_started(epoch + 1, config.epochs, len(tr) // config.batch_size if drop else 1)
        train_loss, train_acc = _run_epoch(model, _loader(tr, config.batch_size, config.workers, drop), criterion, device, optimizer, progress, freeze_bn)
        scheduler.step()
        val_loss = val_acc = math.nan
        if val_idx:
            va = _Slices(data, val_idx, cache, spec, AugmentSpec(enabled=False), config.seed, 0)
            val_loss, val_acc = _run_epoch(model, _loader(va, config.batch_size, config.workers), criterion, device, None, progress)
        row = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc, "lr": lr, "seconds": round(time.perf_counter() - t0, 2)}
        history.append(row)
        score = val_loss if val_idx else train_loss
        improved = score < best_loss
        if improved:
            best_loss, best_epoch, best_acc = score, epoch + 1, (val_acc if val_idx else math.nan)
        provenance = {**provenance_base, "epochs_done": epoch + 1, "best_epoch": best_epoch, "best_val_loss": _num(best_loss if val_idx else math.nan), "best_val_acc": _num(best_acc)}
        _save_checkpoint(model, out / "last.safetensors", card.with_extra(architecture=config.arch, checkpoint="last", epoch=epoch + 1, training=provenance))
        if improved:
            _save_checkpoint(model, out / "best.safetensors", card.with_extra(architecture=config.arch, checkpoint="best", epoch=epoch + 1, training=provenance))
        state = {
            "epoch": epoch + 1,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "best_loss": best_loss,
            "best_epoch": best_epoch,
            "best_acc": best_acc,
            "history": history,
            "pretrained": pretrained_info,
            "config": {"arch": config.arch, "input_size": config.input_size, "classes": list(data.classes), "seed": config.seed},
        }
        torch.save(state, str(state_file.with_name(".last.state.pt.tmp")))
        state_file.with_name(".last.state.pt.tmp").replace(state_file)
        hist_path = _write_history(history, out, title)
        log.info("epoch %d/%d: %s%s", epoch + 1, config.epochs, {k: round(v, 4) for k, v in row.items()}, " (best)" if improved else "")
        progress.epoch_done(row)

    if not (out / "best.safetensors").is_file():
        raise ModelError(f"training in {out} produced no finite loss (see history.csv); lower --lr or check the data")
    hist_path = out / "history.csv"
    if not hist_path.exists():
        hist_path = _write_history(history, out, title)
    return TrainResult(
        best=out / "best.safetensors",
        last=out / "last.safetensors",
        history=hist_path,
        best_epoch=best_epoch,
        best_val_loss=best_loss if val_idx else math.nan,
        best_val_acc=best_acc,
        classes=data.classes,
    )


def _num(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _resume(out: Path, state_file: Path, model: Any, optimizer: Any, scheduler: Any, card: ModelCard, config: TrainConfig, device: str) -> tuple[int, float, int, float, list[dict[str, float]], Any]:
    import torch
    from safetensors.torch import load_file

    try:
        state = torch.load(str(state_file), map_location=device, weights_only=False)
    except Exception as exc:
        raise ModelError(f"{state_file}: cannot read the training state ({type(exc).__name__}: {exc})") from None
    saved = state.get("config", {})
    mine = {"arch": config.arch, "input_size": config.input_size, "classes": list(card.classes)}
    diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
    if diff:
        raise InputError(f"--resume: the run in {out} differs in {', '.join(f'{k} (was {a}, now {b})' for k, (a, b) in diff.items())}")
    model.load_state_dict(load_file(str(out / "last.safetensors"), device=device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]), float(state["best_loss"]), int(state["best_epoch"]), float(state["best_acc"]), list(state["history"]), state.get("pretrained")
