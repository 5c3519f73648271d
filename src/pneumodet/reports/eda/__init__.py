"""The data exploration report (``pneumodet eda``): what is in an RSNA-format dataset, in one HTML file.

:func:`build_eda_report` loads the labels with :func:`pneumodet.data.rsna.load_rsna`, reads the
DICOM headers of the images present (headers only, capped by ``max_images``) and writes to ``out_dir``:

- ``report.html``: overview, boxes per patient, classes and targets, DICOM metadata, sample images,
  box analysis, each with tables and charts;
- ``summary.json``: the headline numbers (see :func:`build_eda_report`);
- one CSV per table shown in the report (``<name>.csv``).

Two counts are easy to confuse and are kept apart everywhere: *patients* (one per image) and
*label rows* (one per box for Lung Opacity patients, one per patient otherwise).

One concept per module:

- :mod:`.headers`: which images are present, and their DICOM header fields (:func:`scan_metadata`);
- :mod:`.tables`: the data frames and statistics, their CSVs and the ``summary.json`` numbers;
- :mod:`.figures`: the matplotlib charts;
- :mod:`.samples`: the sample images, decoded into captioned thumbnails;
- :mod:`.page`: the sections, assembled into one :class:`~pneumodet.reports.html.HtmlReport`;
- :mod:`.report`: :func:`build_eda_report`, the entry point that writes the files.
"""

from __future__ import annotations

from pneumodet.reports.eda.headers import MetadataScan, scan_metadata
from pneumodet.reports.eda.report import build_eda_report
from pneumodet.reports.eda.tables import IMPOSSIBLE_AGE, box_frame, patient_frame

__all__ = [
    "IMPOSSIBLE_AGE",
    "MetadataScan",
    "box_frame",
    "build_eda_report",
    "patient_frame",
    "scan_metadata",
]
