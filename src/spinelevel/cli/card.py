"""`spinelevel card show|set`: read or attach the model card of a model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from spinelevel.cli import app
from spinelevel.cli._common import fail_cleanly, stdout

card_app = typer.Typer(help="Show or attach the model card (what a model expects and emits).", no_args_is_help=True)
app.add_typer(card_app, name="card")


@card_app.command("show")
def show(model: Annotated[Path, typer.Argument(help="ONNX model (or a model with a MODEL.card.json sidecar).")]) -> None:
    """Print a model's card as JSON."""
    from spinelevel.card import read_card

    with fail_cleanly():
        card = read_card(model)
    stdout.print_json(card.to_json())


@card_app.command("set")
def set_card(
    model: Annotated[Path, typer.Argument(help="ONNX model to attach the card to.")],
    from_json: Annotated[Path, typer.Option("--from", help="JSON file with the card fields (format, classes, input_size, windows, scale, mean, std, output).")],
    out: Annotated[Path | None, typer.Option("--out", help="Write a new model here instead of changing MODEL in place.")] = None,
) -> None:
    """Attach a card to an ONNX model (embedded as metadata 'spinelevel.card'); other models get a sidecar."""
    from spinelevel.card import ModelCard, sidecar_path, write_onnx_card
    from spinelevel.errors import CardError, ModelError

    with fail_cleanly():
        if not from_json.is_file():
            raise CardError(f"{from_json}: card file not found")
        if not model.is_file():
            raise ModelError(f"{model}: model file not found")
        card = ModelCard.from_json(from_json.read_text(encoding="utf-8"), str(from_json))
        if model.suffix.lower() == ".onnx":
            written = write_onnx_card(model, card, out)
        else:
            written = sidecar_path(model)
            written.write_text(card.to_json(), encoding="utf-8")
    stdout.print(f"card attached: {written}")
