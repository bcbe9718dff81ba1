"""`spinelevel train`: train an EfficientNetV2 slice classifier on labelled DICOM, phantom or NIfTI data."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from spinelevel.cli import app
from spinelevel.cli._common import fail_cleanly, setup_logging, stderr

__all__ = ["RichTrainProgress", "train"]


class RichTrainProgress:
    """Rich progress: decoding slices into memory, then one bar per epoch with running loss/accuracy."""

    def __init__(self, enabled: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=stderr,
            disable=not enabled,
        )
        self.task = None

    def __enter__(self) -> RichTrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def loading(self, total: int) -> None:
        self.task = self.progress.add_task("decoding slices", total=total, info="")

    def loaded(self, done: int) -> None:
        self.progress.update(self.task, completed=done)

    def epoch_started(self, epoch: int, epochs: int, batches: int) -> None:
        self.task = self.progress.add_task(f"epoch {epoch}/{epochs}", total=batches, info="")

    def batch_done(self, loss: float, acc: float) -> None:
        self.progress.update(self.task, advance=1, info=f"loss {loss:.4f} acc {acc:.3f}")

    def epoch_done(self, row: dict[str, float]) -> None:
        self.progress.update(
            self.task,
            info=f"loss {row['train_loss']:.4f} acc {row['train_acc']:.3f} | val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f} | {row['seconds']:.0f} s",
        )


@app.command("train")
def train(
    data: Annotated[list[Path], typer.Argument(help="DICOM folders/archives, phantom folders (labels found inside) or NIfTI case folders (ct.nii.gz + vertebra masks).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory: best/last .safetensors + card, history.csv/png, train.log.")],
    labels: Annotated[list[Path] | None, typer.Option("--labels", "-l", help="Labels table(s) (Parquet/CSV: series_uid, sop_uid, level) for DICOM inputs; repeatable.")] = None,
    arch: Annotated[str, typer.Option("--arch", help="timm model name (any EfficientNetV2).")] = "tf_efficientnetv2_m",
    input_size: Annotated[int, typer.Option("--input-size", min=16, help="Square model input in pixels.")] = 512,
    preprocess: Annotated[int, typer.Option("--preprocess", min=1, max=3, help="Preprocessing version written into the card: 2 crops or pads every slice, by its PixelSpacing, to a fixed field of view (--fov-mm) so anatomy has one scale in every series; 3 also low-passes the slice before the resize (antialiasing: real 0.7-1 mm slices do not alias); 1 resizes slices as they are (models before version 2).")] = 2,
    fov_mm: Annotated[float, typer.Option("--fov-mm", min=50.0, max=2000.0, help="Preprocessing 2: the square field of view in mm.")] = 400.0,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Epochs (in total, when resuming).")] = 100,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Slices per step.")] = 16,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Adam learning rate.")] = 1e-4,
    schedule: Annotated[str, typer.Option("--schedule", help="Learning-rate schedule: constant (the paper) or cosine.")] = "constant",
    pretrained: Annotated[Path | None, typer.Option("--pretrained", help="Local weights to start from: ImageNet .safetensors/.pth, a spinelevel checkpoint, an exported spinelevel .onnx (fine-tuning; BatchNorm then stays frozen) or 'demo' (the bundled model, with --arch tf_efficientnetv2_b0); default: timm's local cache if it has them.")] = None,
    no_cache_weights: Annotated[bool, typer.Option("--from-scratch", help="Do not look for pretrained weights in the local cache.")] = False,
    val_fraction: Annotated[float, typer.Option("--val-fraction", min=0.0, max=0.95, help="Share of patients/studies/series for validation.")] = 0.2,
    seed: Annotated[int, typer.Option("--seed", help="Seed of split, initialisation, sampling and augmentation.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")] = False,
    class_weights: Annotated[str, typer.Option("--class-weights", help="Loss class weights: none, balanced or sqrt.")] = "none",
    samples_per_epoch: Annotated[int | None, typer.Option("--samples-per-epoch", min=1, help="Random training slices per epoch (default: all).")] = None,
    max_val_slices: Annotated[int | None, typer.Option("--max-val-slices", min=1, help="Validate on at most this many (evenly spaced) slices.")] = None,
    mix_in: Annotated[list[Path] | None, typer.Option("--mix-in", help="Inputs (DICOM with --labels, NIfTI cases) mixed into every epoch, e.g. a few labelled real CT series beside phantoms: always trained on, never validated; repeatable.")] = None,
    mix_share: Annotated[float, typer.Option("--mix-share", min=0.01, max=0.99, help="Share of each epoch's slices drawn from --mix-in (drawn again when they are fewer).")] = 0.25,
    no_augment: Annotated[bool, typer.Option("--no-augment", help="Switch augmentation off.")] = False,
    augment: Annotated[str, typer.Option("--augment", help="paper (rotation, zoom, flips) domain (the paper's plus field-of-view crops, HU scale/shift, blur/sharpen and noise: for phantoms towards real CT) domain-spine (domain plus spine-centred cut-outs in a quarter of the slices, as spine CT is often shared) or domain-coarse (domain plus resolution augmentation in half the slices: re-sampled to 1.3-2.6 times coarser pixels and back, as 3-5 mm body CT looks enlarged).")] = "paper",
    freeze_bn: Annotated[bool, typer.Option("--freeze-bn", help="Keep BatchNorm statistics fixed while training (always on when --pretrained is an .onnx).")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="PyTorch CPU threads (default: all cores).")] = None,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Data loader processes.")] = 0,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Decode slices every epoch instead of keeping them in memory.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Train a slice classifier (the paper's recipe by default) and write checkpoints with cards."""
    setup_logging(verbose)
    # train.log gets the INFO record of the run; the terminal only warnings (unless --verbose).
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.DEBUG if verbose else logging.WARNING)
    with fail_cleanly():
        from spinelevel.models import resolve_model
        from spinelevel.training import require_torch

        require_torch()
        from spinelevel.training.train import TrainConfig
        from spinelevel.training.train import train as run_training

        config = TrainConfig(
            out=out,
            arch=arch,
            input_size=input_size,
            preprocess=preprocess,
            fov_mm=fov_mm,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            schedule=schedule,
            pretrained=None if pretrained is None else resolve_model(pretrained),
            use_cache=not no_cache_weights,
            val_fraction=val_fraction,
            seed=seed,
            resume=resume,
            class_weights=class_weights,
            samples_per_epoch=samples_per_epoch,
            max_val_slices=max_val_slices,
            augment=_augment_spec(augment, no_augment),
            freeze_bn=freeze_bn,
            device=device,
            threads=threads,
            workers=workers,
            cache=not no_cache,
            mix_in=tuple(mix_in or ()),
            mix_share=mix_share,
        )
        with RichTrainProgress(not quiet and stderr.is_terminal) as progress:
            result = run_training(data, labels or [], config, progress)
    if not quiet:
        stderr.print(
            f"best epoch {result.best_epoch}: val loss {result.best_val_loss:.4f}, val acc {result.best_val_acc:.4f}; "
            f"checkpoint {result.best} (classes {', '.join(result.classes)}); history {result.history}"
        )


def _augment_spec(name: str, off: bool):  # noqa: ANN202 - AugmentSpec
    from spinelevel.errors import InputError
    from spinelevel.training.augment import DOMAIN_COARSE, DOMAIN_RANDOMISATION, DOMAIN_SPINE, AugmentSpec

    specs = {"paper": AugmentSpec(), "domain": DOMAIN_RANDOMISATION, "domain-spine": DOMAIN_SPINE, "domain-coarse": DOMAIN_COARSE}
    if name not in specs:
        with fail_cleanly():
            raise InputError(f"--augment {name!r}: choose paper, domain, domain-spine or domain-coarse")
    spec = specs[name]
    return AugmentSpec(enabled=False) if off else spec
