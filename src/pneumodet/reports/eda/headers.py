"""DICOM headers for the data exploration report: which images are present, and their header fields.

Only headers are read (no pixels), through :func:`pneumodet.data.dicom.read_dicom` with
``metadata_only=True``, so only its de-identified, allow-listed fields reach the report. One unreadable
file never stops a scan: it is listed in :attr:`MetadataScan.failed` with its reason.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pneumodet.data.dicom import read_dicom
from pneumodet.data.records import PatientRecord
from pneumodet.errors import DicomReadError
from pneumodet.progress import track

__all__ = ["MetadataScan", "has_image", "scan_metadata"]

# the header fields kept per image, in this column order
_META_COLUMNS = ("patient_id", "age", "sex", "view_position", "modality", "body_part", "rows", "columns",
                "photometric_interpretation", "transfer_syntax")
#: Below this many headers a worker pool costs more than it saves.
_POOL_MIN_FILES = 512


def has_image(record: PatientRecord) -> bool:
    """Whether the record's image file exists (the meaning of "present" everywhere in the report)."""
    return record.image_path is not None and Path(record.image_path).is_file()


@dataclass(frozen=True)
class MetadataScan:
    """DICOM header fields of the images present.

    ``frame`` has one row per header read (columns ``patient_id, age, sex, view_position, modality,
    body_part, rows, columns, photometric_interpretation, transfer_syntax``); ``failed`` lists
    ``(path, reason)`` of the files that could not be read; ``present`` is how many images exist,
    of which ``len(frame) + len(failed)`` were scanned.
    """

    frame: pd.DataFrame
    failed: tuple[tuple[str, str], ...]
    present: int

    @property
    def scanned(self) -> int:
        return len(self.frame) + len(self.failed)


def _header_or_error(item: tuple[str, str]) -> tuple[str, dict[str, Any] | None, str | None]:
    """Read one header; errors come back as text so one bad file never stops a pool."""
    patient_id, path = item
    try:
        _, meta = read_dicom(path, metadata_only=True)
    except DicomReadError as exc:
        return path, None, exc.cause
    row = {key: meta.get(key) for key in _META_COLUMNS}
    row["patient_id"] = patient_id
    return path, row, None


def scan_metadata(records: Sequence[PatientRecord], *, max_images: int | None = None, seed: int = 0,
                  workers: int | None = None, progress: bool | str = False) -> MetadataScan:
    """Read the DICOM headers (no pixels) of the records whose image exists.

    At most ``max_images`` headers are read, a seeded random subset when there are more images.
    ``workers`` processes share the work when there are many files (``None``: all cores).
    """
    present = [(r.patient_id, str(r.image_path)) for r in records if has_image(r)]
    todo = present
    if max_images is not None and len(present) > max_images:
        pick = np.random.default_rng(seed).choice(len(present), size=max_images, replace=False)
        todo = [present[i] for i in sorted(pick)]
    workers = workers or os.cpu_count() or 1
    bar = dict(total=len(todo), what="DICOM headers", unit="files", progress=progress)
    if workers > 1 and len(todo) >= _POOL_MIN_FILES:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(track(pool.map(_header_or_error, todo, chunksize=64), **bar))
    else:
        results = [_header_or_error(item) for item in track(todo, **bar)]
    rows = [row for _, row, _ in results if row is not None]
    failed = tuple((path, reason) for path, row, reason in results if row is None)
    frame = pd.DataFrame(rows, columns=list(_META_COLUMNS))
    frame["age"] = pd.to_numeric(frame["age"], errors="coerce")
    for side in ("rows", "columns"):
        frame[side] = pd.to_numeric(frame[side], errors="coerce").astype("Int64")
    return MetadataScan(frame=frame, failed=failed, present=len(present))
