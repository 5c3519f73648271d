"""The numbers of the data exploration report: data frames, statistics, their CSVs and ``summary.json``.

Every table is a pure function of its inputs (no file is read here); :class:`TableWriter` is the one
writer of the report's CSVs: each table shown in the report is also written as ``<name>.csv``, and the
names written are listed in ``summary.json`` under ``tables`` so a later report in the same folder can
remove the ones it no longer writes.

Two counts are kept apart everywhere: *patients* (one per image) and *label rows* (one per box for
Lung Opacity patients, one per patient otherwise).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pneumodet.data.records import CLASS_NAMES, RSNA_IMAGE_SIZE, PatientRecord
from pneumodet.data.rsna import PROBLEM_KINDS, Problem, ValidationReport
from pneumodet.reports.eda.headers import MetadataScan, has_image
from pneumodet.reports.html import Section
from pneumodet.safeio import atomic_path

__all__ = [
    "IMPOSSIBLE_AGE",
    "LabelTables",
    "TableWriter",
    "age_by_class",
    "box_frame",
    "box_medians",
    "box_stats",
    "field_by_class",
    "frame_size",
    "image_format",
    "impossible_ages",
    "label_problems",
    "overview",
    "patient_frame",
    "problem_kinds",
    "problem_list",
    "summary",
    "with_class",
]

#: Ages above this (in years) are flagged as impossible (the full RSNA training set has a few above 140).
IMPOSSIBLE_AGE = 100.0
_IMAGE_KINDS = ("image_missing", "image_unlabelled")
_BOX_QUANTITIES = ["x", "y", "width", "height", "area", "aspect"]


# ---------------------------------------------------------------- labels
def patient_frame(records: Sequence[PatientRecord]) -> pd.DataFrame:
    """One row per patient: ``patient_id, class, target, boxes, label_rows, has_image``.

    ``label_rows`` is how many rows the patient has in the labels CSV: one per box, or one row
    (with empty coordinates) when the patient has no box.
    """
    boxes = np.fromiter((len(r.boxes) for r in records), dtype=np.int64, count=len(records))
    return pd.DataFrame({
        "patient_id": [r.patient_id for r in records],
        "class": pd.Categorical([r.label_class for r in records], categories=CLASS_NAMES),
        "target": np.fromiter((r.target for r in records), dtype=np.int64, count=len(records)),
        "boxes": boxes,
        "label_rows": np.maximum(boxes, 1),
        "has_image": [has_image(r) for r in records],
    })


def box_frame(records: Sequence[PatientRecord]) -> pd.DataFrame:
    """One row per labelled box in original pixels: ``patient_id, class, x, y, width, height, cx, cy,
    area, aspect`` (``x, y`` top-left as in the CSV; ``aspect`` = width / height)."""
    rows = [(r.patient_id, r.label_class, *b) for r in records for b in r.boxes]
    frame = pd.DataFrame(rows, columns=["patient_id", "class", "xmin", "ymin", "xmax", "ymax"])
    frame["x"], frame["y"] = frame["xmin"], frame["ymin"]
    frame["width"] = frame["xmax"] - frame["xmin"]
    frame["height"] = frame["ymax"] - frame["ymin"]
    frame["cx"] = (frame["xmin"] + frame["xmax"]) / 2
    frame["cy"] = (frame["ymin"] + frame["ymax"]) / 2
    frame["area"] = frame["width"] * frame["height"]
    frame["aspect"] = frame["width"] / frame["height"].where(frame["height"] > 0)
    return frame.drop(columns=["xmin", "ymin", "xmax", "ymax"])


@dataclass(frozen=True)
class LabelTables:
    """What the labels alone say, computed once for the page and the summary."""

    patients: pd.DataFrame  #: :func:`patient_frame`
    boxes: pd.DataFrame  #: :func:`box_frame`
    classes: pd.DataFrame  #: patients and label rows (counts and %) per class
    targets: pd.DataFrame  #: patients (count and %) and label rows per Target
    class_by_target: pd.DataFrame  #: patients per class × Target, with ``all`` margins
    boxes_per_patient: pd.DataFrame  #: patients per number of boxes × Target/class combination

    @classmethod
    def of(cls, records: Sequence[PatientRecord]) -> LabelTables:
        patients = patient_frame(records)
        return cls(patients=patients, boxes=box_frame(records), classes=_class_table(patients),
                   targets=_target_table(patients), class_by_target=_class_by_target(patients),
                   boxes_per_patient=_boxes_per_patient(patients))


def _class_table(patients: pd.DataFrame) -> pd.DataFrame:
    table = patients.groupby("class", observed=False).agg(patients=("patient_id", "size"),
                                                          label_rows=("label_rows", "sum"))
    table.insert(1, "patients_%", 100 * table["patients"] / max(len(patients), 1))
    table["label_rows_%"] = 100 * table["label_rows"] / max(int(table["label_rows"].sum()), 1)
    return table.reset_index()


def _target_table(patients: pd.DataFrame) -> pd.DataFrame:
    table = patients.groupby("target").agg(patients=("patient_id", "size"), label_rows=("label_rows", "sum"))
    table.insert(1, "patients_%", 100 * table["patients"] / max(len(patients), 1))
    return table.reset_index()


def _class_by_target(patients: pd.DataFrame) -> pd.DataFrame:
    table = pd.crosstab(patients["class"], patients["target"].map(lambda t: f"Target {t}"),
                        margins=True, margins_name="all", dropna=False)
    return table.rename_axis(columns=None).reset_index()


def _boxes_per_patient(patients: pd.DataFrame) -> pd.DataFrame:
    """Patients per number of boxes (rows) and per Target/class combination (columns)."""
    combo = patients["class"].astype(str) + " (Target " + patients["target"].astype(str) + ")"
    table = pd.crosstab(patients["boxes"], combo, margins=True, margins_name="all patients")
    table.index = table.index.map(str)
    return table.rename_axis(index="boxes", columns=None).reset_index()


# ---------------------------------------------------------------- label check
def label_problems(report: ValidationReport) -> list[Problem]:
    """Problems of the labels themselves: everything but the per-image kinds (counted on their own)."""
    return [p for p in report.problems if p.kind not in _IMAGE_KINDS]


def overview(report: ValidationReport, patients: pd.DataFrame, scan: MetadataScan) -> pd.DataFrame:
    """The dataset at a glance: ``quantity, value`` rows."""
    rows = [
        ("label rows (CSV lines)", report.label_rows),
        ("label rows skipped", report.skipped_rows),
        ("unique patients (images)", report.patients),
        ("patients dropped (unusable rows)", report.patients_dropped),
        ("patients with several rows (multi-box)", int((patients["label_rows"] > 1).sum())),
        ("boxes in total", report.boxes),
        ("images found", report.images_found),
        ("images missing", report.images_missing),
        ("image files without labels", report.images_unlabelled),
        ("label problems found", len(label_problems(report))),
        ("DICOM headers read", len(scan.frame)),
        ("DICOM files unreadable", len(scan.failed)),
    ]
    return pd.DataFrame(rows, columns=["quantity", "value"])


def problem_kinds(report: ValidationReport) -> pd.DataFrame:
    """One row per problem kind found: ``kind, severity, effect, count``."""
    rows = [(kind, PROBLEM_KINDS[kind][0], PROBLEM_KINDS[kind][1], n)
            for kind, n in report.counts_by_kind().items()]
    return pd.DataFrame(rows, columns=["kind", "severity", "effect", "count"])


def problem_list(problems: Sequence[Problem]) -> pd.DataFrame:
    """One row per problem: ``file, line, kind, severity, patient_id, message``."""
    rows = [(p.file, p.line, p.kind, p.severity, p.patient_id, p.message) for p in problems]
    frame = pd.DataFrame(rows, columns=["file", "line", "kind", "severity", "patient_id", "message"])
    frame["line"] = frame["line"].astype("Int64")
    return frame


# ---------------------------------------------------------------- DICOM metadata
def with_class(meta: pd.DataFrame, patients: pd.DataFrame) -> pd.DataFrame:
    """The header rows with the patient's ``class`` and ``target`` added."""
    return meta.merge(patients[["patient_id", "class", "target"]], on="patient_id", how="left")


