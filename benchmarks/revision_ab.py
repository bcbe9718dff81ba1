"""Before/after: the same archive through `spinelevel run` of two revisions, interleaved.

    python benchmarks/revision_ab.py --base 21597d3 --studies 3 --size 512 --rounds 4 \
        --out benchmarks/results/real_archives_overhead.json
    python benchmarks/revision_ab.py --base 0db22a5 --compression rle --studies 2 --size 512 --rounds 3

The base revision is checked out into a temporary git worktree and run with ``PYTHONPATH`` pointing at
its ``src`` (same virtual environment, same model file, same archive); the working tree's code is the
"after". Runs alternate base, head, base, head ... so both see the same machine load; the result is
the best and median wall time of each and their ratio (head / base: below 1 is faster). Sampling is
``full`` so both decode every slice (the path the change touches).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spinelevel.bench.end_to_end import phantom_archive
from spinelevel.bench.machine import describe_machine, emit_json

REPO = Path(__file__).resolve().parent.parent


def _run(src: Path, archive: Path, model: Path, out: Path, workers: int | None) -> float:
    if out.exists():
        shutil.rmtree(out)
    env = dict(os.environ, PYTHONPATH=str(src))
    cmd = [sys.executable, "-m", "spinelevel", "run", str(archive), "--model", str(model), "--out", str(out), "--sampling", "full", "--quiet"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{src}: spinelevel run failed: {proc.stderr[-2000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision of the 'before' code")
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--model", type=Path, default=REPO / "src" / "spinelevel" / "models" / "demo" / "levels_demo.onnx")
    parser.add_argument("--work", type=Path, default=REPO / ".bench-work")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--compression", default="none", help="transfer syntax of the phantom archive (spinelevel phantom --compression: none, rle, jpeg2000, jpegls)")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    archive = phantom_archive(args.work, args.studies, args.size, compression=args.compression)
    base_rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", args.base], capture_output=True, text=True, check=True).stdout.strip()
    head_rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "src"], capture_output=True, text=True).stdout.strip())
    with tempfile.TemporaryDirectory(prefix="spinelevel-ab-") as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), base_rev], check=True, capture_output=True)
        try:
            times: dict[str, list[float]] = {"base": [], "head": []}
            srcs = {"base": tree / "src", "head": REPO / "src"}
            # output folders apart from the worktree: an output at tmp/base would be the base code itself,
            # removed before each base run (which then ran the installed head code; fixed in issue 17)
            for name in ("base", "head"):  # page cache, imports, the fresh worktree's bytecode
                _run(srcs[name], archive, args.model, Path(tmp) / "out-warm", args.workers)
            for _ in range(args.rounds):
                for name in ("base", "head"):
                    if not (srcs[name] / "spinelevel" / "__init__.py").is_file():
                        raise SystemExit(f"{srcs[name]}: the {name} code is missing")
                    times[name].append(_run(srcs[name], archive, args.model, Path(tmp) / f"out-{name}", args.workers))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)
    import pyarrow.parquet as pq

    slices = pq.read_table(archive / "labels.parquet").num_rows
    result = {
        "machine": describe_machine(),
        "archive": {"studies": args.studies, "size": args.size, "compression": args.compression, "labelled_slices": slices},
        "base": {"revision": base_rev, "wall_s": times["base"], "best_s": min(times["base"]), "median_s": statistics.median(times["base"])},
        "head": {"revision": head_rev, "uncommitted_changes": dirty, "wall_s": times["head"], "best_s": min(times["head"]), "median_s": statistics.median(times["head"])},
        "ratio_best": min(times["head"]) / min(times["base"]),
        "ratio_median": statistics.median(times["head"]) / statistics.median(times["base"]),
        "note": "head / base wall time of a full-sampling run; below 1 means head is faster",
    }
    emit_json(result, args.out)


if __name__ == "__main__":
    main()
