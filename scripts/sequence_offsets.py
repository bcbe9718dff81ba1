"""Where a model puts each level boundary on the real cases, read from scripts/real_ct_eval.py's
output (results.json, or the results.md committed under tests/data/real_ct/results_demo_*/).

For every case and every true boundary (the first slice labelled L1, L2, ..., S, superior to
inferior), the offset in slices of the first slice the engine decoded at that level or below:
negative means the boundary is put too high (too far cranial), positive too low, 0 anywhere in the
excluded disc slices between the two levels or on the first labelled slice. ``T as lumbar`` is
the number of truly thoracic slices decoded as a lumbar level or below: the thoracolumbar junction
put too high (issue 14, results_demo_v11.md and results_demo_v12.md).

Usage::

    python scripts/sequence_offsets.py tests/data/real_ct/results_demo_v12/real_ct_v12r256c.md [...]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ORDER = ("T", "L1", "L2", "L3", "L4", "L5", "S")
_RUN = re.compile(r"^(.+)x(\d+)$")


def expand(runs: str) -> list[str | None]:
    """'Tx2 -x1 L1x3' -> ['T', 'T', None, 'L1', 'L1', 'L1'] (None: excluded or unlabelled)."""
    out: list[str | None] = []
    for token in runs.split():
        m = _RUN.match(token)
        if m is None:
            raise ValueError(f"not a run: {token!r}")
        out += [None if m.group(1) == "-" else m.group(1)] * int(m.group(2))
    return out


def offsets(truth: list[str | None], decoded: list[str | None]) -> dict:
    """Boundary offsets (slices) and the count of true T slices decoded lumbar or below."""
    if len(truth) != len(decoded):
        raise ValueError(f"truth has {len(truth)} slices, decoded {len(decoded)}")
    rank = {lev: i for i, lev in enumerate(ORDER)}
    result: dict = {"t_as_lumbar": sum(1 for t, d in zip(truth, decoded) if t == "T" and d is not None and rank[d] > 0)}
    bounds: dict[str, int] = {}
    for level in ORDER[1:]:
        first_true = next((i for i, t in enumerate(truth) if t == level), None)
        if first_true is None or first_true == next(i for i, t in enumerate(truth) if t is not None):
            continue  # the level is not in view, or it is where the labelled view starts: no boundary
        # the excluded or unlabelled slices just above (the disc) belong to either side: a decoded
        # boundary anywhere from the first of them to the first labelled slice counts as 0
        gap_start = first_true
        while gap_start > 0 and truth[gap_start - 1] is None:
            gap_start -= 1
        first_dec = next((i for i, d in enumerate(decoded) if d is not None and rank[d] >= rank[level]), None)
        if first_dec is not None:
            bounds[level] = first_dec - gap_start if first_dec < gap_start else max(0, first_dec - first_true)
    result["boundaries"] = bounds
    return result


def read_cases(path: Path) -> dict[str, tuple[str, str]]:
    """case -> (truth runs, decoded runs) from a results.json or results.md."""
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return {c["case"]: (c["truth_runs"], c["decoded_runs"]) for c in data["cases"]}
    cases: dict[str, tuple[str, str]] = {}
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines[:-2]):
        if lines[i + 1].startswith("  truth   ") and lines[i + 2].startswith("  decoded "):
            cases[line.strip()] = (lines[i + 1][len("  truth   "):], lines[i + 2][len("  decoded "):])
    if not cases:
        raise ValueError(f"{path}: no level sequences found (expected scripts/real_ct_eval.py's results.md or results.json)")
    return cases


def table(paths: list[Path]) -> str:
    rows = ["| results | case | T as lumbar | boundary offsets, slices (- too high) |", "| --- | --- | ---: | --- |"]
    for path in paths:
        for case, (truth, decoded) in read_cases(path).items():
            o = offsets(expand(truth), expand(decoded))
            b = ", ".join(f"{k} {v:+d}" for k, v in o["boundaries"].items()) or "-"
            rows.append(f"| {path.name} | {case} | {o['t_as_lumbar']} | {b} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, nargs="+", help="real_ct_eval.py results.json or results.md files")
    args = p.parse_args(argv)
    text = table(args.results)
    print(text)
    return text


if __name__ == "__main__":
    main()
