"""ModelCard: validation, JSON round trip, ONNX metadata and sidecars, and `spinelevel card`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelgen import build_model, make_card
from spinelevel.card import CARD_METADATA_KEY, ModelCard, read_card, sidecar_path, write_onnx_card
from spinelevel.cli import app
from spinelevel.errors import CardError, ModelError


def test_default_card_matches_design() -> None:
    d = ModelCard().to_dict()
    assert d == {
        "format": "spinelevel.card/1",
        "classes": ["T", "L1", "L2", "L3", "L4", "L5", "S"],
        "input_size": [512, 512],
        "windows": [[40.0, 400.0], [400.0, 1800.0], [-600.0, 1500.0]],
        "scale": 1.0,
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],
        "output": "probabilities",
    }


def test_round_trip_keeps_extra_fields() -> None:
    card = make_card().with_extra(onnx_sha256="ab" * 32)
    back = ModelCard.from_json(card.to_json())
    assert back == card
    assert back.extra["architecture"] == "test-nearest-center"
    assert back.extra["onnx_sha256"] == "ab" * 32


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"classes": ["T", "L2", "L1", "L3"]}, "order"),
        ({"classes": ["T", "L1", "L2"]}, "L3"),
        ({"windows": [[40, 0]]}, "width"),
        ({"std": [1.0, 0.0, 1.0]}, "std"),
        ({"mean": [0.0]}, "mean"),
        ({"output": "scores"}, "output"),
        ({"input_size": [512]}, "input_size"),
        ({"format": "other/2"}, "format"),
    ],
)
def test_invalid_cards_are_refused_with_the_field(patch: dict, message: str) -> None:
    data = ModelCard().to_dict() | patch
    with pytest.raises(CardError, match=message):
        ModelCard.from_dict(data, "card.json")


def test_missing_required_field() -> None:
    with pytest.raises(CardError, match="windows"):
        ModelCard.from_dict({"classes": list(ModelCard().classes), "input_size": [512, 512]}, "x.json")


def test_onnx_metadata_round_trip(tmp_path: Path) -> None:
    model = build_model(tmp_path / "m.onnx", card=False)
    with pytest.raises(CardError) as info:
        read_card(model)
    assert "spinelevel card set" in str(info.value) and str(model) in str(info.value)
    write_onnx_card(model, make_card())
    write_onnx_card(model, make_card())  # replacing keeps a single entry
    import onnx

    props = [p.key for p in onnx.load(str(model)).metadata_props]
    assert props.count(CARD_METADATA_KEY) == 1
    assert read_card(model) == make_card()


def test_sidecar_for_other_models(tmp_path: Path) -> None:
    model = tmp_path / "m.engine"
    model.write_bytes(b"engine bytes")
    sidecar_path(model).write_text(make_card().to_json())
    assert read_card(model) == make_card()


def test_unreadable_model(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all \x00\xff")
    with pytest.raises(ModelError, match="bad.onnx"):
        read_card(bad)
    with pytest.raises(ModelError, match="not found"):
        read_card(tmp_path / "missing.onnx")


def test_cli_card_set_and_show(tmp_path: Path) -> None:
    runner = CliRunner()
    model = build_model(tmp_path / "m.onnx", card=False)
    result = runner.invoke(app, ["card", "show", str(model)])
    assert result.exit_code == 1
    assert "spinelevel card set" in result.output
    card_json = tmp_path / "card.json"
    card_json.write_text(make_card().to_json())
    result = runner.invoke(app, ["card", "set", str(model), "--from", str(card_json)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["card", "show", str(model)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["classes"] == list(make_card().classes)


def test_cli_card_set_rejects_bad_json(tmp_path: Path) -> None:
    model = build_model(tmp_path / "m.onnx", card=False)
    card_json = tmp_path / "card.json"
    card_json.write_text('{"classes": ["T"], "input_size": [512, 512], "windows": [[40, 400]]}')
    result = CliRunner().invoke(app, ["card", "set", str(model), "--from", str(card_json)])
    assert result.exit_code == 1
    assert "card.json" in result.output and "L3" in result.output