def impossible_ages(meta: pd.DataFrame) -> pd.DataFrame:
    """``patient_id, age, sex, class`` of the headers whose age is above :data:`IMPOSSIBLE_AGE`."""
    return meta.loc[meta["age"] > IMPOSSIBLE_AGE, ["patient_id", "age", "sex", "class"]]


def age_by_class(meta: pd.DataFrame) -> pd.DataFrame:
    """Age statistics per class, impossible ages excluded (and counted, as are missing ones)."""
    valid = meta[meta["age"] <= IMPOSSIBLE_AGE]
    table = valid.groupby("class", observed=False)["age"].describe()[["count", "mean", "min", "50%", "max"]]
    table = table.rename(columns={"count": "patients", "50%": "median"})
    by_class = meta.groupby("class", observed=False)["age"]
    table["impossible_ages"] = by_class.apply(lambda a: int((a > IMPOSSIBLE_AGE).sum()))
    table["missing_ages"] = by_class.apply(lambda a: int(a.isna().sum()))
    table["patients"] = table["patients"].astype(int)
    return table.reset_index()


def field_by_class(meta: pd.DataFrame, field: str) -> pd.DataFrame:
    """Patients per class × value of the header ``field`` (``(missing)`` when absent)."""
    values = meta[field].fillna("(missing)").astype(str)
    table = pd.crosstab(meta["class"], values, margins=True, margins_name="all", dropna=False)
    return table.rename_axis(columns=None).reset_index()


