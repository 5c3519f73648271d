"""``build_eda_report``: the one entry point of the data exploration report (``pneumodet eda``).

It checks the arguments before anything is read, loads the labels, reads the headers, assembles the
page (:mod:`.page`) and writes ``report.html``, ``summary.json`` and the table CSVs into ``out_dir``,
each file atomically; tables an earlier report in the same folder wrote and this one does not are removed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pneumodet.data.rsna import load_rsna
from pneumodet.errors import ConfigError
from pneumodet.reports.eda.headers import scan_metadata
from pneumodet.reports.eda.page import eda_page
from pneumodet.reports.eda.tables import LabelTables, TableWriter, summary, with_class
from pneumodet.safeio import write_json
from pneumodet.textsafe import display_path

__all__ = ["build_eda_report"]


def build_eda_report(data_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                     labels: str | os.PathLike[str] | None = None,
                     classes: str | os.PathLike[str] | None = None,
                     images: str | os.PathLike[str] | None = None, strict: bool = False, seed: int = 0,
                     max_images: int | None = 5000, samples_per_class: int = 4, opacity_grid: int = 8,
                     workers: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Explore an RSNA-format dataset and write ``report.html``, ``summary.json`` and the table CSVs.

    Args:
        data_dir: folder laid out as the Kaggle download; ``labels``/``classes``/``images`` override parts.
        out_dir: created if needed; files of the same names are replaced, and tables an earlier report
            there wrote but this one does not (e.g. ``impossible_ages.csv``) are removed.
        strict: make any label problem fatal (:class:`~pneumodet.errors.LabelsError`) instead of reporting it.
        seed: picks the sample images (and the header subset when capped).
        max_images: read at most this many DICOM headers (``None``: all).
        samples_per_class: sample images shown per class; ``opacity_grid``: Lung Opacity images with boxes.
        workers: processes reading headers (``None``: all cores; a pool is used for large folders only).

    Returns:
        The summary written to ``summary.json``: ``label_rows, patients, multi_box_patients, boxes,
        images_found, images_missing, label_problems, patients_per_class, rows_per_class,
        patients_per_target, boxes_per_patient`` (``{"0": n, ...}``), ``age`` (``min, median, max`` of
        the possible ages, ``impossible`` and ``missing`` counts), ``sex``, ``view_position``
        (``{"AP": n, "PA": n}``), ``headers_read``, ``headers_failed``, ``images_unreadable``,
        ``images_decoded`` (the sample images decoded) and ``images_constant`` (those of them that came
        out constant; named, with every other decoding note, in ``image_notes.csv``), ``tables``.

    Raises:
        LabelsError: the labels cannot be read (or, under ``strict``, have any problem).
        ConfigError: a count argument is negative, or ``out_dir`` cannot be created.
    """
    for name, value in (("max_images", max_images), ("samples_per_class", samples_per_class),
                        ("opacity_grid", opacity_grid), ("workers", workers)):
        if value is not None and value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")
    data = load_rsna(data_dir, labels=labels, classes=classes, images=images, strict=strict)
    out = _report_folder(out_dir)
    label_tables = LabelTables.of(data.records)
    scan = scan_metadata(data.records, max_images=max_images, seed=seed, workers=workers, progress=progress)
    meta = with_class(scan.frame, label_tables.patients)
    writer = TableWriter(out)
    page = eda_page(data, label_tables, scan, meta, writer, subtitle=display_path(data_dir), seed=seed,
                    samples_per_class=samples_per_class, opacity_grid=opacity_grid)
    result = summary(data.report, label_tables, meta, scan, unreadable=page.unreadable, decoded=page.decoded,
                     constant=page.constant)
    result["tables"] = sorted(writer.written)
    writer.remove_stale(out / "summary.json")
    page.html.write(out / "report.html")
    write_json(out / "summary.json", result)
    return result


def _report_folder(out_dir: str | os.PathLike[str]) -> Path:
    """``out_dir``, created if needed (:class:`ConfigError` when it cannot be)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot create the report folder: {exc.strerror or exc}") from exc
    return out
