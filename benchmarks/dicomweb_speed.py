"""DICOMweb input against a local run of the same studies, on loopback, interleaved.

    python benchmarks/dicomweb_speed.py [--studies 8] [--size 128] [--rounds 3] [--workers N] [--sampling auto|full|sparse] [--out results.json]

Makes a phantom archive (``spinelevel phantom``), starts a local Orthanc (Debian's ``orthanc`` and
``orthanc-dicomweb``; the same starter as the tests, tests/orthanc.py) with basic auth, stores every
file in it through the REST API, then for ``--rounds`` rounds, after one warm-up of each, runs the
demo model over the archive three times into fresh folders: from the local folder, from
``dicomweb+http://127.0.0.1:PORT/dicom-web`` (QIDO-RS, series metadata in the decode workers, each
series retrieved once into the run's spool by a decode worker ahead of its decoding), and from the
same with every instance the model sees retrieved alone (``--dicomweb-by-instance``, series_fraction
2). Same process, same options; the order within a round alternates. Reports wall seconds
(scan included), slices/s, and the ratio DICOMweb/local of slices/s (best round of each, and the
median). Not collected by pytest.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from orthanc import PASSWORD, USER, Orthanc, orthanc_missing  # noqa: E402

from spinelevel.bench.machine import describe_machine, emit_json  # noqa: E402
from spinelevel.engine.dicomweb import DicomwebQuery, parse_input  # noqa: E402
from spinelevel.engine.pipeline import RunOptions, run  # noqa: E402
from spinelevel.engine.sampling import SamplingOptions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sampling", choices=("auto", "full", "sparse"), default="auto")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    missing = orthanc_missing()
    if missing:
        sys.exit(f"dicomweb_speed {missing}")
    os.environ["SPINELEVEL_DICOMWEB_USER"], os.environ["SPINELEVEL_DICOMWEB_PASSWORD"] = USER, PASSWORD

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        archive = work / "archive"
        subprocess.run([sys.executable, "-m", "spinelevel", "phantom", str(archive), "--studies", str(args.studies), "--size", str(args.size), "--seed", "4243", "--quiet"], check=True)
        files = sorted(p for p in archive.rglob("*") if p.is_file() and p.suffix == "")
        server = Orthanc(work / "orthanc")
        server.start()
        try:
            t0 = time.perf_counter()
            stored = server.upload(files)
            upload_s = time.perf_counter() - t0
            sampling = SamplingOptions(mode=args.sampling)
            options = RunOptions(workers=args.workers, sampling=sampling)
            remote = RunOptions(workers=args.workers, sampling=sampling, dicomweb=(DicomwebQuery(parse_input(server.input)),))
            one_by_one = RunOptions(workers=args.workers, sampling=sampling, dicomweb=(DicomwebQuery(parse_input(server.input, series_fraction=2.0)),))
            kinds = {"local": ([archive], options), "dicomweb": ([], remote), "dicomweb_per_instance": ([], one_by_one)}
            for name, (paths, opts) in kinds.items():  # warm-up: imports, page cache, Orthanc's cache
                run(paths, Path("demo"), work / f"warm-{name}", opts)
            seconds: dict[str, list[float]] = {k: [] for k in kinds}
            slices: dict[str, int] = {}
            for r in range(args.rounds):
                order = list(kinds) if r % 2 == 0 else list(reversed(kinds))  # alternating
                for name in order:
                    paths, opts = kinds[name]
                    summary = run(paths, Path("demo"), work / f"{name}-{r}", opts)
                    seconds[name].append(summary.seconds)
                    slices[name] = summary.slices
        finally:
            server.stop()
    assert slices["local"] == slices["dicomweb"] == slices["dicomweb_per_instance"], slices
    rate = {k: [slices[k] / s for s in v] for k, v in seconds.items()}
    result = {
        "benchmark": "dicomweb_speed",
        "machine": describe_machine(),
        "studies": args.studies,
        "size": args.size,
        "files": len(files),
        "files_stored": stored,
        "upload_seconds": round(upload_s, 2),
        "workers": args.workers,
        "sampling": args.sampling,
        "rounds": args.rounds,
        "slices_classified": slices["local"],
        "seconds_all": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
        "slices_per_s_best": {k: round(max(v), 1) for k, v in rate.items()},
        "ratio_dicomweb_to_local_best": round(max(rate["dicomweb"]) / max(rate["local"]), 3),
        "ratio_dicomweb_to_local_median": round(statistics.median(rate["dicomweb"]) / statistics.median(rate["local"]), 3),
        "ratio_per_instance_to_local_best": round(max(rate["dicomweb_per_instance"]) / max(rate["local"]), 3),
        "ratio_per_instance_to_local_median": round(statistics.median(rate["dicomweb_per_instance"]) / statistics.median(rate["local"]), 3),
    }
    emit_json(result, args.out)


if __name__ == "__main__":
    main()
