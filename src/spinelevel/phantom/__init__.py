"""Synthetic CT studies with known vertebral levels, written as real DICOM.

Real labelled CT cannot be shipped with the project, yet tests, benchmarks, the demo and training smoke
tests need CT series whose level is known on every slice. :func:`generate` writes procedural phantoms
(body wall, organs, muscles, a complete T1-coccyx spine, ribs, pelvis, noise and a table) with the
labels of :mod:`spinelevel.levels` classes, as ``labels.parquet`` (DESIGN 3.3) and
``vertebrae.parquet``.

Labelling rules: a slice takes the class of the vertebral body containing its centre; slices whose
centre is in an intervertebral disc get ``None``; T1-T12 are ``T``, the sacrum, coccyx and anything
below are ``S``. Variants: ``six_lumbar`` counts from the top (T1-T12, L1-L6) and excludes L6 (level
``None``); ``sacralised_L5`` keeps ``L5`` on the fused vertebra. See :mod:`spinelevel.phantom.spec`.

Example:
    >>> from spinelevel.phantom import PhantomOptions, generate
    >>> summary = generate(Path("phantoms"), PhantomOptions(studies=4, seed=1, size=256))
"""

from spinelevel.phantom.anatomy import Anatomy, render_slice
from spinelevel.phantom.generate import LABELS_SCHEMA, VERTEBRAE_SCHEMA, generate, render_series
from spinelevel.phantom.options import (
    COMPRESSIONS,
    CONTRASTS,
    COVERAGES,
    VARIANTS,
    PhantomOptions,
    PhantomSummary,
)
from spinelevel.phantom.spec import CLASSES, SeriesSpec, StudySpec, Vertebra, level_at, plan_study

__all__ = [
    "Anatomy",
    "CLASSES",
    "COMPRESSIONS",
    "CONTRASTS",
    "COVERAGES",
    "LABELS_SCHEMA",
    "PhantomOptions",
    "PhantomSummary",
    "SeriesSpec",
    "StudySpec",
    "VARIANTS",
    "VERTEBRAE_SCHEMA",
    "Vertebra",
    "generate",
    "level_at",
    "plan_study",
    "render_series",
    "render_slice",
]
