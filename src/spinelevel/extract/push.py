"""Store the Key Object Selection documents of an extract back on the DICOMweb server the series came
from (STOW-RS), so the L3 pick shows up in the PACS viewer beside the series (``run --push-kos``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from spinelevel.engine.dicomweb import DicomwebConnection, store_instances
from spinelevel.errors import DicomwebError, OutputError

__all__ = ["PushSummary", "push_kos"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushSummary:
    """What --push-kos stored."""

    # KOS documents stored.
    stored: int
    # (series UID, reason) of the documents the server did not take.
    failed: tuple[tuple[str, str], ...]
    # Series with a KOS whose instances did not come from one of the servers (not pushed).
    not_remote: int


def push_kos(extract_dir: Path, connections: tuple[DicomwebConnection, ...]) -> PushSummary:
    """STOW-RS every ``kos.dcm`` named in ``extract_dir``'s manifest to the server of its series.

    A series is pushed to the connection whose URL its picks' ``source`` starts with; series read
    from local files are counted, not pushed. One refused document does not stop the others.

    Raises:
        OutputError: the extract folder has no readable manifest.
    """
    import pyarrow.parquet as pq

    from spinelevel.extract.core import MANIFEST_NAME

    try:
        rows = pq.read_table(Path(extract_dir) / MANIFEST_NAME, columns=["study_uid", "series_uid", "source", "kos"]).to_pylist()
    except OSError as exc:
        raise OutputError(f"{extract_dir}: no readable extract manifest ({exc}); run spinelevel extract first") from None
    by_series: dict[str, tuple[str, str, str]] = {}
    for r in rows:
        if r["kos"]:
            by_series.setdefault(r["series_uid"], (r["study_uid"], r["kos"], r["source"] or ""))
    stored, not_remote = 0, 0
    failed: list[tuple[str, str]] = []
    for series_uid in sorted(by_series):
        study_uid, kos, source = by_series[series_uid]
        conn = next((c for c in connections if source.startswith(c.url + "/studies/")), None)
        if conn is None:
            not_remote += 1
            continue
        try:
            data = (Path(extract_dir) / kos).read_bytes()
            store_instances(conn, [data], study_uid)
            stored += 1
        except OSError as exc:
            failed.append((series_uid, f"{kos}: unreadable ({exc.strerror or exc})"))
        except DicomwebError as exc:
            failed.append((series_uid, str(exc)))
    for uid, reason in failed:
        log.warning("KOS of series %s not stored: %s", uid, reason)
    return PushSummary(stored, tuple(failed), not_remote)
