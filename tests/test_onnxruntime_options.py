"""ONNX Runtime backend session options: the intra-op spinning knob (issue 17)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelgen import reference_probs
from spinelevel.card import read_card
from spinelevel.engine.backends import BackendOptions, load_backend

_KEY = "session.intra_op.allow_spinning"


@pytest.mark.parametrize(("spinning", "entry"), [(None, ""), (True, "1"), (False, "0")])
def test_spinning_reaches_the_session(model_path: Path, spinning: bool | None, entry: str) -> None:
    backend = load_backend("onnxruntime", model_path, read_card(model_path), BackendOptions(spinning=spinning))
    opts = backend._session.get_session_options()
    if entry:
        assert opts.get_session_config_entry(_KEY) == entry
    else:  # no entry: ONNX Runtime's default (spinning on) is left alone
        with pytest.raises(RuntimeError, match="does not have configuration"):
            opts.get_session_config_entry(_KEY)
    x = np.random.default_rng(0).random((5, 3, 32, 32), dtype=np.float32)
    assert np.allclose(backend.infer(x), reference_probs(x), atol=1e-5)
    backend.close()


@pytest.mark.parametrize(("workers", "choice", "expected"), [(2, None, False), (0, None, None), (2, True, True), (0, False, False)])
def test_runs_turn_spinning_off_while_decode_workers_share_the_cores(tmp_path: Path, model_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int, choice: bool | None, expected: bool | None) -> None:
    import json

    from dicomgen import SeriesSpec, write_series
    from spinelevel.engine import pipeline

    seen = []
    real = pipeline.load_backend
    monkeypatch.setattr(pipeline, "load_backend", lambda name, model, card, options: seen.append(options.spinning) or real(name, model, card, options))
    write_series(tmp_path / "in", SeriesSpec(levels=["L2", "L3", "L3", "L4"], size=32))
    pipeline.run([tmp_path / "in"], model_path, tmp_path / "out", pipeline.RunOptions(workers=workers, ort_spinning=choice, sampling=pipeline.SamplingOptions(mode="full")))
    assert seen == [expected]
    manifest = json.loads((tmp_path / "out" / "run.json").read_text())["runs"][-1]
    assert manifest["options"]["ort_spinning"] == expected
