"""`spinelevel run`: classify every axial CT series of DICOM folders, archives and DICOMweb servers."""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from spinelevel.cli import app
from spinelevel.cli._common import fail_cleanly, setup_logging, stderr, terminate_as_interrupt
from spinelevel.engine.sampling import SamplingOptions
from spinelevel.levels import LevelThresholds


class Sampling(str, Enum):
    """--sampling choices."""

    auto = "auto"
    full = "full"
    sparse = "sparse"


class WorkerKind(str, Enum):
    """--worker-kind choices."""

    processes = "processes"
    threads = "threads"


class Preprocess(str, Enum):
    """--preprocess choices."""

    numpy = "numpy"
    dali = "dali"


class J2kDecoder(str, Enum):
    """--j2k-decoder choices."""

    cpu = "cpu"
    nvimgcodec = "nvimgcodec"
    dali = "dali"


class _RichProgress:
    """Rich progress bar: files scanned, then series done and slices/s."""

    def __init__(self, enabled: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=stderr,
            disable=not enabled,
            transient=False,
        )
        self.scan_task = None
        self.series_task = None
        self.slices = 0
        self.started = 0.0

    def __enter__(self) -> _RichProgress:
        self.progress.__enter__()
        self.scan_task = self.progress.add_task("scanning files", total=None, rate="")
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def scanned(self, files: int) -> None:
        self.progress.update(self.scan_task, completed=files, rate=f"{files} files")

    def planned(self, series: int, slices: int) -> None:
        import time

        self.progress.update(self.scan_task, total=self.progress.tasks[0].completed or 1, completed=self.progress.tasks[0].completed or 1)
        self.series_task = self.progress.add_task("series", total=series, rate=f"0 of {slices} slices")
        self.total_slices = slices
        self.started = time.perf_counter()

    def advanced(self, series: int, slices: int) -> None:
        import time

        self.slices += slices
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.progress.update(self.series_task, advance=series, rate=f"{self.slices}/{self.total_slices} slices, {self.slices / elapsed:.1f} slices/s")


