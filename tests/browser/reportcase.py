"""A small phantom run (tar, zip and folder inputs) with an evaluation and a review report.

Built once per test session (``phantom_case``) and shared by ``test_report.py`` and
``test_report_browser.py``. The third study's files are deleted after the run, so the report must
list that series as 'images unavailable' and still complete.
"""

from __future__ import annotations

import shutil
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PhantomCase", "phantom_case", "ARTIFACTS", "chromium_path", "launch_chromium"]

# Screenshots and timings of the browser tests (ignored by git).
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

_CASES: dict[Path, "PhantomCase"] = {}


@dataclass(frozen=True)
class PhantomCase:
    phantom: Path  # generated studies (labels.parquet, vertebrae.parquet)
    inputs: list[Path]  # what the run read: a .tar, a .zip and a folder
    run_dir: Path
    report: Path
    removed_series: str  # series UID whose files were deleted after the run
    patient_names: tuple[str, ...]
    patient_ids: tuple[str, ...]


def phantom_case(base: Path, model: Path) -> PhantomCase:
    """Generate, run, evaluate and report once per ``base`` (a session temp folder)."""
    if base in _CASES:
        return _CASES[base]
    import pyarrow.dataset as ds

    from spinelevel.engine.pipeline import RunOptions, run
    from spinelevel.phantom import PhantomOptions, generate, plan_study
    from spinelevel.report.build import ReportOptions, build_report
    from spinelevel.training.evaluate import EvaluateOptions, evaluate_run

    ph = base / "phantom"
    options = PhantomOptions(studies=3, seed=11, size=64, coverage="abdomen_pelvis", thickness_mm=5.0, localizer_probability=1.0,
                             dose_report_probability=0.0, second_recon_probability=0.0, variant="none")
    generate(ph, options)
    specs = [plan_study(options, i) for i in range(3)]
    inputs_dir = base / "inputs"
    inputs_dir.mkdir()
    tar_path = inputs_dir / "study0.tar"
    with tarfile.open(tar_path, "w") as tf:
        tf.add(ph / specs[0].folder, arcname=specs[0].folder)
    zip_path = inputs_dir / "study1.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for f in sorted((ph / specs[1].folder).rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(ph).as_posix())
    folder = inputs_dir / "study2"
    shutil.copytree(ph / specs[2].folder, folder)
    (inputs_dir / "notes.txt").write_text("not a DICOM file\n")
    run_dir = base / "run"
    inputs = [tar_path, zip_path, folder, inputs_dir / "notes.txt"]
    run(inputs, model, run_dir, RunOptions(workers=0))
    evaluate_run(run_dir, ph / "labels.parquet", run_dir / "evaluation", EvaluateOptions(vertebrae=ph / "vertebrae.parquet"))
    # the third study's CT series disappears from disk after the run
    removed = specs[2].series[0].series_uid
    rows = ds.dataset(str(run_dir / "slices")).to_table(columns=["series_uid", "source"]).to_pylist()
    for r in rows:
        if r["series_uid"] == removed:
            Path(r["source"]).unlink()
    report = base / "report"
    build_report(run_dir, report, ReportOptions(workers=2))
    case = PhantomCase(ph, inputs, run_dir, report, removed, tuple(s.patient_name for s in specs), tuple(s.patient_id for s in specs))
    _CASES[base] = case
    return case


def chromium_path() -> str | None:
    """Debian's chromium (apt-get install chromium), or None."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


# Flags that work as root in a container and keep Chromium off the network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def launch_chromium(playwright, executable: str, user_data_dir: Path):  # noqa: ANN001, ANN201
    """A fresh persistent Chromium context (own --user-data-dir) driven by Playwright."""
    return playwright.chromium.launch_persistent_context(
        str(user_data_dir), executable_path=executable, headless=True, args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000}
    )
