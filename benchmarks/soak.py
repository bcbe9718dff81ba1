"""Soak test: run a phantom archive again and again, SIGKILL it at random moments, resume, and
check every final output against a clean run (no lost, duplicated or changed row).

    python benchmarks/soak.py --iterations 20 --studies 4 --size 128 --out soak.json

Prints one JSON object (machine, kills survived, rows compared, mismatches).
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from spinelevel.bench.end_to_end import phantom_archive
from spinelevel.bench.machine import describe_machine, emit_json

KEYS = {"slices": ["sop_uid"], "series": ["series_uid"], "skipped": ["source", "reason"]}


def _cmd(archive: Path, model: str, out: Path, rows_per_part: int) -> list[str]:
    return [sys.executable, "-m", "spinelevel", "run", str(archive), "--model", model, "--out", str(out), "--sampling", "full", "--rows-per-part", str(rows_per_part), "--quiet"]


def _tables(out: Path) -> dict:
    return {name: pq.read_table(out / name).sort_by([(k, "ascending") for k in KEYS[name]]) for name in KEYS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--max-kills", type=int, default=3, help="kills per iteration before the final resume")
    parser.add_argument("--rows-per-part", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="spinelevel-soak-"))
    archive = phantom_archive(work, args.studies, args.size)
    clean_out = work / "clean"
    start = time.perf_counter()
    subprocess.run(_cmd(archive, args.model, clean_out, args.rows_per_part), check=True)
    clean_s = time.perf_counter() - start
    expected = _tables(clean_out)
    kills = mismatches = rows = 0
    details = []
    for it in range(args.iterations):
        out = work / f"iter{it}"
        n_kills = rng.randint(1, args.max_kills)
        delays = []
        for _ in range(n_kills):
            delay = rng.uniform(0.2, clean_s * 1.1)
            proc = subprocess.Popen(_cmd(archive, args.model, out, args.rows_per_part))
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait()
            delays.append(round(delay, 2))
        subprocess.run(_cmd(archive, args.model, out, args.rows_per_part), check=True)
        got = _tables(out)
        bad = []
        for name, table in expected.items():
            other = got[name]
            rows += table.num_rows
            if name == "series":
                table, other = table.drop(["model_sha256"]), other.drop(["model_sha256"])
            if not table.equals(other):
                bad.append(name)
        mismatches += len(bad)
        details.append({"iteration": it, "kill_delays_s": delays, "mismatched": bad})
    result = {
        "machine": describe_machine(),
        "archive": {"studies": args.studies, "size": args.size, "slices": expected["slices"].num_rows},
        "clean_run_s": round(clean_s, 2),
        "iterations": args.iterations,
        "kills_survived": kills,
        "rows_compared": rows,
        "mismatches": mismatches,
        "details": details,
    }
    emit_json(result, args.out)
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
