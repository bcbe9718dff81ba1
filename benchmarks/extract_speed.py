"""Extract speed: the L3 picks of a 50-study phantom run, against what a user would script.

    python benchmarks/extract_speed.py [--studies 50] [--size 128] [--rounds 3] [--work DIR] [--out results.json]

Makes a phantom archive (``spinelevel phantom``) and runs the demo model over it (``spinelevel
run``), once, in ``--work`` (kept and reused when given). Then, interleaved for ``--rounds`` rounds
into fresh folders:

- baseline: what a user scripts today: pyarrow reads the series table, finds each ``l3_sop_uid``'s
  source in the slices table and ``shutil.copy`` s it to ``<study>/<series>/L3.dcm`` (no identity
  check, no fsync, no KOS, no preview, folders only);
- engine, copies only: ``extract_run`` with ``--no-kos --no-png``;
- engine, everything: ``extract_run`` with the defaults (copy, KOS, PNG preview, manifest);
- engine, again: the same into the folder of the previous one (an idempotent rerun: compares, writes nothing).

One warm-up extract runs first (imports highdicom, Pillow). The best round of each is reported, and the
command line (``python -m spinelevel extract``, imports included) is timed once. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as pads

from spinelevel.bench.machine import describe_machine, emit_json
from spinelevel.extract import ExtractOptions, extract_run


def _prepare(work: Path, studies: int, size: int) -> Path:
    archive, run = work / "archive", work / "run"
    if not (run / "run.json").is_file():
        subprocess.run([sys.executable, "-m", "spinelevel", "phantom", str(archive), "--studies", str(studies), "--size", str(size), "--seed", "4242"], check=True)
        subprocess.run([sys.executable, "-m", "spinelevel", "run", str(archive), "--model", "demo", "--out", str(run), "--quiet"], check=True)
    return run


def baseline(run: Path, out: Path) -> int:
    """The script a user would write: read the picks, look up their files, copy them."""
    series = pads.dataset(run / "series").to_table(columns=["study_uid", "series_uid", "status", "l3_sop_uid"])
    series = series.filter(pc.and_(pc.equal(series["status"], "ok"), pc.is_valid(series["l3_sop_uid"])))
    slices = pads.dataset(run / "slices").to_table(columns=["sop_uid", "source"], filter=pc.field("sop_uid").isin(series["l3_sop_uid"]))
    source = dict(zip(slices["sop_uid"].to_pylist(), slices["source"].to_pylist()))
    n = 0
    for study, uid, sop in zip(series["study_uid"].to_pylist(), series["series_uid"].to_pylist(), series["l3_sop_uid"].to_pylist()):
        folder = out / study / uid
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(source[sop], folder / "L3.dcm")
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="keep the phantom archive and run here (reused when present)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        run = _prepare(work, args.studies, args.size)
        scratch = Path(tmp) / "scratch"
        extract_run(run, scratch / "warmup", ExtractOptions())
        times: dict[str, list[float]] = {"baseline": [], "engine_copies_only": [], "engine_full": [], "engine_again": []}
        counts: dict[str, int] = {}
        for r in range(args.rounds):
            t0 = time.perf_counter()
            counts["baseline"] = baseline(run, scratch / f"base{r}")
            times["baseline"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            s = extract_run(run, scratch / f"copies{r}", ExtractOptions(kos=False, png=False))
            times["engine_copies_only"].append(time.perf_counter() - t0)
            counts["engine_copies_only"] = s.instances
            t0 = time.perf_counter()
            s = extract_run(run, scratch / f"full{r}", ExtractOptions())
            times["engine_full"].append(time.perf_counter() - t0)
            counts["engine_full"] = s.instances
            t0 = time.perf_counter()
            s = extract_run(run, scratch / f"full{r}", ExtractOptions())
            times["engine_again"].append(time.perf_counter() - t0)
            counts["engine_again"] = s.written
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "spinelevel", "extract", str(run), "--out", str(scratch / "cli"), "--quiet"], check=True)
        cli_seconds = time.perf_counter() - t0
        n_series = pads.dataset(run / "series").count_rows()
    best = {k: min(v) for k, v in times.items()}
    result = {
        "benchmark": "extract_speed",
        "machine": describe_machine(),
        "studies": args.studies,
        "size": args.size,
        "series_in_run": n_series,
        "picks": counts["engine_full"],
        "rounds": args.rounds,
        "seconds_best": {k: round(v, 3) for k, v in best.items()},
        "seconds_all": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "ms_per_pick_best": {k: round(1000 * v / max(1, counts["engine_full"]), 2) for k, v in best.items()},
        "ratio_to_baseline": {k: round(v / best["baseline"], 2) for k, v in best.items()},
        "files_written_by_rerun": counts["engine_again"],
        "cli_seconds_with_imports": round(cli_seconds, 3),
    }
    emit_json(result, args.out)


if __name__ == "__main__":
    main()
