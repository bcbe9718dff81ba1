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