def image_format(meta: pd.DataFrame) -> pd.DataFrame:
    """Images per size, pixel format and encoding."""
    keys = ["rows", "columns", "photometric_interpretation", "transfer_syntax", "modality", "body_part"]
    table = meta[keys].astype("string").fillna("(missing)").value_counts().rename("images")
    return table.reset_index()


def frame_size(meta: pd.DataFrame) -> int:
    """The side of the image frame boxes live in: the commonest image side read, else RSNA's 1024."""
    sides = pd.concat([meta["rows"], meta["columns"]]).dropna()
    return int(sides.mode().max()) if len(sides) else RSNA_IMAGE_SIZE


# ---------------------------------------------------------------- boxes
def box_stats(boxes: pd.DataFrame) -> pd.DataFrame:
    """count, mean, std, min, quartiles and max of each box quantity (one row per quantity)."""
    stats = boxes[_BOX_QUANTITIES].describe().T
    stats["count"] = stats["count"].astype(int)
    return stats.rename_axis("quantity").reset_index()


def box_medians(boxes: pd.DataFrame, by: str) -> pd.DataFrame:
    """Boxes, patients and the median of each box quantity, per value of ``by``."""
    groups = boxes.groupby(by)
    table = groups[_BOX_QUANTITIES].median().add_prefix("median_")
    table.insert(0, "patients", groups["patient_id"].nunique())
    table.insert(0, "boxes", groups.size())
    return table.reset_index()


# ---------------------------------------------------------------- files
class TableWriter:
    """Adds tables to a report section and writes each one (atomically) as ``<name>.csv`` in ``out_dir``."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.written: list[str] = []

    def save(self, name: str, frame: pd.DataFrame) -> None:
        """Write ``frame`` as ``<name>.csv`` without showing it."""
        with atomic_path(self.out_dir / f"{name}.csv") as tmp:
            frame.to_csv(tmp, index=False)
        self.written.append(f"{name}.csv")

    def table(self, section: Section, name: str, frame: pd.DataFrame, caption: str, **kwargs: Any) -> None:
        """Write ``<name>.csv`` and show ``frame`` in ``section``, its caption naming the CSV."""
        self.save(name, frame)
        section.table(frame, f"{caption} — `{name}.csv`", **kwargs)

    def remove_stale(self, previous_summary: Path) -> None:
        """Delete the tables an earlier report in this folder wrote and this one did not.

        Only plain ``*.csv`` names listed under ``tables`` in the earlier ``summary.json`` are
        removed (never a path): an unreadable or foreign summary removes nothing.
        """
        try:
            previous = json.loads(previous_summary.read_text(encoding="utf-8")).get("tables", [])
        except (OSError, ValueError, AttributeError):
            return
        for name in set(previous) - set(self.written):
            if isinstance(name, str) and name.endswith(".csv") and Path(name).name == name:
                (self.out_dir / name).unlink(missing_ok=True)


def _count_dict(series: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in series.items()}


def summary(vreport: ValidationReport, labels: LabelTables, meta: pd.DataFrame, scan: MetadataScan, *,
            unreadable: int, decoded: int, constant: int) -> dict[str, Any]:
    """The headline numbers of ``summary.json`` (every key but ``tables``; see ``build_eda_report``)."""
    patients = labels.patients
    valid_age = meta.loc[meta["age"] <= IMPOSSIBLE_AGE, "age"]
    age = {"min": None, "median": None, "max": None, "impossible": int(len(impossible_ages(meta))),
           "impossible_threshold": IMPOSSIBLE_AGE, "missing": int(meta["age"].isna().sum())}
    if len(valid_age):
        age.update(min=float(valid_age.min()), median=float(valid_age.median()), max=float(valid_age.max()))
    return {
        "label_rows": int(vreport.label_rows),
        "patients": int(vreport.patients),
        "multi_box_patients": int((patients["label_rows"] > 1).sum()),
        "boxes": int(vreport.boxes),
        "images_found": int(vreport.images_found),
        "images_missing": int(vreport.images_missing),
        "label_problems": len(label_problems(vreport)),
        "patients_per_class": _count_dict(labels.classes.set_index("class")["patients"]),
        "rows_per_class": _count_dict(labels.classes.set_index("class")["label_rows"]),
        "patients_per_target": _count_dict(labels.targets.set_index("target")["patients"]),
        "boxes_per_patient": _count_dict(patients["boxes"].value_counts().sort_index()),
        "age": age,
        "sex": _count_dict(meta["sex"].value_counts().sort_index()),
        "view_position": _count_dict(meta["view_position"].value_counts().sort_index()),
        "headers_read": int(len(scan.frame)),
        "headers_failed": len(scan.failed),
        "images_unreadable": unreadable,
        "images_decoded": decoded,
        "images_constant": constant,
    }
