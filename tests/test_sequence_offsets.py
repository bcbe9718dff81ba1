"""scripts/sequence_offsets.py: level boundaries read from the real-CT evaluation's sequences."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sequence_offsets", ROOT / "scripts" / "sequence_offsets.py")
assert _spec is not None and _spec.loader is not None
so = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(so)


def test_expand_runs() -> None:
    assert so.expand("Tx2 -x1 L1x3") == ["T", "T", None, "L1", "L1", "L1"]
    with pytest.raises(ValueError, match="not a run"):
        so.expand("T2")


def test_a_boundary_in_the_disc_is_right_and_a_high_one_is_negative() -> None:
    truth = so.expand("Tx4 -x2 L1x4 -x1 L2x3")
    # the T/L1 boundary in the disc (either of its two slices) and L1/L2 on the first L2 slice: 0
    assert so.offsets(truth, so.expand("Tx5 L1x5 L2x4"))["boundaries"] == {"L1": 0, "L2": 0}
    # the junction two slices too high: two true T slices decoded L1, offset -2
    o = so.offsets(truth, so.expand("Tx2 L1x8 L2x4"))
    assert o == {"t_as_lumbar": 2, "boundaries": {"L1": -2, "L2": 0}}
    # L2 two slices too low
    assert so.offsets(truth, so.expand("Tx4 L1x9 L2x1"))["boundaries"]["L2"] == 2
    # excluded decoded slices are skipped, not counted as a level
    assert so.offsets(truth, so.expand("Tx4 -x2 L1x4 L2x4"))["boundaries"] == {"L1": 0, "L2": 0}
    assert so.offsets(truth, so.expand("Tx4 -x3 L1x3 L2x4"))["boundaries"] == {"L1": 1, "L2": 0}
    with pytest.raises(ValueError, match="truth has"):
        so.offsets(truth, so.expand("Tx3"))


def test_a_level_where_the_view_starts_has_no_boundary() -> None:
    assert so.offsets(so.expand("L2x3 -x1 L3x3"), so.expand("L2x2 L3x5"))["boundaries"] == {"L3": -1}


def test_reads_the_committed_markdown_and_json_alike(tmp_path: Path) -> None:
    md = ROOT / "tests" / "data" / "real_ct" / "results_demo_v11" / "real_ct_v11r256.md"
    cases = so.read_cases(md)
    assert len(cases) == 7
    amos = so.offsets(so.expand(cases["amos_0336"][0]), so.expand(cases["amos_0336"][1]))
    assert amos == {"t_as_lumbar": 0, "boundaries": {"L1": 0, "L2": 2, "L3": 0, "L4": 0, "L5": 5, "S": 1}}
    js = tmp_path / "results.json"
    js.write_text(json.dumps({"cases": [{"case": k, "truth_runs": t, "decoded_runs": d} for k, (t, d) in cases.items()]}))
    assert so.read_cases(js) == cases
    assert so.table([md]).count("\n") == 2 + 7 - 1
    bad = tmp_path / "notes.md"
    bad.write_text("# nothing here\n\n")
    with pytest.raises(ValueError, match="no level sequences"):
        so.read_cases(bad)
