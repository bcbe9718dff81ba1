"""Selected slices out of a run, for the next tool (body composition).

``spinelevel extract RUN_DIR --out DIR`` copies the pick of each requested level of every classified
series (and ``--neighbours`` slices around it) byte for byte, writes a DICOM Key Object Selection
document per series that references the picks, a PNG preview per pick and ``DIR/manifest.parquet``.
``plan.py`` decides what to copy from the run's tables, ``kos.py`` builds the document with
highdicom, ``preview.py`` draws the pictures and ``core.py`` writes it all atomically.
"""

from spinelevel.extract.core import EXTRACTED_RECORD, MANIFEST_NAME, SKIPPED_NAME, ExtractProgress, ExtractSummary, extract_run, manifest_schema, prepare_extract_dir, skipped_schema
from spinelevel.extract.plan import DOUBT_FLAGS, PICK_DEFINITION, ExtractOptions, Skip

__all__ = [
    "DOUBT_FLAGS",
    "EXTRACTED_RECORD",
    "MANIFEST_NAME",
    "PICK_DEFINITION",
    "SKIPPED_NAME",
    "ExtractOptions",
    "ExtractProgress",
    "ExtractSummary",
    "Skip",
    "extract_run",
    "manifest_schema",
    "prepare_extract_dir",
    "skipped_schema",
]