@app.command("run")
def run(
    paths: Annotated[list[str], typer.Argument(help="DICOM folders, .zip, .tar, .tar.gz/.tgz archives, single files, or DICOMweb services written dicomweb+https://host/dicom-web, in any mix.", show_default=False)],
    model: Annotated[Path, typer.Option("--model", "-m", help="Model with a spinelevel card: ONNX, TensorRT .engine, training .safetensors, or 'demo' (the bundled phantom-trained model).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (slices/, series/, skipped/ Parquet datasets and run.json).")],
    backend: Annotated[str, typer.Option("--backend", help="auto (TensorRT, then torch on CUDA, then ONNX Runtime), onnxruntime, tensorrt, torch or openvino (CPU, optional).")] = "auto",
    device: Annotated[str | None, typer.Option("--device", help="GPU backends: cuda, cuda:1, or cpu (torch).")] = None,
    preprocess: Annotated[Preprocess, typer.Option("--preprocess", help="numpy (in the decode workers) or dali (one DALI graph; on the GPU with a GPU backend).")] = Preprocess.numpy,
    j2k_decoder: Annotated[J2kDecoder, typer.Option("--j2k-decoder", help="JPEG 2000/HTJ2K decoder: cpu (openjpeg), nvimgcodec or dali (nvJPEG2000 on the GPU where it is bit-exact with openjpeg, checked per kind; the CPU otherwise, with the reason in run.json). nvimgcodec needs nvidia-nvimgcodec-cu13 and nvidia-nvjpeg2k-cu13.")] = J2kDecoder.cpu,
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs", help="GPU backends: capture a CUDA graph per batch size.")] = False,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch backend: torch.compile the model.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Slices per inference call.")] = 16,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="Inference threads (default: the runtime's choice, all cores).")] = None,
    ort_spinning: Annotated[bool | None, typer.Option("--ort-spinning/--no-ort-spinning", help="ONNX Runtime: idle inference threads spin for the next batch (default: off while decode workers share the cores, on with --workers 0).", show_default=False)] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=0, help="Decode/preprocess workers (default: number of cores; 0 decodes in the main process).")] = None,
    worker_kind: Annotated[WorkerKind, typer.Option("--worker-kind", help="Decode workers as processes (a crashing decoder costs only its files; faster for JPEG 2000/JPEG-LS, whose decoders hold the GIL) or threads (faster for uncompressed and RLE CT; a crashing decoder ends the run, resume continues it).")] = WorkerKind.processes,
    min_slices: Annotated[int, typer.Option("--min-slices", min=1, help="Skip series with fewer slices.")] = 10,
    sampling: Annotated[Sampling, typer.Option("--sampling", help="Slices the model sees: full (all), sparse (boundary search), auto (sparse on CPU, full on GPU).")] = Sampling.auto,
    stride_mm: Annotated[float, typer.Option("--stride-mm", min=1.0, help="Coarse stride of the sparse search in mm.")] = SamplingOptions.stride_mm,
    min_confidence: Annotated[float, typer.Option("--min-confidence", min=0.0, max=1.0, help="Sparse search: evaluated slices whose top probability is below this get their neighbours evaluated.")] = SamplingOptions.min_confidence,
    exact_l3: Annotated[bool, typer.Option("--exact-l3", help="Sparse search: where the L3 run or its borders are doubtful, evaluate every slice from the L2/L3 to the L3/L4 boundary, so the pick equals a full run's (costs slices).")] = False,
    level_extents: Annotated[str, typer.Option("--level-extents", help="Shortest,longest extent in mm of a decoded L1-L5 run (the shortest only where the field of view does not cut it; L5 may be twice the longest), e.g. 20,55 for adult CT; 'off' keeps the anatomical order only (paediatric CT, or to compare).")] = "20,55",
    force: Annotated[bool, typer.Option("--force", help="Redo every series, replacing the rows earlier runs wrote into --out (default: resume, skipping series already done).")] = False,
    max_pixels: Annotated[int, typer.Option("--max-pixels", min=1, help="Skip slices with more pixels (Rows x Columns).")] = 4096 * 4096,
    max_slices: Annotated[int, typer.Option("--max-slices", min=1, help="Skip series with more slices.")] = 5000,
    keep_phi: Annotated[list[str] | None, typer.Option("--keep-phi", help="Copy this DICOM tag (keyword, e.g. PatientID) into the series table; repeat for more. Off by default: outputs carry no patient identity.")] = None,
    ray: Annotated[str | None, typer.Option("--ray", help="Run on Ray Data: 'local' (or a bare --ray) starts Ray here; 'auto' or ray://HEAD:10001 joins a cluster.", show_default=False)] = None,
    gpus_per_worker: Annotated[float, typer.Option("--gpus-per-worker", min=0.0, help="--ray: GPUs per inference actor (0: CPU actors).")] = 0.0,
    decode_workers: Annotated[int | None, typer.Option("--decode-workers", min=1, help="--ray: most decode/preprocess tasks at once.")] = None,
    inference_workers: Annotated[int | None, typer.Option("--inference-workers", min=1, help="--ray: inference actors (default: GPUs / --gpus-per-worker, or CPUs / 4).")] = None,
    qc: Annotated[bool, typer.Option("--qc", help="After the run, write a review report (sagittal/coronal/L3 pictures per series, index.html) into OUT/report.")] = False,
    extract: Annotated[Path | None, typer.Option("--extract", help="After the run, copy the level picks into this folder with a KOS per series, previews and manifest.parquet (as 'spinelevel extract').", show_default=False)] = None,
    extract_levels: Annotated[str, typer.Option("--extract-levels", help="--extract: levels to extract, comma-separated (as extract --levels).")] = "L3",
    extract_neighbours: Annotated[int, typer.Option("--extract-neighbours", min=0, help="--extract: slices copied on each side of every pick (as extract --neighbours).")] = 0,
    since: Annotated[str | None, typer.Option("--since", help="DICOMweb: studies with a StudyDate on or after this date (YYYY-MM-DD).", show_default=False)] = None,
    until: Annotated[str | None, typer.Option("--until", help="DICOMweb: studies with a StudyDate on or before this date (YYYY-MM-DD).", show_default=False)] = None,
    study: Annotated[list[str] | None, typer.Option("--study", help="DICOMweb: read this Study Instance UID (repeatable; default: every study in the date range).", show_default=False)] = None,
    modality: Annotated[str, typer.Option("--modality", help="DICOMweb: modality of the series listed and read.")] = "CT",
    dicomweb_timeout: Annotated[float, typer.Option("--dicomweb-timeout", min=0.1, help="DICOMweb: seconds to wait for a connection and for each read of an answer.")] = 30.0,
    dicomweb_retries: Annotated[int, typer.Option("--dicomweb-retries", min=0, help="DICOMweb: retries of a request that failed transiently (connection refused, timeout, 5xx, cut short), with exponential backoff from 0.5 s, at most 60 s of waiting.")] = 4,
    dicomweb_by_instance: Annotated[bool, typer.Option("--dicomweb-by-instance", help="DICOMweb: retrieve each instance the model needs in a request of its own, instead of each series in one request into a temporary spool (once per run): fewer bytes over a slow link to a server with cheap requests, far more requests.")] = False,
    dicomweb_ca: Annotated[Path | None, typer.Option("--dicomweb-ca", help="DICOMweb: PEM bundle of the CA that signed the server's certificate (TLS is always verified; default: the system's CAs).", show_default=False)] = None,
    push_kos: Annotated[bool, typer.Option("--push-kos", help="DICOMweb: after the run, store each series' Key Object Selection document back on its server (STOW-RS); extracts into --extract DIR, or OUT/extract.")] = False,
    rows_per_part: Annotated[int, typer.Option("--rows-per-part", min=1, help="Slice rows per Parquet part; results are committed at least this often.")] = 100_000,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Find the vertebral level of every slice and the L3 slice of every axial CT series.

    Credentials of a DICOMweb server come from SPINELEVEL_DICOMWEB_USER and SPINELEVEL_DICOMWEB_PASSWORD,
    SPINELEVEL_DICOMWEB_TOKEN, or a netrc entry, never from the command line.
    """
    from spinelevel.engine.pipeline import RunOptions
    from spinelevel.engine.pipeline import run as run_pipeline
    from spinelevel.engine.scan import ScanOptions
    from spinelevel.engine.select import SelectOptions

    setup_logging(verbose)
    with fail_cleanly():
        local, queries = _inputs(paths, since, until, tuple(study or ()), modality, dicomweb_timeout, dicomweb_retries, dicomweb_ca, ray is not None, push_kos, dicomweb_by_instance)
    with fail_cleanly():
        thresholds = _level_extents(level_extents)
    options = RunOptions(
        thresholds=thresholds,
        backend=backend,
        device=device,
        preprocess=Preprocess(preprocess).value,
        j2k_decoder=J2kDecoder(j2k_decoder).value,
        cuda_graphs=cuda_graphs,
        compile=compile_model,
        batch_size=batch_size,
        threads=threads,
        ort_spinning=ort_spinning,
        workers=(os.cpu_count() or 1) if workers is None else workers,
        worker_kind=worker_kind.value,
        force=force,
        rows_per_part=rows_per_part,
        select=SelectOptions(min_slices=min_slices, max_pixels=max_pixels, max_slices=max_slices),
        scan=ScanOptions(keep_tags=tuple(keep_phi or ())),
        sampling=SamplingOptions(mode=sampling.value, stride_mm=stride_mm, min_confidence=min_confidence, exact_l3=exact_l3),
        dicomweb=queries,
    )
    show = not quiet and stderr.is_terminal
    extract_options = None
    if push_kos and extract is None:
        extract = out / "extract"
    if extract is not None:
        from spinelevel.cli.extract import parse_levels
        from spinelevel.extract import ExtractOptions
        from spinelevel.levels import CLASSES

        levels = parse_levels(extract_levels)
        unknown = [lv for lv in levels if lv not in CLASSES]
        if not levels or unknown:
            with fail_cleanly():
                from spinelevel.errors import InputError

                raise InputError(f"--extract-levels {extract_levels!r}: give classes such as L3 or L3,L1 (known: {', '.join(CLASSES)})")
        extract_options = ExtractOptions(levels=levels, neighbours=extract_neighbours)
        from spinelevel.extract import prepare_extract_dir

        with fail_cleanly():
            prepare_extract_dir(extract)  # an unwritable --extract folder stops the run before it starts
    with fail_cleanly(), terminate_as_interrupt(), _RichProgress(show) as progress:
        if ray is not None:
            from spinelevel.engine.ray_runner import RayOptions, run_on_ray

            ray_options = RayOptions(
                address=None if ray in ("", "local") else ray,
                gpus_per_worker=gpus_per_worker,
                decode_workers=decode_workers,
                inference_workers=inference_workers,
            )
            summary = run_on_ray(local, model, out, options, ray_options, progress)
        else:
            summary = run_pipeline(local, model, out, options, progress)
    if extract_options is not None:
        from spinelevel.cli.extract import ExtractProgressBar, print_extract_summary
        from spinelevel.extract import extract_run

        with fail_cleanly(), terminate_as_interrupt(), ExtractProgressBar(show) as bar:
            extracted = extract_run(out, extract, extract_options, bar)
        if not quiet:
            print_extract_summary(extracted)
    if push_kos:
        _push(extract, queries, quiet)
    if qc:
        from spinelevel.cli.report import ReportProgressBar
        from spinelevel.report.build import ReportOptions, build_report

        with fail_cleanly(), terminate_as_interrupt(), ReportProgressBar(show) as bar:
            report = build_report(out, None, ReportOptions(workers=max(1, min(8, options.workers))), bar)
        if not quiet:
            stderr.print(f"review report: {report.index} ({report.drawn} series drawn, {report.unavailable} with images unavailable)")
    if not quiet:
        total = summary.series_ok + summary.series_skipped + summary.series_error + summary.series_already_done
        stderr.print(
            f"{total} series: {summary.series_ok} processed, {summary.series_skipped} skipped, "
            f"{summary.series_error} failed, {summary.series_already_done} already done; {summary.slices} slices in {summary.seconds:.1f} s "
            f"({summary.slices_per_s:.1f} slices/s); {summary.skipped_files} files skipped; results in {summary.out}"
        )
    sys.stdout.flush()


def _inputs(paths: list[str], since: str | None, until: str | None, studies: tuple[str, ...], modality: str, timeout: float, retries: int, ca: Path | None, ray: bool, push_kos: bool, by_instance: bool = False):  # noqa: ANN202
    """(local paths, DICOMweb queries) from the positional inputs and the DICOMweb options."""
    from spinelevel.engine.dicomweb import DicomwebQuery, is_dicomweb_input, parse_date, parse_input
    from spinelevel.errors import InputError

    local = [Path(p) for p in paths if not is_dicomweb_input(p)]
    remote = [p for p in paths if is_dicomweb_input(p)]
    if not remote:
        used = [name for name, value in (("--since", since), ("--until", until), ("--study", studies), ("--dicomweb-ca", ca), ("--dicomweb-by-instance", by_instance), ("--push-kos", push_kos)) if value]
        if used:
            raise InputError(f"{', '.join(used)}: only for DICOMweb inputs (dicomweb+https://host/dicom-web)")
        return local, ()
    if ray:
        raise InputError("--ray does not read DICOMweb inputs; run without --ray")
    first = parse_date(since, "--since") if since else None
    last = parse_date(until, "--until") if until else None
    if first and last and first > last:
        raise InputError(f"--since {since} is after --until {until}")
    queries = tuple(
        DicomwebQuery(parse_input(p, timeout_s=timeout, tries=retries + 1, ca_file=str(ca) if ca else None, series_fraction=2.0 if by_instance else 0.0), first, last, studies, modality.strip().upper())
        for p in remote
    )
    return local, queries


def _push(extract: Path, queries, quiet: bool) -> None:  # noqa: ANN001
    from spinelevel.extract.push import push_kos

    with fail_cleanly():
        pushed = push_kos(extract, tuple(q.connection for q in queries))
    for uid, reason in pushed.failed:
        stderr.print(f"warning: KOS of series {uid} not stored: {reason}", markup=False, highlight=False)
    if not quiet:
        stderr.print(f"{pushed.stored} KOS documents stored on the server (STOW-RS), {len(pushed.failed)} refused", markup=False, highlight=False)
    if pushed.failed:
        stderr.print(f"error: {len(pushed.failed)} KOS documents could not be stored; run again to retry", markup=False, highlight=False)
        raise typer.Exit(1)


def _level_extents(text: str) -> LevelThresholds:
    """``--level-extents`` as the thresholds the decoding keeps: 'MIN,MAX' in mm, or 'off'."""
    from spinelevel.errors import InputError

    if text.strip().lower() == "off":
        return LevelThresholds(level_min_mm=0.0, level_max_mm=float("inf"))
    parts = text.split(",")
    try:
        low, high = (float(part) for part in parts)
    except ValueError:
        raise InputError(f"--level-extents {text!r}: give the shortest and longest level extent in mm, e.g. 20,55, or 'off'") from None
    if not (0.0 <= low < high < float("inf")):
        raise InputError(f"--level-extents {text!r}: need 0 <= shortest < longest (finite), in mm; 'off' turns the bounds off")
    return LevelThresholds(level_min_mm=low, level_max_mm=high)

