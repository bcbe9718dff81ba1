"""`spinelevel bench`: throughput benchmarks, each against a baseline measured in the same run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from spinelevel.cli import app
from spinelevel.cli._common import fail_cleanly, setup_logging, stderr, stdout


@app.command("bench")
def bench(
    out: Annotated[Path, typer.Option("--out", "-o", help="Write the results here as JSON.")] = Path("bench.json"),
    quick: Annotated[bool, typer.Option("--quick", help="Small sizes: a few minutes on two cores.")] = False,
    work: Annotated[Path, typer.Option("--work", help="Scratch directory for phantom archives and models (kept, reused).")] = Path(".bench-work"),
    model: Annotated[Path | None, typer.Option("--model", "-m", help="ONNX model for the end-to-end runs (default: the demo model).")] = None,
    only: Annotated[list[str] | None, typer.Option("--only", help="Run only these sections: decode, inference, end_to_end, vs_script, scaling.")] = None,
    scaling: Annotated[str | None, typer.Option("--scaling", help="Archive sizes of the scaling section, in studies, comma-separated (default 1,4,16; --quick 1,2,4), e.g. 1,4,16,50.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Decode, inference, end-to-end and scaling throughput, written as JSON."""
    from spinelevel.bench.suite import FULL, QUICK, run_suite
    from spinelevel.errors import InputError

    import logging

    setup_logging(verbose)
    logging.getLogger("spinelevel.bench").setLevel(logging.INFO)
    sections = tuple(only) if only else ("decode", "inference", "end_to_end", "vs_script", "scaling")
    with fail_cleanly():
        bad = [s for s in sections if s not in ("decode", "inference", "end_to_end", "vs_script", "scaling")]
        if bad:
            raise InputError(f"--only {', '.join(bad)}: choose from decode, inference, end_to_end, vs_script, scaling")
        config = QUICK if quick else FULL
        if scaling is not None:
            config = replace(config, scaling_sizes=_sizes(scaling))
        result = run_suite(config, work, model, sections)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    stderr.print(f"benchmarks written to {out} ({result['seconds']} s)")
    stdout.print_json(json.dumps(_summary(result)))


def _sizes(text: str) -> tuple[int, ...]:
    from spinelevel.errors import InputError

    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise InputError(f"--scaling {text!r}: give study counts of at least 1, comma-separated, e.g. 1,4,16,50")
    return sizes


def _summary(result: dict) -> dict:
    s: dict = {}
    if "decode" in result:
        s["decode_speedup"] = {k: v["speedup"] for k, v in result["decode"]["codecs"].items()}
        s["decode_speedup_threads"] = {k: v["speedup_threads"] for k, v in result["decode"]["codecs"].items()}
    if isinstance(result.get("end_to_end"), dict):
        e = result["end_to_end"]
        s["e2e"] = {"full_slices_per_s": e["full"]["slices_per_s"], "sparse_slices_per_s": e["sparse"]["slices_per_s"], "sparse_speedup": e["sparse_speedup"], **e["agreement"]}
    if "scaling" in result:
        s["scaling"] = [(r["studies_in_archive"], r["wall_s"], r["peak_rss_mib"]) for r in result["scaling"]["runs"]]
    return s
